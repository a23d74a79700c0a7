"""Runs read back from their `metrics.jsonl` (training/runlog.py), the source of truth of every run:
what sweeps score and reports tabulate.

A *run* is one metrics log with a `start` record: a run directory, or one of its task sub-directories
(classifier.py keeps sst/ and cfimdb/ in one run directory).  `find_runs` accepts run directories,
directories above them (a sweep's DIR with its trial-NNN/, a recipe's output) and metrics files.
Records repeated by a resumed run are de-duplicated (the last copy of an epoch or a step wins).

Metric names: `dev_accuracy` (or `accuracy`) is the dev metric `accuracy` of the epoch records'
`dev` dict; any other name is a top-level number of the epoch record (`train_loss`, `tokens_per_s`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from common.errors import DataError
from common.io import read_jsonl_log

LOG_NAME = "metrics.jsonl"
MAX_DEPTH = 3  # run dir / trial dir / task sub-dir


def lookup(epoch: dict, metric: str) -> Optional[float]:
    """The value of `metric` in an epoch record (see the module docstring), or None."""
    dev = epoch.get("dev") or {}
    for key in (metric[4:] if metric.startswith("dev_") else None, metric):
        if key is not None and _number(dev.get(key)) is not None:
            return float(dev[key])
    return _number(epoch.get(metric))


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def metric_names(epoch: dict) -> list[str]:
    """The names `lookup` accepts for an epoch record: dev_<metric> for each dev metric, then the rest."""
    dev = [f"dev_{k}" for k, v in (epoch.get("dev") or {}).items() if _number(v) is not None]
    top = [k for k, v in epoch.items() if k not in ("time", "epoch", "best_epoch") and _number(v) is not None]
    return dev + top


@dataclass
class Run:
    path: Path  # the directory holding metrics.jsonl
    name: str
    records: list[dict] = field(repr=False, default_factory=list)

    def events(self, event: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == event]

    @property
    def start(self) -> dict:
        starts = self.events("start")
        return starts[0] if starts else {}

    @property
    def flags(self) -> dict:
        """The run's settings {"--flag": value} (its resume signature, logged at start)."""
        return dict(self.start.get("args") or {})

    @property
    def info(self) -> dict:
        return dict(self.start.get("run") or {})

    @property
    def task(self) -> str:
        return self.start.get("task") or self.info.get("task") or ""

    @property
    def epochs(self) -> list[dict]:
        by_epoch = {r["epoch"]: r for r in self.events("epoch") if "epoch" in r}
        return [by_epoch[e] for e in sorted(by_epoch)]

    @property
    def steps(self) -> list[dict]:
        by_key = {(r.get("epoch"), r.get("batch")): r for r in self.events("step") if "step" in r}
        return sorted(by_key.values(), key=lambda r: (r["step"], r.get("batch", 0)))

    @property
    def done(self) -> Optional[dict]:
        done = self.events("done")
        return done[-1] if done else None

    @property
    def selection_metric(self) -> Optional[str]:
        """`dev_<metric>` of the metric that picked the best epoch (logged by ScriptRun), if known."""
        metric = self.info.get("metric")
        return f"dev_{metric}" if metric else None

    @property
    def higher_is_better(self) -> bool:
        return bool(self.info.get("higher_is_better", True))

    def best_epoch(self) -> Optional[int]:
        """The epoch whose weights the run kept (best.pt): from `done`, else the latest epoch record's."""
        if self.done and self.done.get("best_epoch") is not None:
            return int(self.done["best_epoch"])
        epochs = self.epochs
        return int(epochs[-1]["best_epoch"]) if epochs and epochs[-1].get("best_epoch") is not None else None

    def value_at_best(self, metric: str) -> Optional[float]:
        """`metric` at the kept epoch (the trainer's choice by the task's metric)."""
        best = self.best_epoch()
        for e in self.epochs:
            if e["epoch"] == best:
                return lookup(e, metric)
        return None

    def train_seconds(self) -> float:
        return float(sum(e.get("seconds") or 0.0 for e in self.epochs))

    def wall_seconds(self) -> Optional[float]:
        """First record to last: training, evaluation and checkpoints (pauses of a resumed run included)."""
        times = [r["time"] for r in self.records if isinstance(r.get("time"), (int, float))]
        return max(times) - min(times) if len(times) >= 2 else None

    def peak_memory(self) -> tuple[Optional[int], str]:
        """(bytes, kind) of the largest peak memory logged, kind e.g. `cuda` or `cpu-rss`."""
        found = [(r.get("peak_memory_bytes"), r.get("peak_memory_kind", "")) for r in self.records
                 if isinstance(r.get("peak_memory_bytes"), (int, float))]
        return max(found, key=lambda x: x[0]) if found else (None, "")

    @property
    def trainable_params(self) -> Optional[int]:
        return self.start.get("trainable_params")

    @property
    def status(self) -> str:
        if self.done:
            return "early stop" if self.done.get("stopped_early") else "done"
        return "stopped" if self.events("stopped") else "running or killed"


def read_run(log: Path, root: Optional[Path] = None) -> Run:
    path = log.parent
    try:
        name = str(path.relative_to(root)) if root is not None and path != root else path.name
    except ValueError:
        name = str(path)
    return Run(path, name if name not in ("", ".") else path.name, read_jsonl_log(log))


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run (a metrics log with a `start` record) at or below `paths`, in path order."""
    out: list[Run] = []
    for given in paths:
        given = Path(given)
        if given.is_file():
            logs, root = [given], given.parent.parent
        elif given.is_dir():
            logs, root = _logs_below(given), given.parent
        else:
            raise DataError(f"{given}: no such run directory or metrics file")
        found = [r for r in (read_run(log, root) for log in logs) if r.start]
        if not found:
            raise DataError(f"{given}: no training run there (no {LOG_NAME} with a start record at most "
                            f"{MAX_DEPTH} directories down)")
        out += found
    return out


def _logs_below(directory: Path, depth: int = 0) -> list[Path]:
    logs = [directory / LOG_NAME] if (directory / LOG_NAME).is_file() else []
    if depth < MAX_DEPTH:
        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            logs += _logs_below(sub, depth + 1)
    return logs
