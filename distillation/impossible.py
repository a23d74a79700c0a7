"""Impossible Distillation data stages (Jung et al., 2023, "Impossible Distillation: from Low-Quality
Model to High-Quality Dataset & Model for Summarization and Paraphrasing", arXiv 2305.16635).

A small LM's own samples become paraphrase training data:

* generate: *paraphrastic proximity*: several samples continuing the same context tend to say the
  same thing, so every two samples of one context form a candidate pair (`continue` mode); or
  *prompted rewriting*: the LM is asked to restate a question, and (question, rewrite) plus every
  two rewrites form candidates (`rewrite` mode).  Rounds >= 2 sample from the previous round's
  student generator in the paraphrase format of `distillation/generator.py` (`paraphrase` mode:
  (input, sample) plus every two samples).  Batched sampling through the shared `model.generate`,
  each prompt repeated `samples_per_context` times (over-generation).
* filter: rules applied in this order, each pair counted under the FIRST rule that removes it:
    too_short     either side has fewer than `min_words` words
    copy          the two sides are equal after normalisation (lowercase, words only)
    duplicate     the unordered normalised pair was already kept
    length_ratio  shorter / longer word count < `min_length_ratio`
    near_copy     lexical similarity > `max_overlap` (a paraphrase must rephrase), ROUGE-L, BLEU or
                  chrF by `overlap_metric` (distillation/lexical.py: rouge-score and sacrebleu)
    critic        the critic's bidirectional score < tau (distillation/critic.py)
* build: filtered pairs are positives (label 1); each positive's first side also gets
  `negatives_per_positive` hard negatives: the sentences of OTHER contexts with the highest Jaccard
  overlap with it (topically close, sharing keywords, yet from another context, so not a
  paraphrase by construction).  Written in the Quora CSV layout that `tasks.data.read_paraphrase` reads.

Words are `\\w+` runs of the lowercased text.
"""
from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from distillation.lexical import METRICS, distinct_n, similarity

from common.io import atomic_write_json, atomic_write_text, read_jsonl, write_jsonl  # noqa: F401  (the stages' files)

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def one_line(text: str) -> str:
    """Collapse tabs and newlines so a sentence fits one TSV field."""
    return _SPACE.sub(" ", text).strip()


# ---- files ------------------------------------------------------------------------------------
def stats_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".stats.json")


def write_stats(out: str | Path, stats: dict) -> Path:
    return atomic_write_json(stats_path(out), stats)


# ---- generate ---------------------------------------------------------------------------------
REWRITE_PROMPT = ('Question: "', '"\nThe same question in other words: "')


MODES = ("continue", "rewrite", "paraphrase")


def make_prompt(context: str, mode: str) -> str:
    if mode == "continue":
        return context.rstrip() + " "
    if mode == "rewrite":
        return REWRITE_PROMPT[0] + context.strip() + REWRITE_PROMPT[1]
    raise ValueError(f"mode: unknown text-prompt mode {mode!r}; choose continue or rewrite")


def prompt_ids(tokenizer, contexts: Sequence[str], mode: str) -> list[list[int]]:
    """Token ids of each context's generation prompt (`paraphrase`: the generator's format)."""
    if mode == "paraphrase":
        from distillation.generator import paraphrase_prompt_ids

        return paraphrase_prompt_ids(tokenizer, contexts)
    return [tokenizer(make_prompt(c, mode), add_special_tokens=False)["input_ids"] for c in contexts]


_SENTENCE_END = re.compile(r"[.?!](?=\s|$)")


def clean_sample(text: str, mode: str) -> str:
    """The first line of a sample, cut at the closing quote (rewrite) or first sentence end (continue);
    a paraphrase-format sample is its first line."""
    text = text.split("\n", 1)[0]
    if mode == "rewrite":
        text = text.split('"', 1)[0]
    elif mode == "continue":
        m = _SENTENCE_END.search(text)
        text = text[: m.end()] if m else text
    return one_line(text)


def candidate_pairs(context_id: int, context: str, samples: Sequence[str], mode: str) -> list[dict]:
    """Every unordered pair of distinct-position samples; in rewrite and paraphrase mode also (context, sample)."""
    texts = list(samples)
    rows = []
    if mode in ("rewrite", "paraphrase"):
        source = "context-rewrite" if mode == "rewrite" else "context-student"
        rows += [{"context_id": context_id, "a": one_line(context), "b": s, "source": source} for s in texts]
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            rows.append({"context_id": context_id, "a": texts[i], "b": texts[j], "source": "sample-sample"})
    return rows


def sample_continuations(model, tokenizer, contexts: Sequence[str], *, mode: str, samples_per_context: int,
                         batch_size: int, max_new_tokens: int, decoding: dict, seed: int, device) -> list[list[str]]:
    """`samples_per_context` cleaned samples for each context, drawn with `model.generate` (rows of a
    batch are prompts repeated `samples_per_context` times, since generate has no num_return_sequences).
    `decoding`: generate()'s sampling arguments (`training.config.GenerationConfig.kwargs()`)."""
    import torch

    from models.generation import left_pad, newline_counts

    eos = tokenizer.eos_token_id
    counts = newline_counts(tokenizer).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    prompts = prompt_ids(tokenizer, contexts, mode)
    rows = [(ci, p) for ci, p in enumerate(prompts) for _ in range(samples_per_context)]
    out: list[list[str]] = [[] for _ in contexts]
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = left_pad([p for _, p in chunk], eos)
            seqs = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, **decoding,
                                  eos_token_id=eos, pad_token_id=eos, generator=gen, stop_newlines=1,
                                  newline_counts=counts)
            new = seqs[:, ids.size(1):].tolist()
            for (ci, _), tokens in zip(chunk, new):
                tokens = [t for t in tokens if t != eos]
                out[ci].append(clean_sample(tokenizer.decode(tokens), mode))
    return out


def generate_candidates(model, tokenizer, contexts: Sequence[str], *, mode: str, samples_per_context: int,
                        batch_size: int, max_new_tokens: int, decoding: dict, seed: int, device) -> tuple[list[dict], dict]:
    """(candidate rows, statistics) of one generation stage: samples -> `candidate_pairs` per context."""
    import time

    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    if not decoding.get("do_sample"):
        raise ValueError("decoding: over-generation needs a sampling decoding (sample, top-k, top-p, top-k-p); "
                         "greedy and beam search repeat one output")
    t0 = time.perf_counter()
    samples = sample_continuations(model, tokenizer, contexts, mode=mode, samples_per_context=samples_per_context,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, decoding=decoding,
                                   seed=seed, device=device)
    seconds = time.perf_counter() - t0
    rows = [r for ci, (c, s) in enumerate(zip(contexts, samples)) for r in candidate_pairs(ci, c, s, mode)]
    n_samples = sum(len(s) for s in samples)
    flat = [x for s in samples for x in s]
    stats = {"stage": "generate", "contexts": len(contexts), "samples": n_samples,
             "empty_samples": sum(1 for x in flat if not x), "candidates": len(rows), "mode": mode,
             "distinct_2_samples": distinct_n(flat, 2), "decoding": dict(decoding),
             "seconds": round(seconds, 2), "samples_per_s": round(n_samples / max(seconds, 1e-9), 2)}
    return rows, stats


# ---- filter -----------------------------------------------------------------------------------
@dataclass
class FilterRules:
    min_words: int = 3
    min_length_ratio: float = 0.5
    max_overlap: float = 0.7
    tau: Optional[float] = None  # critic threshold; None = no critic
    overlap_metric: str = "rougeL"  # near_copy's similarity: rougeL, bleu or chrf

    def check(self) -> None:
        if self.overlap_metric not in METRICS:
            raise ValueError(f"--overlap_metric must be one of {', '.join(METRICS)}, got {self.overlap_metric!r}")
        if self.min_words < 1:
            raise ValueError(f"--min_words must be >= 1, got {self.min_words}")
        if not 0.0 <= self.min_length_ratio <= 1.0:
            raise ValueError(f"--min_length_ratio must be in [0, 1], got {self.min_length_ratio}")
        if not 0.0 <= self.max_overlap <= 1.0:
            raise ValueError(f"--max_overlap must be in [0, 1], got {self.max_overlap}")
        if self.tau is not None and not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"--tau must be in [0, 1], got {self.tau}")


RULES = ("too_short", "copy", "duplicate", "length_ratio", "near_copy", "critic")


def rule_violated(a: str, b: str, rules: FilterRules, seen: set) -> Optional[str]:
    """The first cheap rule (all but the critic) that removes the pair, or None."""
    wa, wb = words(a), words(b)
    if min(len(wa), len(wb)) < rules.min_words:
        return "too_short"
    na, nb = " ".join(wa), " ".join(wb)
    if na == nb:
        return "copy"
    if (min(na, nb), max(na, nb)) in seen:
        return "duplicate"
    if min(len(wa), len(wb)) / max(len(wa), len(wb)) < rules.min_length_ratio:
        return "length_ratio"
    if similarity(a, b, rules.overlap_metric) > rules.max_overlap:
        return "near_copy"
    return None


def filter_pairs(rows: Sequence[dict], rules: FilterRules,
                 critic: Optional[Callable[[list[tuple[str, str]]], list[float]]] = None) -> tuple[list[dict], dict]:
    """(kept rows with a `score` field when a critic ran, statistics).  `critic` maps pairs to their
    bidirectional scores; a pair is kept when score >= rules.tau."""
    rules.check()
    if (critic is None) != (rules.tau is None):
        raise ValueError("a critic and --tau go together: give both or neither")
    removed = {r: 0 for r in RULES}
    seen: set = set()
    survivors = []
    for row in rows:
        reason = rule_violated(row["a"], row["b"], rules, seen)
        if reason:
            removed[reason] += 1
            continue
        na, nb = normalise(row["a"]), normalise(row["b"])
        seen.add((min(na, nb), max(na, nb)))
        survivors.append(dict(row))
    kept = survivors
    score_summary = None
    if critic is not None and survivors:
        scores = critic([(r["a"], r["b"]) for r in survivors])
        kept = []
        for row, s in zip(survivors, scores):
            row["score"] = round(float(s), 6)
            if s >= rules.tau:
                kept.append(row)
            else:
                removed["critic"] += 1
        score_summary = {"mean": sum(scores) / len(scores), "min": min(scores), "max": max(scores)}
    kept_scores = [r["score"] for r in kept if "score" in r]
    sims = [similarity(r["a"], r["b"], rules.overlap_metric) for r in kept]
    stats = {"stage": "filter", "input": len(rows), "kept": len(kept), "removed": removed,
             "rules": {"min_words": rules.min_words, "min_length_ratio": rules.min_length_ratio,
                       "max_overlap": rules.max_overlap, "overlap_metric": rules.overlap_metric, "tau": rules.tau,
                       "critic": critic is not None},
             "critic_scores_of_rule_survivors": score_summary,
             "critic_score_mean_kept": sum(kept_scores) / len(kept_scores) if kept_scores else None,
             "lexical_similarity_mean_kept": sum(sims) / len(sims) if sims else None,
             "distinct_2_kept": distinct_n([r["b"] for r in kept], 2)}
    return kept, stats


def merge_filtered(row_lists: Sequence[Sequence[dict]]) -> tuple[list[dict], int]:
    """The rows of several filtered files (e.g. every round's), each unordered normalised pair once
    (first occurrence wins); returns (rows, duplicates dropped)."""
    seen: set = set()
    out = []
    for rows in row_lists:
        for r in rows:
            na, nb = normalise(r["a"]), normalise(r["b"])
            key = (min(na, nb), max(na, nb))
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out, sum(len(rows) for rows in row_lists) - len(out)


# ---- build ------------------------------------------------------------------------------------
def hard_negatives(rows: Sequence[dict], per_positive: int, min_overlap: float = 0.0) -> tuple[list[tuple[str, str]], int]:
    """For each row's side `a`: the `per_positive` sentences of other contexts with the highest word
    Jaccard overlap (> min_overlap), ties broken by first appearance.  Returns (pairs, shortfall)."""
    pool: list[tuple[int, str]] = []
    seen_text: set = set()
    for r in rows:
        for side in ("a", "b"):
            key = (r["context_id"], normalise(r[side]))
            if key not in seen_text:
                seen_text.add(key)
                pool.append((r["context_id"], r[side]))
    pool_sets = [set(words(t)) for _, t in pool]
    used: set = set()
    out, shortfall = [], 0
    for r in rows:
        wa = set(words(r["a"]))
        scored = []
        for k, ((cid, text), ws) in enumerate(zip(pool, pool_sets)):
            if cid == r["context_id"] or not ws:
                continue
            overlap = len(wa & ws) / len(wa | ws)
            if overlap > min_overlap:
                scored.append((-overlap, k))
        scored.sort()
        found = 0
        for _, k in scored:
            text = pool[k][1]
            key = (normalise(r["a"]), normalise(text))
            if key in used or key[0] == key[1]:
                continue
            used.add(key)
            out.append((r["a"], text))
            found += 1
            if found == per_positive:
                break
        shortfall += per_positive - found
    return out, shortfall


def write_quora_csv(path: str | Path, pairs: Sequence[tuple[str, str, int]], id_prefix: str = "synth") -> Path:
    """Tab-separated with a leading unnamed index column and the header `id sentence1 sentence2
    is_duplicate`, labels written 1.0/0.0 as in the Quora files."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["", "id", "sentence1", "sentence2", "is_duplicate"])
    for i, (a, b, label) in enumerate(pairs):
        w.writerow([i, f"{id_prefix}-{i}", one_line(a), one_line(b), f"{float(label):.1f}"])
    return atomic_write_text(path, buf.getvalue())


def build_dataset(rows: Sequence[dict], negatives_per_positive: int, seed: int,
                  min_negative_overlap: float = 0.0) -> tuple[list[tuple[str, str, int]], dict]:
    if negatives_per_positive < 0:
        raise ValueError(f"--negatives_per_positive must be >= 0, got {negatives_per_positive}")
    if not rows:
        raise ValueError("no filtered pairs to build from (the filter kept nothing; loosen its rules)")
    positives = [(r["a"], r["b"], 1) for r in rows]
    negs, shortfall = hard_negatives(rows, negatives_per_positive, min_negative_overlap)
    pairs = positives + [(a, b, 0) for a, b in negs]
    random.Random(seed).shuffle(pairs)
    stats = {"stage": "build", "positives": len(positives), "negatives": len(negs),
             "negatives_short": shortfall, "rows": len(pairs), "negatives_per_positive": negatives_per_positive,
             "contexts": len({r["context_id"] for r in rows})}
    return pairs, stats
