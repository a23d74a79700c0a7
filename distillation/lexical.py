"""Lexical similarity and diversity for Impossible Distillation's filters and round statistics
(Jung et al., 2023, arXiv 2305.16635: a paraphrase must say the same thing in OTHER words, so pairs
that are lexically too close are dropped).

Similarities in [0, 1], computed by maintained metric libraries, never by hand:

    rougeL  ROUGE-L F-measure (longest common subsequence; Lin, 2004) from Google's `rouge-score`,
            lowercased words, no stemming; symmetric
    bleu    sentence BLEU (Papineni et al., 2002) from `sacrebleu` (effective order, exponential
            smoothing), the larger of the two directions / 100
    chrf    sentence chrF (Popovic, 2015) from `sacrebleu`, the larger of the two directions / 100

`distinct_n` (Li et al., 2016) is the diversity measure of a set of sentences: distinct word
n-grams / all word n-grams (1 = no n-gram repeated anywhere).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

METRICS = ("rougeL", "bleu", "chrf")
_WORD = re.compile(r"\w+")


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def similarity(a: str, b: str, metric: str = "rougeL") -> float:
    """Lexical similarity of two sentences in [0, 1] under `metric` (see the module docstring)."""
    if metric == "rougeL":
        return float(_rouge().score(a, b)["rougeL"].fmeasure)
    if metric == "bleu":
        import sacrebleu

        return max(sacrebleu.sentence_bleu(a, [b]).score, sacrebleu.sentence_bleu(b, [a]).score) / 100.0
    if metric == "chrf":
        import sacrebleu

        return max(sacrebleu.sentence_chrf(a, [b]).score, sacrebleu.sentence_chrf(b, [a]).score) / 100.0
    raise ValueError(f"overlap_metric: {metric!r} is not one of {', '.join(METRICS)}")


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams over `texts` (lowercased); 0.0 when there are none."""
    grams = [tuple(w[i:i + n]) for w in (_WORD.findall(t.lower()) for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
