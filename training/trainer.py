"""The one training loop every script shares.

A script describes its task with a `TrainTask` (how to batch the training examples, the loss of a
batch, how to evaluate on dev, which dev metric picks the best epoch) and hands it to `Trainer.fit`.
The loop does the rest: AdamW (ours) with weight decay only on trainable tensors of >= 2 dims,
linear warm-up then linear decay, autocast (`--precision`), gradient accumulation and clipping,
length-bucketed batches, dev evaluation after every epoch keeping the best weights, atomic
checkpoints with every RNG state, exact `--resume`, tqdm bars and a JSON-lines metrics log.

Files in the run directory: `metrics.jsonl`, `last.pt` (everything needed to resume), `best.pt`
(model state of the best epoch).  After `fit` the model holds the best epoch's weights.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from training import checkpoint
from training.batching import bucketed_batches
from training.build import autocast, count_parameters

# Flags that may differ between a run and its resumption.
_RESUME_FREE = {"resume", "run_dir", "stop_after_epoch", "no_progress"}
LOG_EVERY = 10  # batches between progress-bar updates (each reads the loss back from the device)


@dataclass
class TrainTask:
    name: str
    train_lengths: Sequence[int]  # token length of each training example (for bucketing)
    make_batch: Callable[[list[int]], dict]  # training indices -> dict of CPU tensors (other values passed as is)
    loss: Callable[[nn.Module, dict], tuple[torch.Tensor, int]]  # batch on device -> (mean loss, tokens as int)
    evaluate: Callable[[nn.Module], dict]  # dev metrics; called in eval mode under no_grad
    metric: str  # key of `evaluate`'s dict that selects the best epoch
    higher_is_better: bool = True


@dataclass
class FitResult:
    best_metrics: dict = field(default_factory=dict)
    best_epoch: Optional[int] = None
    interrupted: bool = False


class MetricsLog:
    """Append-only JSON-lines log, one record per event."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "time": round(time.time(), 3), **record}) + "\n")


def plain_args(args: argparse.Namespace) -> dict:
    ok = (int, float, str, bool, type(None))
    return {k: (v if isinstance(v, ok) or (isinstance(v, list) and all(isinstance(x, ok) for x in v)) else str(v))
            for k, v in vars(args).items()}


def default_run_dir(args: argparse.Namespace, script: str) -> Path:
    """`--resume DIR` > `--run_dir DIR` > runs/<script>-<UTC timestamp>."""
    if args.resume:
        path = Path(args.resume)
        if not path.is_dir():
            raise SystemExit(f"--resume {args.resume}: no such run directory")
        return path
    if args.run_dir:
        return Path(args.run_dir)
    return Path("runs") / f"{script}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over `warmup_steps`, then linear decay to 1/(decay steps) at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def make_optimizer(model: nn.Module, lr: float, weight_decay: float):
    from optimizer import AdamW

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    decay = [p for _, p in trainable if p.dim() >= 2]
    no_decay = [p for _, p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


class Trainer:
    def __init__(self, model: nn.Module, task: TrainTask, args: argparse.Namespace, device: torch.device,
                 run_dir: Path, log: Optional[MetricsLog] = None, resume_dir: Optional[Path] = None):
        """`resume_dir`: what `--resume` takes to continue this run (default `run_dir`; scripts that
        train several tasks keep each in a sub-directory of one run directory)."""
        self.model, self.task, self.args, self.device = model, task, args, device
        self.run_dir = Path(run_dir)
        self.resume_dir = Path(resume_dir or run_dir)
        self.log = log or MetricsLog(self.run_dir / "metrics.jsonl")

    # ---- helpers ----------------------------------------------------------------------------
    def _better(self, value: float, best: Optional[float]) -> bool:
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    def _module(self) -> nn.Module:
        return getattr(self.model, "_orig_mod", self.model)  # the uncompiled module under torch.compile

    def _check_resume_args(self, saved: dict) -> None:
        now = plain_args(self.args)
        diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
                if k not in _RESUME_FREE and saved.get(k) != now.get(k)}
        if diff:
            lines = ", ".join(f"--{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise SystemExit(f"--resume {self.resume_dir}: the run was started with other arguments ({lines}); "
                             f"resume with the same arguments")

    def _evaluate(self) -> dict:
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model)
        if self.task.metric not in metrics:
            raise KeyError(f"task {self.task.name}: evaluate() returned {sorted(metrics)}, lacks {self.task.metric!r}")
        return metrics

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> FitResult:
        args, task, device, model = self.args, self.task, self.device, self.model
        n_batches = math.ceil(len(task.train_lengths) / args.batch_size)
        steps_per_epoch = math.ceil(n_batches / args.grad_accum)
        total_steps = max(1, args.epochs * steps_per_epoch)
        warmup = int(args.warmup_ratio * total_steps)
        opt = make_optimizer(model, args.lr, args.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup, total_steps))
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        data_gen = torch.Generator().manual_seed(args.seed)
        trainable, total = count_parameters(model)
        start_epoch, best, best_epoch, best_metrics = 0, None, None, {}
        last_path, best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"

        if args.resume and last_path.is_file():
            ckpt = checkpoint.load(last_path)
            self._check_resume_args(ckpt["args"])
            self._module().load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            checkpoint.set_rng_state(ckpt["rng"], data_gen)
            start_epoch, best, best_epoch = ckpt["epoch"], ckpt["best_metric"], ckpt["best_epoch"]
            best_metrics = ckpt["best_metrics"]
            self.log.write("resume", task=task.name, epoch=start_epoch)
            print(f"[{task.name}] resumed {last_path} after epoch {start_epoch}")
        else:
            if last_path.exists() or best_path.exists():
                raise SystemExit(f"{self.run_dir} already holds a run's checkpoints; continue that run with "
                                 f"--resume RUN_DIR, or choose another --run_dir")
            self.log.write("start", task=task.name, trainable_params=trainable, total_params=total,
                           train_examples=len(task.train_lengths), steps=total_steps, warmup_steps=warmup,
                           args=plain_args(args))
        print(f"[{task.name}] parameters: {trainable:,} trainable / {total:,} total; "
              f"{len(task.train_lengths):,} training examples, {total_steps} optimiser steps; run dir {self.run_dir}")

        for epoch in range(start_epoch, args.epochs):
            if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
                self.log.write("stopped", task=task.name, epoch=epoch)
                print(f"[{task.name}] stopped after epoch {epoch} (--stop_after_epoch); continue with --resume {self.resume_dir}")
                return FitResult(best_metrics, best_epoch, interrupted=True)
            train_stats = self.train_epoch(epoch, opt, sched, scaler, data_gen)
            metrics = self._evaluate()
            improved = self._better(metrics[task.metric], best)
            if improved:
                best, best_epoch, best_metrics = metrics[task.metric], epoch + 1, metrics
                checkpoint.save_atomic({"model": self._module().state_dict(), "epoch": epoch + 1,
                                        "metrics": metrics}, best_path)
            checkpoint.save_atomic({
                "model": self._module().state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "rng": checkpoint.rng_state(data_gen), "epoch": epoch + 1, "best_metric": best,
                "best_epoch": best_epoch, "best_metrics": best_metrics, "args": plain_args(args),
            }, last_path)
            self.log.write("epoch", task=task.name, epoch=epoch + 1, **train_stats,
                           dev=metrics, best_epoch=best_epoch)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"[{task.name}] epoch {epoch + 1}: train loss {train_stats['train_loss']:.4f}, "
                  f"{train_stats['tokens_per_s']:.0f} tokens/s; dev {shown}{' (best)' if improved else ''}")

        if best_path.is_file():
            self._module().load_state_dict(checkpoint.load(best_path)["model"])
        else:  # no epoch trained (--epochs 0): evaluate the model as it is
            best_metrics = self._evaluate()
        self.log.write("done", task=task.name, best_epoch=best_epoch, best=best_metrics)
        return FitResult(best_metrics, best_epoch, interrupted=False)

    def train_epoch(self, epoch: int, opt, sched, scaler, data_gen: torch.Generator) -> dict:
        """One pass over the training batches (no evaluation, no checkpoint); returns its statistics."""
        args, task, device, model = self.args, self.task, self.device, self.model
        model.train()
        batches = bucketed_batches(task.train_lengths, args.batch_size, data_gen)
        n = len(batches)
        params = [p for p in model.parameters() if p.requires_grad]
        loss_sum = torch.zeros((), device=device)  # on the device: no host sync per step
        total_loss, total_tokens, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        bar = tqdm(batches, desc=f"{task.name} epoch {epoch + 1}/{args.epochs}", disable=args.no_progress,
                   leave=False, dynamic_ncols=True)
        opt.zero_grad(set_to_none=True)
        for i, indices in enumerate(bar):
            group_start = (i // args.grad_accum) * args.grad_accum
            group_size = min(args.grad_accum, n - group_start)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in task.make_batch(indices).items()}
            with autocast(device, args.precision):
                loss, tokens = task.loss(model, batch)
            scaler.scale(loss / group_size).backward()
            loss_sum += loss.detach().float() * len(indices)
            seen += len(indices)
            total_tokens += int(tokens)
            if i + 1 == group_start + group_size:
                if args.max_grad_norm > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if (i + 1) % LOG_EVERY == 0 or i + 1 == n:  # read the loss back only now and then
                total_loss = loss_sum.item()
                if not math.isfinite(total_loss):
                    raise FloatingPointError(f"[{task.name}] non-finite loss in epoch {epoch + 1} by batch {i + 1}; "
                                             f"lower --lr or use --precision fp32/bf16")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", tok_s=f"{total_tokens / max(elapsed, 1e-9):.0f}")
        elapsed = time.perf_counter() - t0
        return {"train_loss": total_loss / max(seen, 1), "tokens": total_tokens, "seconds": round(elapsed, 3),
                "tokens_per_s": total_tokens / max(elapsed, 1e-9), "lr": sched.get_last_lr()[0]}
