"""The skeleton every training script shares: flags -> typed config -> device, run directory, log,
tokenizer -> model -> `Trainer.fit` -> predictions.

    run = ScriptRun.start("classifier", args)        # validates every flag first (exit 2 on a bad one)
    model = run.build(GPT2LMHeadModel)               # --model_size / --init_checkpoint + overrides
    result = run.fit(model, task)                    # the shared trainer with the run's configs
    if result.interrupted: return                    # --stop_after_epoch: resumable

A script keeps only what is its own: its flags, how it reads and encodes its data, its TrainTask and
the prediction files it writes.  Every metrics log gets the sinks of `--report_to` (training/tracking.py),
and under `--sweep_control DIR` (set by sweep.py) every task a `SweepReporter` (training/pruning.py).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from training.build import build_model, load_tokenizer_for, seed_everything
from training.cli import build_configs, resolve_device
from training.config import RunConfig
from training.rundir import open_run_dir
from training.runlog import MetricsLog, say
from training.task import TrainTask
from training.trainer import FitResult, Trainer


@dataclass
class ScriptRun:
    script: str
    cfg: RunConfig
    device: torch.device
    run_dir: Path
    log: MetricsLog
    _tokenizer: object = field(default=None, repr=False)

    @classmethod
    def start(cls, script: str, args: argparse.Namespace, resume_free: Iterable[str] = ()) -> "ScriptRun":
        """Build and validate the configs, pick the device, open (and lock) the run directory, seed."""
        cfg = build_configs(args, resume_free)
        device = resolve_device(cfg.device)
        run_dir = open_run_dir(script, cfg.run_dir, cfg.train.resume)
        seed_everything(cfg.train.seed)
        return cls(script, cfg, device, run_dir, cls._metrics_log(cfg, script, run_dir))

    @staticmethod
    def _metrics_log(cfg: RunConfig, script: str, log_dir: Path, sub: Optional[str] = None) -> MetricsLog:
        """RUN_DIR[/sub]/metrics.jsonl, mirrored to the tracker of `--report_to` (rank 0 only)."""
        from training.distributed import is_main
        from training.tracking import build_sinks

        sinks = build_sinks(cfg.report_to, log_dir, name=f"{script}-{Path(cfg.run_dir or log_dir).name}",
                            hparams=cfg.signature, prefix=f"{sub}/" if sub else "") if is_main() else []
        return MetricsLog(log_dir / "metrics.jsonl", sinks)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer_for(self.cfg.model)
        return self._tokenizer

    def build(self, model_cls, **overrides):
        """The model of `--model_size` / `--init_checkpoint` with the flags' overrides, on the device,
        built right after seeding so its random parts (heads, tiny models) are reproducible."""
        seed_everything(self.cfg.train.seed)
        return build_model(model_cls, self.cfg.model, **overrides).to(self.device)

    def max_length(self, model) -> int:
        return self.cfg.model.max_length or model.config.max_position_embeddings

    def limit(self, items: Sequence) -> list:
        return list(items[: self.cfg.train.limit]) if self.cfg.train.limit else list(items)

    def say(self, message: str) -> None:
        say(message)

    def trainer(self, model, task: TrainTask, sub: Optional[str] = None, head=None) -> Trainer:
        """The shared trainer for `task`; `sub` keeps a task's checkpoints in RUN_DIR/sub (one run
        directory, several tasks; `--resume RUN_DIR` continues all of them)."""
        run_dir = self.run_dir / sub if sub else self.run_dir
        log = self._metrics_log(self.cfg, self.script, run_dir, sub) if sub else self.log
        if self.cfg.sweep_control:  # a sweep's trial: report every epoch, stop when pruned
            from training.pruning import SweepReporter

            task = replace(task, callbacks=[*task.callbacks, SweepReporter(self.cfg.sweep_control)])
        run_info = {"script": self.script, "task": task.name, "metric": task.metric,
                    "higher_is_better": task.higher_is_better, "model": asdict(self.cfg.model),
                    "efficiency": asdict(self.cfg.efficiency)}
        return Trainer(model, task, self.cfg.train, self.device, run_dir, log, resume_dir=self.run_dir,
                       efficiency=self.cfg.efficiency, signature=self.cfg.signature, run_info=run_info)

    def fit(self, model, task: TrainTask, sub: Optional[str] = None) -> FitResult:
        return self.trainer(model, task, sub).fit()
