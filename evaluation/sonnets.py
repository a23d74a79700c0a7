"""The starter's sonnet metric: chrF (Popovic, 2015, "chrF: character n-gram F-score for automatic MT
evaluation"), exactly as the starter computes it: sacrebleu's `CHRF()` with its defaults (character
6-grams, beta 2, no word n-grams), `corpus_score(generated, [gold]).score`.  The sonnet files
themselves are read and written by `tasks/sonnets.py`."""
from __future__ import annotations


def chrf(generated: list[str], gold: list[str]) -> float:
    """Corpus chrF of `generated` against `gold` (one reference each), exactly as the starter."""
    from sacrebleu.metrics import CHRF

    if len(generated) != len(gold):
        raise ValueError(f"chrf: {len(generated)} generated sonnets but {len(gold)} gold sonnets; pair them first")
    if not generated:
        raise ValueError("chrf: no sonnets to score")
    return float(CHRF().corpus_score(list(generated), [list(gold)]).score)
