"""The one training loop every script shares.

A script describes its task with a `TrainTask` (training/task.py: batches, loss, dev evaluation,
the metric that picks the best epoch, and `Callback`s for anything else) and hands it, with its
typed `TrainConfig`, to `Trainer.fit`.  The loop does the rest: the optimiser and schedule chosen by
name (training/optimizers.py; our AdamW by default, weight decay only on trainable tensors of >= 2
dims), autocast (`precision`), gradient accumulation and clipping, length-bucketed batches, dev
evaluation after every epoch keeping the best weights, early stopping (`patience`), atomic
checksummed checkpoints with every RNG state and the callbacks' state, exact `--resume`, tqdm bars
and the JSON-lines metrics log (training/runlog.py).

Speed and scale (training/speed.py, training/distributed.py): TF32 matmuls on CUDA, `compile`
(the model and the task's loss compiled together; checkpoints come from the uncompiled module),
pinned memory and non-blocking copies on CUDA, no host sync inside a step except every LOG_EVERY
batches, tokens/s and MFU in the log; under torchrun DDP (or FSDP2 with `fsdp`): every rank builds
the same global batches of `batch_size * world` examples and trains on its share, only rank 0
writes files.

Files in the run directory: `metrics.jsonl`, `last.pt` (everything needed to resume), `best.pt`
(model state and outputs of the best epoch).  After `fit` the model holds the best epoch's weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from common.errors import CheckpointError, UserError
from common.params import count_parameters
from training import checkpoint, efficient
from training import distributed as dist
from training.batching import bucketed_batches
from training.build import autocast
from training.config import EfficiencyConfig, TrainConfig
from training.optimizers import build_optimizer, linear_schedule, lr_schedule, make_optimizer  # noqa: F401
from training.runlog import MetricsLog, say
from training.speed import enable_tf32, flops_per_token, matmul_params, maybe_compile, mfu, peak_flops
from training.task import Callback, Evaluation, TrainTask, as_evaluation, split_loss  # noqa: F401

LOG_EVERY = 10  # batches between progress-bar updates and `step` records (each reads the loss back)


@dataclass
class FitResult:
    best_metrics: dict = field(default_factory=dict)
    best_epoch: Optional[int] = None
    interrupted: bool = False  # stopped by stop_after_epoch: resumable
    best_outputs: dict = field(default_factory=dict)  # the best epoch's Evaluation.outputs
    stopped_early: Optional[str] = None  # why training ended before `epochs` (patience, a callback)


@dataclass
class FitState:
    """Everything the loop carries from epoch to epoch (and saves in last.pt)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    data_gen: torch.Generator
    total_steps: int
    warmup_steps: int
    epoch: int = 0
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    best_metrics: dict = field(default_factory=dict)
    best_outputs: dict = field(default_factory=dict)
    stopped: Optional[str] = None


class TaskStep(nn.Module):
    """The model and the task's loss as one module, so that DDP/FSDP see the whole forward (tasks may
    call `model.gpt` directly) and `compile` compiles the loss with the model."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict):
        return self.loss(self.model, batch)


def model_config(model: nn.Module):
    """The GPT2Config inside a task model (for FLOPs), or None."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            return cfg
    return None


class Trainer:
    def __init__(self, model: nn.Module, task: TrainTask, config: TrainConfig, device: torch.device,
                 run_dir: Path, log: Optional[MetricsLog] = None, resume_dir: Optional[Path] = None,
                 efficiency: Optional[EfficiencyConfig] = None, signature: Optional[dict] = None,
                 run_info: Optional[dict] = None):
        """`resume_dir`: what `--resume` takes to continue this run (default `run_dir`; scripts that
        train several tasks keep each in a sub-directory of one run directory).  `signature`: the
        settings ({flag: value}) a resumed run must share with this one.  `run_info`: what built
        the model (saved in the checkpoints, for loaders)."""
        self.model, self.task, self.cfg, self.device = model, task, config, device
        self.run_dir = Path(run_dir)
        self.resume_dir = Path(resume_dir or run_dir)
        self.log = log or MetricsLog(self.run_dir / "metrics.jsonl")
        self.signature, self.run_info = dict(signature or {}), dict(run_info or {})
        # LoRA / freezing / gradient checkpointing, applied once before the optimiser sees the parameters.
        self.efficiency = efficient.prepare_model(self.model, efficiency or EfficiencyConfig())
        if device.type == "cuda":
            enable_tf32()
        for cb in task.callbacks:  # the plain model, before any wrapper (FSDP runs nothing before its root forward)
            cb.on_model_ready(self)
        # What runs the training step: model + loss, wrapped for several ranks, maybe compiled.
        self.engine = maybe_compile(dist.wrap_model(TaskStep(model, task.loss), device, config.fsdp), config.compile)
        self.world = dist.world_size()
        cfg = model_config(model)
        self._flops = (matmul_params(model), cfg.num_hidden_layers, cfg.hidden_size) if cfg else None
        self._peak = peak_flops(device, config.precision, config.peak_flops)
        self.state: Optional[FitState] = None

    @property
    def resuming(self) -> bool:
        """Whether `fit` continues the run in run_dir (--resume and a last.pt there): the one decision,
        also for callbacks that run before it (`on_model_ready`)."""
        return bool(self.cfg.resume) and (self.run_dir / "last.pt").is_file()

    def say(self, message: str) -> None:
        say(f"[{self.task.name}] {message}")

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> FitResult:
        state = self.state = self._make_state()
        self._start_or_resume(state)
        for cb in self.task.callbacks:
            cb.on_fit_start(self)
        while state.epoch < self.cfg.epochs and state.stopped is None:
            if self.cfg.stop_after_epoch is not None and state.epoch >= self.cfg.stop_after_epoch:
                self.log.write("stopped", task=self.task.name, epoch=state.epoch)
                self.say(f"stopped after epoch {state.epoch} (--stop_after_epoch); continue with --resume {self.resume_dir}")
                dist.keep_full_params(self.engine)
                return FitResult(state.best_metrics, state.best_epoch, True, state.best_outputs)
            if self.world > 1:  # each rank its own dropout masks, reproducible and resumable by epoch
                torch.manual_seed(self.cfg.seed + 1_000_003 * (state.epoch + 1) + dist.rank())
            stats = self.train_epoch(state)
            self._end_epoch(state, stats, self._evaluate())
        return self._finish(state)

    def _make_state(self) -> FitState:
        cfg, task = self.cfg, self.task
        n_batches = math.ceil(len(task.train_lengths) / (cfg.batch_size * self.world))
        total = max(1, cfg.epochs * math.ceil(n_batches / cfg.grad_accum))
        warmup = int(cfg.warmup_ratio * total)
        extra = [g for cb in task.callbacks for g in cb.param_groups(self.model)]
        opt = build_optimizer(self.model, cfg, extra)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg.lr_schedule, warmup, total))
        if dist.is_fsdp(self.engine) and cfg.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            scaler = ShardedGradScaler(self.device.type)
        else:
            scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        return FitState(opt, sched, scaler, torch.Generator().manual_seed(cfg.seed), total, warmup)

    def _start_or_resume(self, state: FitState) -> None:
        task, last, best = self.task, self.run_dir / "last.pt", self.run_dir / "best.pt"
        efficient.reset_peak_memory(self.device)
        self._clean_leftovers(best, last)
        if self.resuming:
            self._restore(state, checkpoint.load(last))
            self.log.write("resume", task=task.name, epoch=state.epoch)
            self.say(f"resumed {last} after epoch {state.epoch}")
        elif last.exists() or best.exists():
            raise UserError(f"{self.run_dir} already holds a run's checkpoints; continue that run with "
                            f"--resume {self.resume_dir}, or choose another --run_dir")
        else:
            trainable, total = count_parameters(self.model)
            report = efficient.efficiency_report(self.model, self.device)
            self.log.write("start", task=task.name, trainable_params=trainable, total_params=total,
                           trainable_pct=report["trainable_pct"], efficiency=self.efficiency,
                           train_examples=len(task.train_lengths), steps=state.total_steps,
                           warmup_steps=state.warmup_steps, args=self.signature, run=self.run_info)
        self._announce(state)

    def _clean_leftovers(self, best: Path, last: Path) -> None:
        """Drop the temporary files of interrupted checkpoint writes.  Resuming, a best.pt without
        last.pt (a kill while the first last.pt was written) cannot be resumed from, so the run
        starts over, which ends exactly where an uninterrupted run would."""
        if dist.is_main():
            for tmp in self.run_dir.glob(".*.pt.*.tmp"):
                tmp.unlink(missing_ok=True)
            if self.cfg.resume and best.is_file() and not last.is_file():
                best.unlink()
                self.say(f"{self.run_dir} has no last.pt (interrupted while writing the first checkpoint): "
                         f"starting the run from the beginning")
        dist.barrier()  # no rank looks at the checkpoints before they are cleaned

    def _restore(self, state: FitState, ckpt: dict) -> None:
        checkpoint.check_signature(ckpt.get("signature", {}), self.signature, self.resume_dir)
        dist.load_full_state_dict(self.model, ckpt["model"], state.optimizer, ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        state.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"], state.data_gen)
        state.epoch, state.best, state.best_epoch = ckpt["epoch"], ckpt["best_metric"], ckpt["best_epoch"]
        state.best_metrics, state.stopped = ckpt["best_metrics"], ckpt.get("stopped")
        saved_cbs = ckpt.get("callbacks", [])
        if len(saved_cbs) != len(self.task.callbacks):
            raise UserError(f"--resume {self.resume_dir}: the checkpoint holds the state of {len(saved_cbs)} "
                            f"callback(s), the task has {len(self.task.callbacks)}")
        for cb, cb_state in zip(self.task.callbacks, saved_cbs):
            cb.load_state_dict(cb_state)
        best = self.run_dir / "best.pt"
        if best.is_file():
            self._restore_best(state, checkpoint.load(best), ckpt["epoch"], best)

    def _restore_best(self, state: FitState, saved: dict, last_epoch: int, path: Path) -> None:
        """The best epoch's outputs.  A best.pt newer than last.pt was written in the epoch that was
        interrupted before its last.pt: it is that epoch's result, so it becomes the best so far (the
        epoch is trained again and compared with it, as an uninterrupted run would have)."""
        epoch = saved.get("epoch")
        if epoch is not None and epoch > last_epoch:
            state.best, state.best_epoch = saved["metrics"][self.task.metric], epoch
            state.best_metrics = saved["metrics"]
            self.say(f"{path} is from epoch {epoch}, interrupted before its last.pt was written; it is kept as the "
                     f"best so far")
        elif epoch != state.best_epoch:
            raise CheckpointError(f"{path} holds epoch {epoch} but {path.parent / 'last.pt'} says the best epoch is "
                                  f"{state.best_epoch}; the run directory was changed by hand: remove best.pt and "
                                  f"last.pt to start over, or restore both")
        state.best_outputs = saved.get("outputs", {})

    def _announce(self, state: FitState) -> None:
        cfg, task = self.cfg, self.task
        trainable, total = count_parameters(self.model)
        self.say(f"parameters: {trainable:,} trainable / {total:,} total; {len(task.train_lengths):,} training "
                 f"examples, {state.total_steps} optimiser steps; run dir {self.run_dir}")
        effective = cfg.batch_size * self.world * cfg.grad_accum
        self.log.write("scale", task=task.name, world_size=self.world, per_rank_batch=cfg.batch_size,
                       grad_accum=cfg.grad_accum, effective_batch=effective,
                       engine="fsdp" if dist.is_fsdp(self.engine) else "ddp" if self.world > 1 else "single",
                       compile=cfg.compile, peak_flops=self._peak)
        self.say(efficient.format_report(efficient.efficiency_report(self.model, self.device)))
        self.say(f"effective batch {effective} = {cfg.batch_size} per rank x {self.world} rank(s) x {cfg.grad_accum} "
                 f"accumulation step(s)" + ("" if self._peak else "; MFU not reported (no peak FLOP/s known for "
                                                                   "this device; give --peak_flops)"))

    def _evaluate(self) -> Evaluation:
        self.engine.eval()
        with torch.no_grad(), dist.full_params(self.engine):
            result = as_evaluation(self.task.evaluate(self.model))
        if self.task.metric not in result.metrics:
            raise KeyError(f"task {self.task.name}: evaluate() returned {sorted(result.metrics)}, "
                           f"lacks {self.task.metric!r}")
        return result

    def _better(self, value: float, best: Optional[float]) -> bool:
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    def _end_epoch(self, state: FitState, stats: dict, result: Evaluation) -> None:
        """Best-epoch bookkeeping, checkpoints, the epoch record, early stopping and callbacks."""
        task, metrics = self.task, result.metrics
        state.epoch += 1
        improved = self._better(metrics[task.metric], state.best)
        model_state, opt_state = dist.full_state_dict(self.model, state.optimizer)  # a collective under FSDP
        if improved:
            state.best, state.best_epoch, state.best_metrics = metrics[task.metric], state.epoch, metrics
            state.best_outputs = result.outputs
            self._save({"model": model_state, "epoch": state.epoch, "metrics": metrics, "outputs": result.outputs,
                        "run": self.run_info}, self.run_dir / "best.pt")
        stop = [cb for cb in task.callbacks if cb.on_epoch_end(self, state.epoch, metrics)]
        if self.cfg.patience is not None and state.epoch - state.best_epoch >= self.cfg.patience:
            state.stopped = f"no better dev {task.metric} for {self.cfg.patience} epoch(s) (--patience)"
        elif stop:
            state.stopped = f"{type(stop[0]).__name__} ended training"
        self._save({
            "model": model_state, "optimizer": opt_state, "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(), "rng": checkpoint.rng_state(state.data_gen), "epoch": state.epoch,
            "best_metric": state.best, "best_epoch": state.best_epoch, "best_metrics": state.best_metrics,
            "stopped": state.stopped, "callbacks": [cb.state_dict() for cb in task.callbacks],
            "signature": self.signature, "run": self.run_info,
        }, self.run_dir / "last.pt")
        dist.barrier()  # the checkpoints are on disk before any rank reads them
        report = efficient.efficiency_report(self.model, self.device)
        self.log.write("epoch", task=task.name, epoch=state.epoch, **stats, dev=metrics, best_epoch=state.best_epoch,
                       peak_memory_bytes=report["peak_memory_bytes"], peak_memory_kind=report["peak_memory_kind"])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        mfu_text = f", MFU {stats['mfu']:.1%}" if stats.get("mfu") is not None else ""
        self.say(f"epoch {state.epoch}: train loss {stats['train_loss']:.4f}, {stats['tokens_per_s']:.0f} tokens/s"
                 f"{mfu_text}; dev {shown}{' (best)' if improved else ''}")
        if state.stopped:
            self.log.write("early_stop", task=task.name, epoch=state.epoch, reason=state.stopped)
            self.say(f"stopping after epoch {state.epoch}: {state.stopped}")

    def _finish(self, state: FitState) -> FitResult:
        best = self.run_dir / "best.pt"
        if best.is_file():
            dist.load_full_state_dict(self.model, checkpoint.load(best)["model"])
        else:  # no epoch trained (epochs 0): evaluate the model as it is
            result = self._evaluate()
            state.best_metrics, state.best_outputs = result.metrics, result.outputs
        dist.keep_full_params(self.engine)  # FSDP: the scripts' predictions after fit need whole weights
        report = efficient.efficiency_report(self.model, self.device)
        self.say(efficient.format_report(report))
        if self.efficiency.get("merge_lora"):
            efficient.merge_lora(self.model)
            self.say("merged the LoRA adapters into the weights (--merge_lora)")
        self.log.write("done", task=self.task.name, best_epoch=state.best_epoch, best=state.best_metrics,
                       stopped_early=state.stopped,
                       **{k: report[k] for k in ("trainable_params", "total_params", "trainable_pct",
                                                 "peak_memory_bytes", "peak_memory_kind")})
        return FitResult(state.best_metrics, state.best_epoch, False, state.best_outputs, state.stopped)

    def _save(self, obj: dict, path: Path) -> None:
        if dist.is_main():
            checkpoint.save_atomic(obj, path)

    # ---- one epoch --------------------------------------------------------------------------
    def _to_device(self, value):
        if not torch.is_tensor(value):
            return value
        if self.device.type == "cuda":  # page-locked host memory: the copy runs asynchronously
            return value.pin_memory().to(self.device, non_blocking=True)
        return value.to(self.device)

    def train_epoch(self, state: FitState) -> dict:
        """One pass over the training batches (no evaluation, no checkpoint); returns its statistics.

        Every rank draws the same global batches (`batch_size * world` examples, length-bucketed with
        the shared seed) and trains on its strided share; the only host syncs are the loss read-backs
        every LOG_EVERY batches and at the end."""
        cfg, task, device, engine = self.cfg, self.task, self.device, self.engine
        opt, sched, scaler = state.optimizer, state.scheduler, state.scaler
        engine.train()
        batches = bucketed_batches(task.train_lengths, cfg.batch_size * self.world, state.data_gen)
        n = len(batches)
        params = [p for g in opt.param_groups for p in g["params"]]
        sums = {"loss": torch.zeros((), device=device)}  # on the device: no host sync per step
        window = {"loss": torch.zeros((), device=device)}
        total_tokens, seen, window_seen, flops = 0, 0, 0, 0.0
        totals: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(batches, desc=f"{task.name} epoch {state.epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or not dist.is_main(), leave=False, dynamic_ncols=True)
        opt.zero_grad(set_to_none=True)
        for i, global_batch in enumerate(bar):
            group_start = (i // cfg.grad_accum) * cfg.grad_accum
            group_size = min(cfg.grad_accum, n - group_start)
            indices, weight = dist.local_share(global_batch)
            batch = {k: self._to_device(v) for k, v in task.make_batch(indices).items()}
            last_micro = i + 1 == group_start + group_size
            with dist.no_sync(engine, skip=not last_micro):  # accumulate locally, all-reduce once per step
                with autocast(device, cfg.precision):
                    loss, tokens, logs = split_loss(engine(batch))
                scaler.scale(loss * (weight / group_size)).backward()
            for cb in task.callbacks:
                cb.on_micro_batch_end(self, batch)
            share = len(indices) * (weight > 0)
            for name, value in (("loss", loss), *logs.items()):
                term = value.detach().float() * share
                sums[name] = sums.get(name, 0) + term
                window[name] = window.get(name, 0) + term
            seen += len(global_batch)
            window_seen += len(global_batch)
            total_tokens += int(tokens) * (weight > 0)
            if self._flops:
                n_params, n_layer, hidden = self._flops
                seq = max(task.train_lengths[j] for j in indices)
                flops += int(tokens) * (weight > 0) * flops_per_token(n_params, n_layer, seq, hidden)
            if last_micro:
                if cfg.max_grad_norm > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
                for cb in task.callbacks:
                    cb.on_step_end(self, sched.last_epoch)
            if (i + 1) % LOG_EVERY == 0 or i + 1 == n:  # read the loss back only now and then
                totals, recent = self._read_back(sums, seen, window, window_seen, state.epoch, i)
                window = {k: torch.zeros((), device=device) for k in window}
                window_seen = 0
                elapsed = time.perf_counter() - t0
                self.log.write("step", task=task.name, epoch=state.epoch + 1, step=sched.last_epoch, batch=i + 1,
                               lr=sched.get_last_lr()[0], **{f"train_{k}": v for k, v in recent.items()})
                bar.set_postfix(loss=f"{totals['loss']:.4f}",
                                tok_s=f"{total_tokens * self.world / max(elapsed, 1e-9):.0f}")
        elapsed = time.perf_counter() - t0
        total_tokens, flops = dist.all_reduce_sum([total_tokens, flops], device)
        tokens_per_s = total_tokens / max(elapsed, 1e-9)
        util = mfu(tokens_per_s / self.world, flops / max(total_tokens, 1), self._peak)
        out = {"train_loss": totals.get("loss", 0.0), "tokens": int(total_tokens), "seconds": round(elapsed, 3),
               "tokens_per_s": tokens_per_s, "flops_per_token": flops / max(total_tokens, 1),
               "mfu": util, "world_size": self.world, "lr": sched.get_last_lr()[0]}
        out.update({f"train_{k}": v for k, v in totals.items() if k != "loss"})
        return out

    def _read_back(self, sums: dict, seen: int, window: dict, window_seen: int, epoch: int, batch: int):
        """Example-weighted means of the summed terms, over the epoch and over the recent window, over
        all ranks: one host sync."""
        names = sorted(sums)
        stacked = torch.stack([torch.as_tensor(d[k], device=self.device).float() for d in (sums, window) for k in names])
        values = dist.all_reduce_sum(stacked.double().tolist(), self.device)
        totals = {k: v / max(seen, 1) for k, v in zip(names, values[:len(names)])}
        recent = {k: v / max(window_seen, 1) for k, v in zip(names, values[len(names):])}
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"[{self.task.name}] non-finite loss in epoch {epoch + 1} by batch {batch + 1}; "
                                     f"lower --lr or use --precision fp32/bf16")
        return totals, recent
