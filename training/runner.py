"""The skeleton every training script shares: flags -> typed config -> device, run directory, log,
tokenizer -> model -> `Trainer.fit` -> predictions.

    run = ScriptRun.start("classifier", args)        # validates every flag first (exit 2 on a bad one)
    model = run.build(GPT2LMHeadModel)               # --model_size / --init_checkpoint + overrides
    result = run.fit(model, task)                    # the shared trainer with the run's configs
    if result.interrupted: return                    # --stop_after_epoch: resumable

A script keeps only what is its own: its flags, how it reads and encodes its data, its TrainTask and
the prediction files it writes.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
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
        return cls.from_config(script, build_configs(args, resume_free))

    @classmethod
    def from_config(cls, script: str, cfg: RunConfig) -> "ScriptRun":
        """`start` from an already validated RunConfig (an orchestrator running several trainings)."""
        device = resolve_device(cfg.device)
        run_dir = open_run_dir(script, cfg.run_dir, cfg.train.resume)
        seed_everything(cfg.train.seed)
        return cls(script, cfg, device, run_dir, MetricsLog(run_dir / "metrics.jsonl"))

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
        log = MetricsLog(run_dir / "metrics.jsonl") if sub else self.log
        run_info = {"script": self.script, "task": task.name, "model": asdict(self.cfg.model),
                    "efficiency": asdict(self.cfg.efficiency)}
        return Trainer(model, task, self.cfg.train, self.device, run_dir, log, resume_dir=self.run_dir,
                       efficiency=self.cfg.efficiency, signature=self.cfg.signature, run_info=run_info)

    def fit(self, model, task: TrainTask, sub: Optional[str] = None) -> FitResult:
        return self.trainer(model, task, sub).fit()
