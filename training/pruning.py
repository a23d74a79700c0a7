"""The trial side of a sweep's per-epoch pruning (sweep.py, experiments/sweep.py): a `Callback`
whose `on_epoch_end` reports the epoch's dev metrics to the sweep and asks it whether to stop.

Scripts are never imported by the sweep: it starts each trial as a subprocess with
`--sweep_control DIR`, and `ScriptRun` adds a `SweepReporter(DIR)` to every task it trains.  The
two processes talk through small files in DIR, each written atomically (temp file + rename), so a
reader sees a whole file or none:

    trial   ->  report-<task>-<epoch>.json    {"task", "epoch", "metrics", "pid"}
    sweep   ->  decision-<task>-<epoch>.json  {"prune": bool, "reason": str}

After writing its report the trial waits for the decision (the sweep answers within its poll
interval), then returns `prune` from `on_epoch_end`, which ends training the trainer's way: the
epoch's checkpoint and record are written, then an `early_stop` record and `done`.  The trial never
hangs on a dead sweep: it stops waiting (and trains on) when its parent process is gone or after
`WAIT_SECONDS`.  Under torchrun only rank 0 talks to the sweep and broadcasts the decision, so every
rank stops at the same epoch.  Pruning (Li et al., 2018 on early stopping; Optuna's median rule,
Akiba et al., 2019) is decided by the sweep, never here.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

from common.io import atomic_write_json
from training import distributed as dist
from training.runlog import say
from training.task import Callback

POLL_SECONDS = 0.05
WAIT_SECONDS = 600.0  # a decision that never comes: train on


def _slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task) or "task"


def report_path(control: str | Path, task: str, epoch: int) -> Path:
    return Path(control) / f"report-{_slug(task)}-{epoch:04d}.json"


def decision_path(control: str | Path, task: str, epoch: int) -> Path:
    return Path(control) / f"decision-{_slug(task)}-{epoch:04d}.json"


def write_report(control: str | Path, task: str, epoch: int, metrics: dict) -> Path:
    return atomic_write_json(report_path(control, task, epoch),
                             {"task": task, "epoch": epoch, "metrics": metrics, "pid": os.getpid()})


def write_decision(control: str | Path, task: str, epoch: int, prune: bool, reason: str = "") -> Path:
    return atomic_write_json(decision_path(control, task, epoch), {"prune": bool(prune), "reason": reason})


def read_json(path: Path) -> Optional[dict]:
    """The file's JSON object, or None while it does not exist (files are renamed into place whole)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def wait_for_decision(control: str | Path, task: str, epoch: int, *, wait_seconds: float = WAIT_SECONDS,
                      parent_alive: Callable[[], bool] = lambda: True) -> Optional[dict]:
    """The sweep's decision for (task, epoch); None when the parent died or `wait_seconds` passed."""
    path = decision_path(control, task, epoch)
    deadline = time.monotonic() + wait_seconds
    while True:
        decision = read_json(path)
        if decision is not None:
            return decision
        if not parent_alive() or time.monotonic() > deadline:
            return None
        time.sleep(POLL_SECONDS)


class SweepReporter(Callback):
    """Reports every epoch's dev metrics to the sweep in `control` and stops when it says prune."""

    def __init__(self, control: str | Path, wait_seconds: float = WAIT_SECONDS):
        self.control = Path(control)
        self.wait_seconds = wait_seconds
        self._parent = os.getppid()

    def _parent_alive(self) -> bool:
        return os.getppid() == self._parent  # an orphan is re-parented (to init or a subreaper)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> bool:
        decision = None
        if dist.is_main():
            task = trainer.task.name
            self.control.mkdir(parents=True, exist_ok=True)
            write_report(self.control, task, epoch, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            decision = wait_for_decision(self.control, task, epoch, wait_seconds=self.wait_seconds,
                                         parent_alive=self._parent_alive)
            if decision is None:
                say(f"[{task}] no decision from the sweep for epoch {epoch} (sweep gone or {self.wait_seconds:.0f} s "
                    f"passed): training on")
            elif decision.get("prune"):
                say(f"[{task}] pruned by the sweep after epoch {epoch}: {decision.get('reason', '')}")
        decision = dist.broadcast_object(decision)
        return bool(decision and decision.get("prune"))
