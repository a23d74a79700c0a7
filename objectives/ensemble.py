"""Ensembling finished runs of one task from their saved per-example outputs (tasks/run_outputs.py).

Classification (sst, cfimdb, para): the members' class probabilities are averaged (`mean`, weighted
by `weights`), or each member votes for its argmax class (`vote`, weighted; a tie goes to the class
with the higher mean probability); the ensemble predicts the argmax.  This is the classic ensemble of
independently trained models (e.g. Dietterich, 2000, "Ensemble Methods in Machine Learning"; Lakshminarayanan
et al., 2017, average the predictive distributions of seeds).

Sonnets: outputs are texts, which cannot be averaged.  For every prompt the ensemble picks ONE
member's sonnet: the one with the highest weighted mean sentence chrF against the other members'
sonnets for the same prompt (a minimum-Bayes-risk / consensus choice, Kumar & Byrne, 2004, with chrF
as the utility); ties go to the earlier member.  It needs no model, and the gold sonnets are only used
to report dev chrF, never to choose.

Members must be runs of the same task and split with the same ids (in any order) and, for
classification, the same classes and leaderboard file; anything else is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from common.errors import DataError
from tasks.run_outputs import RunOutputs

METHODS = ("mean", "vote")


@dataclass
class Combined:
    outputs: RunOutputs  # the ensemble's own outputs (mean probabilities or vote shares; the chosen texts)
    predictions: Optional[list[int]] = None  # classification: the ensemble's class per example
    chosen_member: Optional[list[int]] = None  # sonnets: which member each text comes from


def check_members(members: Sequence[RunOutputs]) -> list[RunOutputs]:
    """The members with their examples in the first member's id order; DataError naming the first
    member that is of another task/split/leaderboard file, other classes, or another id set."""
    if not members:
        raise ValueError("no ensemble members")
    first = members[0]
    out = [first]
    for m in members[1:]:
        for key in ("task", "split", "prediction_file", "kind", "classes"):
            if getattr(m, key) != getattr(first, key):
                raise DataError(f"{m.path}: {key} {getattr(m, key)!r} but {first.path} has {getattr(first, key)!r}; "
                                f"an ensemble combines runs of the same task")
        if set(map(str, m.ids)) != set(map(str, first.ids)) or len(m.ids) != len(first.ids):
            only = sorted(set(map(str, m.ids)) ^ set(map(str, first.ids)))[:3]
            raise DataError(f"{m.path}: its ids differ from {first.path}'s (e.g. {only}); the runs answered "
                            f"different data files")
        out.append(reorder(m, [str(i) for i in first.ids]))
    return out


def reorder(m: RunOutputs, ids: list[str]) -> RunOutputs:
    pos = {str(i): k for k, i in enumerate(m.ids)}
    order = [pos[i] for i in ids]
    pick = lambda xs: None if xs is None else [xs[k] for k in order]  # noqa: E731
    return RunOutputs(m.task, m.split, m.prediction_file, [m.ids[k] for k in order], pick(m.probs), m.classes,
                      pick(m.labels), pick(m.texts), pick(m.references), m.path)


def normalised(weights: Optional[Sequence[float]], n: int) -> torch.Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} runs; give one weight per run")
    w = torch.tensor(weights, dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, >= 0, and not all 0")
    return w / w.sum()


def combine_probabilities(probs: torch.Tensor, weights: torch.Tensor, method: str) -> tuple[torch.Tensor, list[int]]:
    """(M, N, C) member probabilities -> ((N, C) ensemble distribution, (N,) predicted classes).
    mean: the weighted mean probability and its argmax.  vote: the weighted share of the members'
    argmax votes; among the classes with the most votes, the one with the higher mean probability."""
    mean = torch.einsum("m,mnc->nc", weights, probs.double())
    if method == "mean":
        return mean, mean.argmax(-1).tolist()
    if method != "vote":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    votes = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).double()  # (M, N, C)
    share = torch.einsum("m,mnc->nc", weights, votes)
    top = share >= share.max(-1, keepdim=True).values - 1e-12  # (N, C) the classes with the most votes
    return share, mean.masked_fill(~top, -1.0).argmax(-1).tolist()


def consensus_choice(texts: Sequence[Sequence[str]], weights: torch.Tensor) -> list[int]:
    """For each prompt (column), the member whose text has the highest weighted mean sentence chrF
    against the other members' texts; texts[m][i] is member m's sonnet for prompt i."""
    from sacrebleu.metrics import CHRF

    metric, n_members = CHRF(), len(texts)
    if n_members == 1:
        return [0] * len(texts[0])
    chosen = []
    for i in range(len(texts[0])):
        best, best_score = 0, None
        for m in range(n_members):
            others = [o for o in range(n_members) if o != m]
            mass = sum(weights[o].item() for o in others)
            score = sum(weights[o].item() * metric.sentence_score(texts[m][i], [texts[o][i]]).score for o in others)
            score = score / mass if mass > 0 else 0.0
            if best_score is None or score > best_score:
                best, best_score = m, score
        chosen.append(best)
    return chosen


def combine(members: Sequence[RunOutputs], weights: Optional[Sequence[float]] = None, method: str = "mean") -> Combined:
    members = check_members(members)
    w = normalised(weights, len(members))
    first = members[0]
    if first.kind == "generation":
        if method != "mean":
            raise ValueError("sonnet ensembles pick one member's sonnet per prompt (chrF consensus); "
                             "there is no vote")
        chosen = consensus_choice([m.texts for m in members], w)
        texts = [members[c].texts[i] for i, c in enumerate(chosen)]
        return Combined(RunOutputs(first.task, first.split, first.prediction_file, first.ids, texts=texts,
                                   references=first.references), chosen_member=chosen)
    probs, predictions = combine_probabilities(torch.tensor([m.probs for m in members]), w, method)
    labels = next((m.labels for m in members if m.labels is not None), None)
    return Combined(RunOutputs(first.task, first.split, first.prediction_file, first.ids, probs.tolist(),
                               first.classes, labels), predictions)


def score(out: RunOutputs, predictions: Optional[Sequence[int]] = None) -> Optional[dict]:
    """Dev metrics of one member or the ensemble (`predictions`, default the argmax of `probs`): accuracy
    and F1 (macro for sentiment, binary for para) on the labelled examples, chrF for sonnets; None
    without gold."""
    if out.kind == "generation":
        from evaluation.sonnets import chrf

        return None if out.references is None else {"chrf": chrf(out.texts, out.references)}
    if out.labels is None or all(y is None for y in out.labels):
        return None
    from evaluation.metrics import accuracy_binary_f1, accuracy_macro_f1

    rows = [i for i, y in enumerate(out.labels) if y is not None]
    if predictions is None:
        predictions = torch.tensor(out.probs).argmax(-1).tolist()
    preds = [predictions[i] for i in rows]
    gold = [out.labels[i] for i in rows]
    return accuracy_binary_f1(preds, gold) if out.task == "para" else accuracy_macro_f1(preds, gold, out.classes)
