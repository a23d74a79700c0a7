"""Per-example outputs of a finished task run, kept in its run directory for ensembling (ensemble.py):
what a prediction file cannot hold (class probabilities, the gold labels, the references).

    RUN_DIR/outputs/{task}-{split}.json
      classification (sst, cfimdb, para):
        {"task", "split", "prediction_file", "classes", "ids", "probs": [[p_0 .. p_C-1] per example],
         "labels": [gold label or null per example] | null}
      generation (sonnet):
        {"task", "split", "prediction_file", "ids": [sonnet numbers], "texts", "references": [...] | null}

`prediction_file` is the leaderboard name of the predictions made from these outputs
(tasks/leaderboard.py; a run may have written them under another path, e.g. `--para_dev_out`);
members of one ensemble must agree on it, and ensemble.py writes its files under it.  The paraphrase classes are (no, yes) as in
tasks/paraphrase.py.  Files are written atomically; a malformed one is a DataError naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from common.errors import DataError
from common.io import atomic_write_json, read_text

OUTPUTS_DIR = "outputs"


def outputs_path(run_dir: str | Path, task: str, split: str) -> Path:
    return Path(run_dir) / OUTPUTS_DIR / f"{task}-{split}.json"


@dataclass
class RunOutputs:
    task: str
    split: str
    prediction_file: str
    ids: list
    probs: Optional[list[list[float]]] = None  # classification
    classes: Optional[int] = None
    labels: Optional[list[Optional[int]]] = None
    texts: Optional[list[str]] = None  # generation
    references: Optional[list[str]] = None
    path: Optional[Path] = None  # where it was read from

    @property
    def kind(self) -> str:
        return "generation" if self.texts is not None else "classification"

    def to_dict(self) -> dict:
        out = {"task": self.task, "split": self.split, "prediction_file": self.prediction_file, "ids": self.ids}
        if self.kind == "classification":
            out.update(classes=self.classes, probs=self.probs, labels=self.labels)
        else:
            out.update(texts=self.texts, references=self.references)
        return out


def write_class_outputs(run_dir, task: str, split: str, prediction_file: str, ids: Sequence, probs,
                        labels: Optional[Sequence[Optional[int]]] = None) -> Path:
    """Class probabilities `probs` (N, C) (a tensor or nested lists) of the examples `ids`."""
    probs = probs.tolist() if hasattr(probs, "tolist") else [list(map(float, p)) for p in probs]
    out = RunOutputs(task, split, prediction_file, list(ids), probs, len(probs[0]) if probs else 0,
                     None if labels is None else [None if y is None else int(y) for y in labels])
    return write_outputs(run_dir, out)


def write_text_outputs(run_dir, task: str, split: str, prediction_file: str, ids: Sequence, texts: Sequence[str],
                       references: Optional[Sequence[str]] = None) -> Path:
    return write_outputs(run_dir, RunOutputs(task, split, prediction_file, list(ids), texts=list(texts),
                                             references=None if references is None else list(references)))


def write_outputs(run_dir, out: RunOutputs) -> Path:
    check(out, outputs_path(run_dir, out.task, out.split))
    return atomic_write_json(outputs_path(run_dir, out.task, out.split), out.to_dict())


def read_outputs(path: str | Path) -> RunOutputs:
    path = Path(path)
    try:
        raw = json.loads(read_text(path, "run outputs file"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg}); a run writes it when it ends: rerun its predictions") from None
    needed = ("task", "split", "prediction_file", "ids")
    if not isinstance(raw, dict) or any(k not in raw for k in needed):
        raise DataError(f"{path}: expected an object with {', '.join(needed)}")
    if ("probs" in raw) == ("texts" in raw):
        raise DataError(f"{path}: expected either probs (classification) or texts (generation)")
    out = RunOutputs(raw["task"], raw["split"], raw["prediction_file"], raw["ids"], raw.get("probs"),
                     raw.get("classes"), raw.get("labels"), raw.get("texts"), raw.get("references"), path)
    check(out, path)
    return out


def check(out: RunOutputs, path) -> None:
    """DataError naming `path` unless every per-example list has one entry per id and the values fit."""
    n = len(out.ids)
    if n == 0 or len(set(map(str, out.ids))) != n:
        raise DataError(f"{path}: ids must be non-empty and unique")
    lists = {"probs": out.probs, "labels": out.labels} if out.kind == "classification" else \
        {"texts": out.texts, "references": out.references}
    for name, values in lists.items():
        if values is not None and len(values) != n:
            raise DataError(f"{path}: {len(values)} {name} for {n} ids")
    if out.kind == "classification":
        c = out.classes
        if not isinstance(c, int) or c < 2 or any(len(p) != c for p in out.probs):
            raise DataError(f"{path}: every probs row must hold one probability per class ({c} classes)")
        if any(abs(sum(p) - 1.0) > 1e-3 or min(p) < 0 for p in out.probs):
            raise DataError(f"{path}: a probs row is not a probability distribution")
        if out.labels is not None and any(y is not None and not 0 <= y < c for y in out.labels):
            raise DataError(f"{path}: a label outside 0..{c - 1}")
