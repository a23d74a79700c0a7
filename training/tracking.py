"""Experiment trackers as sinks of the metrics log (`training/runlog.py` `MetricsLog(path, sinks)`).

`metrics.jsonl` stays the source of truth: a tracker only mirrors the records the trainer writes
there, through the one `LogSink` interface (`write(event, record)`, `close()`), so every script gets
`--report_to` by building its log with `build_sinks` (training/runner.py does).

    tensorboard  event files in the run directory (one TensorBoard run per metrics log, so a
                 classifier's sst/ and cfimdb/ sub-runs appear side by side):
                   step/<key>   every `step` record (train_loss, lr, the task's loss terms) at the
                                optimiser step
                   epoch/<key>  the numbers of every `epoch` record (train loss, tokens/s, seconds, ...)
                   dev/<metric> the dev metrics, at the epoch
                 and, when the run is `done`, the run's flags as hparams with the best epoch's dev
                 metrics (`hparam/<metric>`), for TensorBoard's HParams tab.
    wandb        one wandb run per process (sub-runs prefixed by their task), offline unless
                 WANDB_MODE says otherwise; needs `pip install wandb` (a clear error when missing).
"""
from __future__ import annotations

import atexit
import math
import os
from pathlib import Path
from typing import Optional

from common.errors import ConfigError

# Keys of step / epoch records that are bookkeeping, not metrics.
SKIP_KEYS = {"event", "time", "task", "epoch", "step", "batch", "world_size", "best_epoch"}
FLUSH_EVENTS = {"epoch", "done"}


def _numbers(record: dict) -> dict[str, float]:
    """The finite numeric top-level values of a record (bools and bookkeeping keys left out)."""
    out = {}
    for k, v in record.items():
        if k in SKIP_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def hparam_value(value):
    """A flag value as TensorBoard's hparams accept it (bool, int, float or str)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "None" if value is None else str(value)


class TensorBoardSink:
    """Mirrors a metrics log into TensorBoard event files in `log_dir`."""

    def __init__(self, log_dir: str | Path, hparams: Optional[dict] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ConfigError("report_to", f"tensorboard needs the tensorboard package ({exc}); "
                              f"pip install -r requirements.txt, or use report_to none") from None
        self.log_dir = Path(log_dir)
        self._make = lambda: SummaryWriter(log_dir=str(self.log_dir))
        self._writer = None  # opened by the first record: a log that gets none leaves no event file
        self.hparams = {k.lstrip("-"): hparam_value(v) for k, v in (hparams or {}).items()}
        self._closed = False
        atexit.register(self.close)  # scripts do not close their log: flush what is left at exit

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._make()
        return self._writer

    def write(self, event: str, record: dict) -> None:
        if event not in ("step", "epoch", "done"):
            return
        w = self.writer
        if event == "step" and "step" in record:
            for k, v in _numbers(record).items():
                w.add_scalar(f"step/{k}", v, int(record["step"]))
        elif event == "epoch" and "epoch" in record:
            epoch = int(record["epoch"])
            for k, v in _numbers(record).items():
                w.add_scalar(f"epoch/{k}", v, epoch)
            for k, v in _numbers(record.get("dev") or {}).items():
                w.add_scalar(f"dev/{k}", v, epoch)
        elif event == "done":
            self._write_hparams(_numbers(record.get("best") or {}), record.get("best_epoch"))
        if event in FLUSH_EVENTS:
            w.flush()

    def _write_hparams(self, best: dict[str, float], best_epoch) -> None:
        """The flags as hparams, the best epoch's dev metrics as their metrics, in THIS run's event
        file (torch's `add_hparams` would open a new sub-run)."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"hparam/{k}": v for k, v in best.items()}
        if best_epoch is not None:
            metrics["hparam/best_epoch"] = float(best_epoch)
        if not self.hparams or not metrics:
            return
        for summary in hparams(self.hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v)

    def close(self) -> None:
        if not self._closed and self._writer is not None:
            self._closed = True
            self._writer.close()


class WandbSink:
    """Mirrors a metrics log into a wandb run (offline by default: WANDB_MODE=offline unless set)."""

    def __init__(self, run_dir: str | Path, name: str, config: Optional[dict] = None, prefix: str = ""):
        try:
            import wandb
        except ImportError:
            raise ConfigError("report_to", "wandb is not installed: pip install wandb (it runs offline unless "
                              "WANDB_MODE=online), or use report_to tensorboard or none") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self.wandb, self.prefix = wandb, prefix
        self.run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", "gpt2-cs224n"), name=name,
                                           dir=str(run_dir), config={k.lstrip("-"): hparam_value(v)
                                                                     for k, v in (config or {}).items()})
        self.run.define_metric(f"{prefix}optimizer_step")
        self.run.define_metric(f"{prefix}step/*", step_metric=f"{prefix}optimizer_step")
        self.run.define_metric(f"{prefix}epoch")
        for group in ("epoch", "dev"):
            self.run.define_metric(f"{prefix}{group}/*", step_metric=f"{prefix}epoch")
        self._closed = False
        atexit.register(self.close)

    def write(self, event: str, record: dict) -> None:
        p = self.prefix
        if event == "step" and "step" in record:
            self.run.log({f"{p}optimizer_step": int(record["step"]),
                          **{f"{p}step/{k}": v for k, v in _numbers(record).items()}})
        elif event == "epoch" and "epoch" in record:
            self.run.log({f"{p}epoch": int(record["epoch"]),
                          **{f"{p}epoch/{k}": v for k, v in _numbers(record).items()},
                          **{f"{p}dev/{k}": v for k, v in _numbers(record.get("dev") or {}).items()}})
        elif event == "done":
            for k, v in _numbers(record.get("best") or {}).items():
                self.run.summary[f"{p}best/{k}"] = v

    def close(self) -> None:
        if not self._closed and not self.prefix:  # the sub-runs' sinks share the process's run
            self._closed = True
            self.run.finish()


def build_sinks(report_to: str, log_dir: str | Path, *, name: str, hparams: Optional[dict] = None,
                prefix: str = "") -> list:
    """The sinks of one metrics log in `log_dir` for `report_to` (none | tensorboard | wandb).
    `prefix` names a sub-run (a classifier's dataset) inside the process's one wandb run."""
    if report_to == "none":
        return []
    if report_to == "tensorboard":
        return [TensorBoardSink(log_dir, hparams)]
    if report_to == "wandb":
        return [WandbSink(log_dir, name, hparams, prefix)]
    raise ConfigError("report_to", f"{report_to!r} is not one of none, tensorboard, wandb")
