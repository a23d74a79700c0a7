"""Classification metrics of the CS224N tasks: accuracy with macro F1 (sentiment: SST's 5 classes,
CFIMDB's 2, as the starter reports them) or with the F1 of the positive class (paraphrase: "yes")."""
from __future__ import annotations

from typing import Sequence


def _check(preds: Sequence[int], labels: Sequence[int]) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no labelled examples to score")


def accuracy_macro_f1(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> dict:
    """{'accuracy', 'f1'}: F1 averaged over the `num_labels` classes (scikit-learn's macro F1)."""
    from sklearn.metrics import f1_score

    _check(preds, labels)
    acc = sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)
    return {"accuracy": acc, "f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                                  zero_division=0))}


def accuracy_binary_f1(preds: Sequence[int], labels: Sequence[int]) -> dict:
    """{'accuracy', 'f1'}: F1 of class 1 (for paraphrase detection: "yes")."""
    _check(preds, labels)
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 0)
    fn = sum(1 for p, y in zip(preds, labels) if p == 0 and y == 1)
    acc = sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)
    return {"accuracy": acc, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}
