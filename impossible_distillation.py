"""Impossible Distillation for paraphrase detection (Jung et al., 2023, arXiv 2305.16635): GPT-2's own
samples -> filtered paraphrase pairs -> a labelled Quora-format training file.

Stages (each reads a file and writes a file, plus `<output>.stats.json` with counts and statistics):

    generate  contexts (a text file, one per line, or the questions of a Quora file)
              -> candidates.jsonl   {"context_id", "a", "b", "source"} per candidate pair
    filter    candidates.jsonl -> filtered.jsonl   (rules and critic: see distillation/impossible.py)
    build     filtered.jsonl -> synthetic.csv      (Quora CSV: positives + hard negatives)

Training is a flag of the task script:
    python paraphrase_detection.py --synthetic_train synthetic.csv --synthetic_weight 1.0 --kl_lambda 0.1

The filter's critic score is BIDIRECTIONAL: a paraphrase model (the cloze detector of
paraphrase_detection.py, same prompt) scores P("yes") for (a, b) and for (b, a); the pair's score is
the smaller of the two, kept when >= --tau.  A model trained on the synthetic data can be the
critic of the next round (`--critic_model` + `--critic_checkpoint runs/.../best.pt`).

    python impossible_distillation.py generate --model_size gpt2 --quora data/quora-train.csv \\
        --num_contexts 2000 --mode rewrite --samples_per_context 4 --out synth/candidates.jsonl
    python impossible_distillation.py filter --candidates synth/candidates.jsonl --out synth/filtered.jsonl \\
        --critic_model gpt2 --critic_checkpoint runs/para/best.pt --tau 0.6
    python impossible_distillation.py build --filtered synth/filtered.jsonl --out synth/synthetic.csv
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distillation import impossible as imp
from training.cli import UsageError, add_device_args, entry_point, resolve_device


def _add_model_args(p: argparse.ArgumentParser, prefix: str, help_what: str) -> None:
    p.add_argument(f"--{prefix}model", dest=f"{prefix}model", default=None if prefix else "gpt2",
                   help=f"{help_what}: preset (tiny = random), hub name or local HF checkpoint directory")
    p.add_argument(f"--{prefix}checkpoint", dest=f"{prefix}checkpoint", default=None,
                   help="a training run (directory, or its best.pt/last.pt; LoRA runs too) whose weights replace "
                        "the loaded ones")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: $GPT2_TOKENIZER_DIR, ...)")
    add_device_args(p)
    p.add_argument("--batch_size", type=int, default=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    g = sub.add_parser("generate", help="sample candidate paraphrase pairs from GPT-2")
    _add_model_args(g, "", "the generating LM")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--contexts", help="text file, one context per non-empty line")
    src.add_argument("--quora", help="Quora CSV file; its distinct sentence1 questions are the contexts")
    g.add_argument("--num_contexts", type=int, default=None, help="use the first N contexts")
    g.add_argument("--mode", choices=["continue", "rewrite"], default="rewrite",
                   help="continue: samples continuing one context pair with each other; rewrite: the LM restates "
                        "the context, and (context, rewrite) and rewrite pairs are candidates")
    g.add_argument("--samples_per_context", type=int, default=4)
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=11711)
    g.add_argument("--out", required=True, help="candidates .jsonl")

    f = sub.add_parser("filter", help="keep semantically equivalent, non-trivial, unique pairs")
    f.add_argument("--candidates", required=True, help="candidates .jsonl from `generate`")
    f.add_argument("--out", required=True, help="filtered .jsonl")
    f.add_argument("--min_words", type=int, default=3)
    f.add_argument("--min_length_ratio", type=float, default=0.5, help="drop pairs with shorter/longer words below this")
    f.add_argument("--max_overlap", type=float, default=0.7, help="drop near-copies: word Jaccard overlap above this")
    _add_model_args(f, "critic_", "the paraphrase critic (cloze detector); omit for rule-only filtering")
    f.add_argument("--tau", type=float, default=None, help="critic threshold on min(P(yes|a,b), P(yes|b,a))")
    f.add_argument("--max_length", type=int, default=128, help="critic prompt length in tokens")

    b = sub.add_parser("build", help="labelled Quora-format pairs: positives + hard negatives")
    b.add_argument("--filtered", required=True, help="filtered .jsonl from `filter`")
    b.add_argument("--out", required=True, help="Quora-format .csv")
    b.add_argument("--negatives_per_positive", type=int, default=1)
    b.add_argument("--min_negative_overlap", type=float, default=0.0,
                   help="a hard negative must share more than this word overlap with the positive's question")
    b.add_argument("--seed", type=int, default=11711)
    return p.parse_args(argv)


def load_lm(spec: str, checkpoint, device_flag: str, tokenizer_dir):
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from training.checkpoint import load_model

    device = resolve_device(device_flag)
    model = load_model(GPT2LMHeadModel, spec, checkpoint)
    tokenizer = load_tokenizer(tokenizer_dir, spec if Path(spec).is_dir() else None)
    return model.to(device).eval(), tokenizer, device


def device_of(args) -> str:
    return "cuda" if args.use_gpu else args.device


def read_contexts(args) -> list[str]:
    if args.contexts:
        path = Path(args.contexts)
        if not path.is_file():
            raise UsageError(f"--contexts {path}: no such file")
        contexts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from tasks.data import read_paraphrase

        seen, contexts = set(), []
        for ex in read_paraphrase(args.quora, labeled=False):
            if ex.sentence1 not in seen:
                seen.add(ex.sentence1)
                contexts.append(ex.sentence1)
    contexts = contexts[: args.num_contexts] if args.num_contexts else contexts
    if not contexts:
        raise UsageError(f"{args.contexts or args.quora}: no contexts")
    return contexts


def run_generate(args) -> dict:
    for flag in ("samples_per_context", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    if args.samples_per_context < 2 and args.mode == "continue":
        raise UsageError("--samples_per_context must be >= 2 in continue mode (pairs are made of samples)")
    contexts = read_contexts(args)
    model, tokenizer, device = load_lm(args.model, args.checkpoint, device_of(args), args.tokenizer)
    t0 = time.perf_counter()
    samples = imp.sample_continuations(model, tokenizer, contexts, mode=args.mode,
                                       samples_per_context=args.samples_per_context, batch_size=args.batch_size,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, seed=args.seed, device=device)
    seconds = time.perf_counter() - t0
    rows = [r for ci, (c, s) in enumerate(zip(contexts, samples)) for r in imp.candidate_pairs(ci, c, s, args.mode)]
    imp.write_jsonl(args.out, rows)
    n_samples = sum(len(s) for s in samples)
    stats = {"stage": "generate", "contexts": len(contexts), "samples": n_samples,
             "empty_samples": sum(1 for s in samples for x in s if not x), "candidates": len(rows),
             "mode": args.mode, "model": args.model, "seconds": round(seconds, 2),
             "samples_per_s": round(n_samples / max(seconds, 1e-9), 2)}
    imp.write_stats(args.out, stats)
    return stats


def bidirectional_critic(model, tokenizer, device, batch_size: int, max_length: int):
    """pairs -> min(P(yes | a, b), P(yes | b, a)) under the cloze paraphrase detector."""
    import torch

    from tasks.paraphrase import encode_pairs, two_way_logits
    from training.inference import batched_inference

    def score(pairs):
        both = list(pairs) + [(b, a) for a, b in pairs]
        seqs, _ = encode_pairs(tokenizer, both, max_length)
        logits = batched_inference(seqs, batch_size, tokenizer.eos_token_id, device, "fp32",
                                   lambda ids, mask: two_way_logits(model, ids, mask))
        p_yes = torch.softmax(logits, -1)[:, 1]
        n = len(pairs)
        return torch.minimum(p_yes[:n], p_yes[n:]).tolist()
    return score


def run_filter(args) -> dict:
    rows = imp.read_jsonl(args.candidates, ["context_id", "a", "b"])
    rules = imp.FilterRules(args.min_words, args.min_length_ratio, args.max_overlap, args.tau)
    critic = None
    if (args.critic_model is None) != (args.tau is None):
        raise UsageError("--critic_model and --tau go together: give both (critic filtering) or neither (rules only)")
    if args.critic_model:
        model, tokenizer, device = load_lm(args.critic_model, args.critic_checkpoint, device_of(args), args.tokenizer)
        critic = bidirectional_critic(model, tokenizer, device, args.batch_size, args.max_length)
    kept, stats = imp.filter_pairs(rows, rules, critic)
    stats["critic_model"], stats["critic_checkpoint"] = args.critic_model, args.critic_checkpoint
    imp.write_jsonl(args.out, kept)
    imp.write_stats(args.out, stats)
    return stats


def run_build(args) -> dict:
    rows = imp.read_jsonl(args.filtered, ["context_id", "a", "b"])
    try:
        pairs, stats = imp.build_dataset(rows, args.negatives_per_positive, args.seed, args.min_negative_overlap)
    except ValueError as exc:
        raise UsageError(f"--filtered {args.filtered}: {exc}") from None
    imp.write_quora_csv(args.out, pairs)
    imp.write_stats(args.out, stats)
    return stats


def main(argv=None) -> dict:
    args = parse_args(argv)
    stats = {"generate": run_generate, "filter": run_filter, "build": run_build}[args.stage](args)
    print(json.dumps(stats, indent=2))
    print(f"[impossible] wrote {args.out} and {imp.stats_path(args.out)}")
    return stats


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
