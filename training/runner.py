"""The skeleton every training script shares: flags -> typed config -> device, run directory, log,
tokenizer -> model -> `Trainer.fit` -> predictions.

    run = ScriptRun.start("classifier", args)        # validates every flag first (exit 2 on a bad one)
    model = run.build(GPT2LMHeadModel)               # --model_size / --init_checkpoint + overrides
    result = run.fit(model, task)                    # the shared trainer; then --export_hf, if given
    if result.interrupted: return                    # --stop_after_epoch: resumable

A script keeps only what is its own: its flags, how it reads and encodes its data, its TrainTask and
the prediction files it writes.

Two start-up checks guard a run against inputs that do not match it: `data=` names the flags of the
files that decide what is trained (training and dev data); a SHA-256 of each goes into the run's
signature, so `--resume` after one of them changed is refused naming the file.  And the tokenizer
must fit the model: an id beyond the embedding would crash mid-training with an IndexError.

Every metrics log gets the sinks of `--report_to` (training/tracking.py),
and under `--sweep_control DIR` (set by sweep.py) every task a `SweepReporter` (training/pruning.py).
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from common.errors import CheckpointError, ConfigError
from models.hf_io import WeightsFileError
from training.build import build_model, load_tokenizer_for, seed_everything
from training.checkpoint import DATA_KEY
from training.cli import build_configs, resolve_device
from training.config import RunConfig
from training.rundir import open_run_dir
from training.runlog import MetricsLog, say
from training.task import TrainTask
from training.trainer import FitResult, Trainer, model_config


@dataclass
class ScriptRun:
    script: str
    cfg: RunConfig
    device: torch.device
    run_dir: Path
    log: MetricsLog
    _tokenizer: object = field(default=None, repr=False)

    @classmethod
    def start(cls, script: str, args: argparse.Namespace, resume_free: Iterable[str] = (),
              data: Iterable[str] = ()) -> "ScriptRun":
        """Build and validate the configs, pick the device, open (and lock) the run directory, seed.
        `data`: the flags (namespace fields) of the files that decide training, fingerprinted."""
        cfg = build_configs(args, resume_free)
        cfg.signature.update(data_fingerprints(args, data))
        return cls.from_config(script, cfg)

    @classmethod
    def from_config(cls, script: str, cfg: RunConfig) -> "ScriptRun":
        """`start` from an already validated RunConfig (an orchestrator running several trainings)."""
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
        try:
            model = build_model(model_cls, self.cfg.model, **overrides)
        except WeightsFileError as exc:
            raise CheckpointError(str(exc)) from None
        self.check_tokenizer(model)
        self._check_exportable(model.config)  # before training: a pattern from a checkpoint's config.json
        return model.to(self.device)

    def check_tokenizer(self, model) -> None:
        """ConfigError (field `tokenizer`) when the tokenizer can produce ids the model cannot embed."""
        config = model_config(model)
        n = len(self.tokenizer)
        if config is not None and n > config.vocab_size:
            raise ConfigError("tokenizer", f"the tokenizer has {n:,} tokens but the model ({self.cfg.model.spec}) "
                              f"embeds only {config.vocab_size:,}; use the tokenizer the model was made with")

    def max_length(self, model) -> int:
        return self.cfg.model.max_length or model.config.max_position_embeddings

    def limit(self, items: Sequence) -> list:
        return list(items[: self.cfg.train.limit]) if self.cfg.train.limit else list(items)

    def say(self, message: str) -> None:
        say(message)

    def trainer(self, model, task: TrainTask, sub: Optional[str] = None, head=None) -> Trainer:
        """The shared trainer for `task`; `sub` keeps a task's checkpoints in RUN_DIR/sub (one run
        directory, several tasks; `--resume RUN_DIR` continues all of them)."""
        self.check_tokenizer(model)
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

    def fit(self, model, task: TrainTask, sub: Optional[str] = None, trainer: Optional[Trainer] = None) -> FitResult:
        """Train `model` on `task` (with `trainer`, if the script made it with `self.trainer` to log into
        it first); a completed fit is then exported when `--export_hf` is given (`export`)."""
        result = (trainer or self.trainer(model, task, sub)).fit()
        if not result.interrupted:
            self.export(model, sub)
        return result

    # ---- --export_hf ----------------------------------------------------------------------------
    def _check_exportable(self, config) -> None:
        from models.hf_export import dense_in_transformers_warning

        note = dense_in_transformers_warning(config) if self.cfg.export_hf else None
        if note and not self.cfg.export_allow_dense:
            raise ConfigError("export_hf", f"{note}. Set export_allow_dense to export it anyway")

    def export(self, model, sub: Optional[str] = None) -> Optional[Path]:
        """`--export_hf DIR` (DIR/sub for a script that trains several models): the GPT-2 inside `model`
        (the LM itself, or a classifier's backbone; a task head is not part of a GPT-2 checkpoint) as a
        complete Hugging Face directory with the run's tokenizer (models/hf_export.py).  A LoRA model is
        exported with the adapters merged into the weights (merged on a copy: `model` keeps them), and
        the adapter itself goes to DIR/lora_adapter in peft's format, for `PeftModel.from_pretrained` on
        the base model; after `--merge_lora` it is read from the run's best.pt.  Rank 0 writes."""
        if not self.cfg.export_hf:
            return None
        import copy

        from models.hf_export import ADAPTER_DIR, save_hf_checkpoint
        from training import checkpoint, efficient
        from training.distributed import is_main

        target = Path(self.cfg.export_hf) / sub if sub else Path(self.cfg.export_hf)
        source, adapter = model, None
        if efficient.lora_settings(model) is not None:
            adapter = efficient.adapter_state(model)
            source = efficient.merge_lora(copy.deepcopy(model))
        elif self.cfg.efficiency.peft == "lora":  # --merge_lora merged them in place: the adapter of best.pt
            adapter = checkpoint.load(checkpoint.checkpoint_file(self.run_dir / sub if sub else self.run_dir))["model"]
        backbone = efficient._backbone(source)
        self._check_exportable(backbone.config)
        if is_main():
            save_hf_checkpoint(backbone, target, self.tokenizer, write_extra=None if adapter is None else (
                lambda tmp: efficient.save_peft_adapter(adapter, tmp / ADAPTER_DIR, self.cfg.model.spec)))
        self.log.write("export", dir=str(target), sub=sub, lora_adapter=adapter is not None)
        head = " (the GPT-2 backbone; the task head stays in the run's best.pt)" if getattr(model, "head_modules", None) else ""
        lora = f"; LoRA merged into the weights, the adapter in peft's format in {target / ADAPTER_DIR}" if adapter else ""
        self.say(f"exported the trained model to {target} in Hugging Face format{head}{lora}")
        return target


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprints(args: argparse.Namespace, flags: Iterable[str]) -> dict:
    """{DATA_KEY + flag: "sha256 <hex> of <path>"} for every existing file named by the flags (a flag
    may hold a list of paths; None and `none` are skipped)."""
    from training.cli import flag_for

    out = {}
    for name in flags:
        value = getattr(args, name, None)
        paths = value if isinstance(value, (list, tuple)) else [value]
        prints = [f"sha256 {file_sha256(p)} of {p}" for p in paths
                  if p is not None and str(p) != "none" and Path(p).is_file()]
        if prints:
            out[DATA_KEY + flag_for(name)] = prints[0] if len(prints) == 1 else prints
    return out
