"""Preference pairs for DPO, built as their own inspectable stage (`dpo.py pairs`): every pair is a
JSON line `{"prompt", "chosen", "rejected", "kind", "source"}` that can be read, counted and edited
before any training (`dpo.py train --pairs FILE`).

Sonnets (`sonnet_pairs`): the prompt is a sonnet's first `prompt_lines` lines (as the held-out prompts
are), the chosen response is its real continuation (starting with the newline after the prompt, as
a generated one does), and the rejected response is one of

    sample    the model's own completion of the same prompt (`SonnetWriter`, the decoding flags)
    shuffle   the real continuation with its lines in another order (the same words, no argument)
    rhyme     the real continuation with every line's last word swapped for the last word of a
              random line of another sonnet, kept only when the heuristic rhyme adherence of the whole
              sonnet (evaluation/sonnet_form.py) drops: same metre and sense, broken rhyme
    truncate  the first 1 .. n/2 lines of the continuation (DPO then appends EOS: a sonnet that stops)

Paraphrase (`paraphrase_pairs`): the prompt is the detector's cloze prompt of a labelled question pair
(tasks/paraphrase.py, with `sentence1` / `sentence2` kept so that training encodes exactly the
detector's tokens), chosen = the correct answer ("yes" / "no"), rejected = the wrong one.  Any
labelled Quora-format file works, including the critic-filtered synthetic pairs that
`impossible_distillation.py build` writes ("generated paraphrase pairs scored by the critic").
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from common.errors import DataError
from common.io import read_jsonl, write_jsonl
from evaluation.sonnet_form import rhyme_adherence
from tasks.paraphrase import PROMPT

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SONNET_KINDS = ("sample", "shuffle", "rhyme", "truncate")
ANSWERS = ("no", "yes")  # class 0, class 1: the detector's answer words
_LAST_WORD = re.compile(r"([A-Za-z\u2019']+)([^A-Za-z\u2019']*)$")


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    kind: str = "given"  # how the rejected response was made
    source: str = ""  # where the pair comes from (sonnet number, question-pair id)
    extra: dict = field(default_factory=dict)  # e.g. sentence1 / sentence2 of a paraphrase pair

    def to_dict(self) -> dict:
        out = asdict(self)
        return {**{k: out[k] for k in ("prompt", "chosen", "rejected", "kind", "source")}, **self.extra}


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> Path:
    return write_jsonl(path, [p.to_dict() for p in pairs])


def read_pairs(path: str | Path, needs: Sequence[str] = ()) -> list[dict]:
    """The pair records of a JSON-lines file: `prompt`, `chosen`, `rejected` (non-empty strings, the two
    responses different) and the fields in `needs`; a bad record is a DataError naming it."""
    records = read_jsonl(path, required=(*PAIR_FIELDS, *needs))
    if not records:
        raise DataError(f"{path}: no preference pair (one JSON object per line with {', '.join(PAIR_FIELDS)})")
    for n, r in enumerate(records, start=1):
        for key in (*PAIR_FIELDS, *needs):
            if not isinstance(r[key], str) or not r[key]:
                raise DataError(f"{path}, record {n}: {key} must be a non-empty string, got {r[key]!r}")
        if r["chosen"] == r["rejected"]:
            raise DataError(f"{path}, record {n}: chosen and rejected are the same text; a pair needs two responses")
    return records


def kind_counts(records: Sequence[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r.get("kind", "given") for r in records).items()))


# ---- sonnets ----------------------------------------------------------------------------------
def split_sonnet(text: str, prompt_lines: int) -> tuple[str, list[str]]:
    """(prompt = the first `prompt_lines` lines, the remaining lines)."""
    lines = [line for line in text.strip().split("\n")]
    return "\n".join(lines[:prompt_lines]), lines[prompt_lines:]


def continuation(lines: Sequence[str]) -> str:
    """Lines as the text that follows a prompt: each on a new line."""
    return "".join(f"\n{line}" for line in lines)


def shuffle_lines(lines: list[str], rng: random.Random) -> Optional[list[str]]:
    """The lines in another order, or None when every order is the same text."""
    if len(set(lines)) < 2:
        return None
    while True:
        out = lines[:]
        rng.shuffle(out)
        if out != lines:
            return out


def swap_last_word(line: str, word: str) -> str:
    m = _LAST_WORD.search(line)
    return line[: m.start()] + word + m.group(2) if m else line


def break_rhyme(prompt: str, lines: list[str], pool: Sequence[str], rng: random.Random,
                tries: int = 20) -> Optional[list[str]]:
    """`lines` with each last word replaced by a random word of `pool`, such that the rhyme adherence of
    prompt + lines drops; None when no try lowers it (a sonnet the heuristic finds no rhyme in)."""
    head = prompt.split("\n")
    before = rhyme_adherence(head + lines)
    for _ in range(tries):
        out = [swap_last_word(line, rng.choice(pool)) for line in lines]
        if rhyme_adherence(head + out) < before:
            return out
    return None


def last_words(sonnet: str) -> list[str]:
    return [m.group(1) for line in sonnet.split("\n") for m in [_LAST_WORD.search(line)] if m]


def truncate_lines(lines: list[str], rng: random.Random) -> Optional[list[str]]:
    if len(lines) < 2:
        return None
    return lines[: rng.randint(1, len(lines) // 2)]


def sonnet_pairs(sonnets: Sequence[tuple[int, str]], kinds: Sequence[str], prompt_lines: int = 3, seed: int = 0,
                 samples: Optional[dict[int, str]] = None) -> tuple[list[Pair], dict]:
    """One pair per (sonnet, kind) in `kinds` (`SONNET_KINDS`); `samples` maps a sonnet number to the
    model's completion of its prompt (kind `sample`).  Returns (pairs, stats: pairs and skips by kind)."""
    unknown = [k for k in kinds if k not in SONNET_KINDS]
    if unknown:
        raise ValueError(f"unknown pair kind(s) {unknown}; use {', '.join(SONNET_KINDS)}")
    if "sample" in kinds and samples is None:
        raise ValueError("kind sample needs the model's completions (samples)")
    rng = random.Random(seed)
    words = {number: last_words(text) for number, text in sonnets}
    pairs, skipped = [], Counter()
    for number, text in sonnets:
        prompt, rest = split_sonnet(text, prompt_lines)
        if not rest:
            skipped["too_short"] += 1
            continue
        chosen = continuation(rest)
        pool = [w for other, ws in words.items() if other != number for w in ws] or words[number]
        for kind in kinds:
            if kind == "sample":
                sample = samples[number]
                if not sample.startswith(prompt):
                    raise ValueError(f"sonnet {number}: the sample does not start with its prompt")
                rejected = sample[len(prompt):]
                rejected = rejected if rejected.strip() and rejected != chosen else None
            else:
                make = {"shuffle": lambda: shuffle_lines(rest, rng), "truncate": lambda: truncate_lines(rest, rng),
                        "rhyme": lambda: break_rhyme(prompt, rest, pool, rng)}[kind]
                lines = make()
                rejected = None if lines is None else continuation(lines)
            if rejected is None or rejected == chosen:
                skipped[kind] += 1
                continue
            pairs.append(Pair(prompt, chosen, rejected, kind, str(number)))
    made = Counter(p.kind for p in pairs)
    return pairs, {"sonnets": len(sonnets), "pairs": len(pairs), "by_kind": dict(sorted(made.items())),
                   "skipped": dict(sorted(skipped.items()))}


# ---- paraphrase -------------------------------------------------------------------------------
def cloze_prompt(sentence1: str, sentence2: str) -> str:
    """The detector's prompt as text (for reading the pairs file; training encodes `sentence1` and
    `sentence2` with tasks.paraphrase.encode_pairs, the detector's own tokens)."""
    pre, mid, suf = PROMPT
    return f"{pre}{sentence1}{mid}{sentence2}{suf}"


def paraphrase_pairs(examples: Sequence) -> tuple[list[Pair], dict]:
    """One pair per labelled question pair (tasks.data.ParaphraseExample): chosen = the right answer."""
    pairs, unlabeled = [], 0
    for e in examples:
        if e.label is None:
            unlabeled += 1
            continue
        pairs.append(Pair(cloze_prompt(e.sentence1, e.sentence2), ANSWERS[e.label], ANSWERS[1 - e.label],
                          "answer", e.id, {"sentence1": e.sentence1, "sentence2": e.sentence2}))
    yes = sum(p.chosen == "yes" for p in pairs)
    return pairs, {"question_pairs": len(examples), "pairs": len(pairs), "chosen_yes": yes,
                   "chosen_no": len(pairs) - yes, "skipped": {"unlabeled": unlabeled}}
