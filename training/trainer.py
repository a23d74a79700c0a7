"""The one training loop every script shares.

A script describes its task with a `TrainTask` (how to batch the training examples, the loss of a
batch, how to evaluate on dev, which dev metric picks the best epoch) and hands it to `Trainer.fit`.
The loop does the rest: AdamW (ours) with weight decay only on trainable tensors of >= 2 dims,
linear warm-up then linear decay, autocast (`--precision`), gradient accumulation and clipping,
length-bucketed batches, dev evaluation after every epoch keeping the best weights, atomic
checkpoints with every RNG state, exact `--resume`, tqdm bars and a JSON-lines metrics log.

Speed and scale (training/speed.py, training/distributed.py): TF32 matmuls on CUDA, `--compile`
(the model and the task's loss compiled together; checkpoints come from the uncompiled module),
pinned memory and non-blocking copies on CUDA, no host sync inside a step except every LOG_EVERY
batches, tokens/s and MFU in the log; under torchrun DDP (or FSDP2 with `--fsdp`): every rank builds
the same global batches of `batch_size * world` examples and trains on its share, only rank 0
writes files.

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

from training import checkpoint, efficient
from training import distributed as dist
from training.batching import bucketed_batches
from training.build import autocast, count_parameters
from training.speed import enable_tf32, flops_per_token, matmul_params, maybe_compile, mfu, peak_flops

# Flags that may differ between a run and its resumption.
_RESUME_FREE = {"resume", "run_dir", "stop_after_epoch", "no_progress", "compile", "peak_flops",
               "merge_lora"}  # merge_lora acts after training
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
        if not dist.is_main():  # only rank 0 writes files
            return
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


class TaskStep(nn.Module):
    """The model and the task's loss as one module, so that DDP/FSDP see the whole forward (tasks may
    call `model.gpt` directly) and `--compile` compiles the loss with the model."""

    def __init__(self, model: nn.Module, loss: Callable):
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
    def __init__(self, model: nn.Module, task: TrainTask, args: argparse.Namespace, device: torch.device,
                 run_dir: Path, log: Optional[MetricsLog] = None, resume_dir: Optional[Path] = None):
        """`resume_dir`: what `--resume` takes to continue this run (default `run_dir`; scripts that
        train several tasks keep each in a sub-directory of one run directory)."""
        self.model, self.task, self.args, self.device = model, task, args, device
        self.run_dir = Path(run_dir)
        self.resume_dir = Path(resume_dir or run_dir)
        self.log = log or MetricsLog(self.run_dir / "metrics.jsonl")
        # --peft / --freeze / --grad_checkpointing, applied once before the optimiser sees the parameters.
        self.efficiency = efficient.prepare_model(self._module(), args)
        if device.type == "cuda":
            enable_tf32()
        # What runs the training step: model + loss, wrapped for several ranks, maybe compiled.
        self.engine = maybe_compile(dist.wrap_model(TaskStep(model, task.loss), device, getattr(args, "fsdp", False)),
                                    getattr(args, "compile", False))
        self.world = dist.world_size()
        cfg = model_config(model)
        self._flops = (matmul_params(model), cfg.num_hidden_layers, cfg.hidden_size) if cfg else None
        self._peak = peak_flops(device, args.precision, getattr(args, "peak_flops", None))

    # ---- helpers ----------------------------------------------------------------------------
    def _better(self, value: float, best: Optional[float]) -> bool:
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    def _module(self) -> nn.Module:
        return self.model  # the uncompiled, unwrapped module (the engine wraps it)

    def _save(self, obj: dict, path: Path) -> None:
        if dist.is_main():
            checkpoint.save_atomic(obj, path)

    def _check_resume_args(self, saved: dict) -> None:
        now = plain_args(self.args)
        diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
                if k not in _RESUME_FREE and saved.get(k) != now.get(k)}
        if diff:
            lines = ", ".join(f"--{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise SystemExit(f"--resume {self.resume_dir}: the run was started with other arguments ({lines}); "
                             f"resume with the same arguments")

    def _evaluate(self) -> dict:
        self.engine.eval()
        with torch.no_grad(), dist.full_params(self.engine):
            metrics = self.task.evaluate(self.model)
        if self.task.metric not in metrics:
            raise KeyError(f"task {self.task.name}: evaluate() returned {sorted(metrics)}, lacks {self.task.metric!r}")
        return metrics

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> FitResult:
        args, task, device, model = self.args, self.task, self.device, self.model
        n_batches = math.ceil(len(task.train_lengths) / (args.batch_size * self.world))
        steps_per_epoch = math.ceil(n_batches / args.grad_accum)
        total_steps = max(1, args.epochs * steps_per_epoch)
        warmup = int(args.warmup_ratio * total_steps)
        opt = make_optimizer(model, args.lr, args.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup, total_steps))
        if dist.is_fsdp(self.engine) and args.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            scaler = ShardedGradScaler(device.type)
        else:
            scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        data_gen = torch.Generator().manual_seed(args.seed)
        trainable, total = count_parameters(model)
        efficient.reset_peak_memory(device)
        report = efficient.efficiency_report(self._module(), device)
        start_epoch, best, best_epoch, best_metrics = 0, None, None, {}
        last_path, best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"

        if args.resume and last_path.is_file():
            ckpt = checkpoint.load(last_path)
            self._check_resume_args(ckpt["args"])
            dist.load_full_state_dict(self.model, ckpt["model"], opt, ckpt["optimizer"])
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
                           trainable_pct=report["trainable_pct"], efficiency=self.efficiency,
                           train_examples=len(task.train_lengths), steps=total_steps, warmup_steps=warmup,
                           args=plain_args(args))
        print(f"[{task.name}] parameters: {trainable:,} trainable / {total:,} total; "
              f"{len(task.train_lengths):,} training examples, {total_steps} optimiser steps; run dir {self.run_dir}")
        effective = args.batch_size * self.world * args.grad_accum
        self.log.write("scale", task=task.name, world_size=self.world, per_rank_batch=args.batch_size,
                       grad_accum=args.grad_accum, effective_batch=effective,
                       engine="fsdp" if dist.is_fsdp(self.engine) else "ddp" if self.world > 1 else "single",
                       compile=bool(getattr(args, "compile", False)), peak_flops=self._peak)
        if dist.is_main():
            print(f"[{task.name}] {efficient.format_report(report)}")
            print(f"[{task.name}] effective batch {effective} = {args.batch_size} per rank x {self.world} "
                  f"rank(s) x {args.grad_accum} accumulation step(s)"
                  + ("" if self._peak else "; MFU not reported (no peak FLOP/s known for this device; "
                                           "give --peak_flops)"))

        for epoch in range(start_epoch, args.epochs):
            if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
                self.log.write("stopped", task=task.name, epoch=epoch)
                print(f"[{task.name}] stopped after epoch {epoch} (--stop_after_epoch); continue with --resume {self.resume_dir}")
                dist.keep_full_params(self.engine)
                return FitResult(best_metrics, best_epoch, interrupted=True)
            if self.world > 1:  # each rank its own dropout masks, reproducible and resumable by epoch
                torch.manual_seed(args.seed + 1_000_003 * (epoch + 1) + dist.rank())
            train_stats = self.train_epoch(epoch, opt, sched, scaler, data_gen)
            metrics = self._evaluate()
            improved = self._better(metrics[task.metric], best)
            model_state, opt_state = dist.full_state_dict(self.model, opt)  # a collective under FSDP
            if improved:
                best, best_epoch, best_metrics = metrics[task.metric], epoch + 1, metrics
                self._save({"model": model_state, "epoch": epoch + 1, "metrics": metrics}, best_path)
            self._save({
                "model": model_state, "optimizer": opt_state,
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "rng": checkpoint.rng_state(data_gen), "epoch": epoch + 1, "best_metric": best,
                "best_epoch": best_epoch, "best_metrics": best_metrics, "args": plain_args(args),
            }, last_path)
            dist.barrier()  # the checkpoints are on disk before any rank reads them
            report = efficient.efficiency_report(self._module(), device)
            self.log.write("epoch", task=task.name, epoch=epoch + 1, **train_stats, dev=metrics, best_epoch=best_epoch,
                           peak_memory_bytes=report["peak_memory_bytes"], peak_memory_kind=report["peak_memory_kind"])
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            mfu_text = f", MFU {train_stats['mfu']:.1%}" if train_stats.get("mfu") is not None else ""
            if dist.is_main():
                print(f"[{task.name}] epoch {epoch + 1}: train loss {train_stats['train_loss']:.4f}, "
                      f"{train_stats['tokens_per_s']:.0f} tokens/s{mfu_text}; dev {shown}{' (best)' if improved else ''}")

        if best_path.is_file():
            dist.load_full_state_dict(self.model, checkpoint.load(best_path)["model"])
        else:  # no epoch trained (--epochs 0): evaluate the model as it is
            best_metrics = self._evaluate()
        dist.keep_full_params(self.engine)  # FSDP: the scripts' predictions after fit need whole weights
        report = efficient.efficiency_report(self._module(), device)
        if dist.is_main():
            print(f"[{task.name}] {efficient.format_report(report)}")
        if getattr(args, "merge_lora", False):
            efficient.merge_lora(self._module())
            if dist.is_main():
                print(f"[{task.name}] merged the LoRA adapters into the weights (--merge_lora)")
        self.log.write("done", task=task.name, best_epoch=best_epoch, best=best_metrics,
                       **{k: report[k] for k in ("trainable_params", "total_params", "trainable_pct",
                                                 "peak_memory_bytes", "peak_memory_kind")})
        return FitResult(best_metrics, best_epoch, interrupted=False)

    def _to_device(self, value):
        if not torch.is_tensor(value):
            return value
        if self.device.type == "cuda":  # page-locked host memory: the copy runs asynchronously
            return value.pin_memory().to(self.device, non_blocking=True)
        return value.to(self.device)

    def train_epoch(self, epoch: int, opt, sched, scaler, data_gen: torch.Generator) -> dict:
        """One pass over the training batches (no evaluation, no checkpoint); returns its statistics.

        Every rank draws the same global batches (`batch_size * world` examples, length-bucketed with
        the shared seed) and trains on its strided share; the only host syncs are the loss read-backs
        every LOG_EVERY batches and at the end."""
        args, task, device, engine = self.args, self.task, self.device, self.engine
        engine.train()
        batches = bucketed_batches(task.train_lengths, args.batch_size * self.world, data_gen)
        n = len(batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss_sum = torch.zeros((), device=device)  # on the device: no host sync per step
        total_loss, total_tokens, seen, flops = 0.0, 0, 0, 0.0
        t0 = time.perf_counter()
        bar = tqdm(batches, desc=f"{task.name} epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or not dist.is_main(), leave=False, dynamic_ncols=True)
        opt.zero_grad(set_to_none=True)
        for i, global_batch in enumerate(bar):
            group_start = (i // args.grad_accum) * args.grad_accum
            group_size = min(args.grad_accum, n - group_start)
            indices, weight = dist.local_share(global_batch)
            batch = {k: self._to_device(v) for k, v in task.make_batch(indices).items()}
            last_micro = i + 1 == group_start + group_size
            with dist.no_sync(engine, skip=not last_micro):  # accumulate locally, all-reduce once per step
                with autocast(device, args.precision):
                    loss, tokens = engine(batch)
                scaler.scale(loss * (weight / group_size)).backward()
            loss_sum += loss.detach().float() * (len(indices) * (weight > 0))
            seen += len(global_batch)
            total_tokens += int(tokens) * (weight > 0)
            if self._flops:
                n_params, n_layer, hidden = self._flops
                seq = max(task.train_lengths[j] for j in indices)
                flops += int(tokens) * (weight > 0) * flops_per_token(n_params, n_layer, seq, hidden)
            if last_micro:
                if args.max_grad_norm > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if (i + 1) % LOG_EVERY == 0 or i + 1 == n:  # read the loss back only now and then
                total_loss = dist.all_reduce_sum([loss_sum.item()], device)[0]
                if not math.isfinite(total_loss):
                    raise FloatingPointError(f"[{task.name}] non-finite loss in epoch {epoch + 1} by batch {i + 1}; "
                                             f"lower --lr or use --precision fp32/bf16")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{total_loss / seen:.4f}",
                                tok_s=f"{total_tokens * self.world / max(elapsed, 1e-9):.0f}")
        elapsed = time.perf_counter() - t0
        total_tokens, flops = dist.all_reduce_sum([total_tokens, flops], device)
        tokens_per_s = total_tokens / max(elapsed, 1e-9)
        util = mfu(tokens_per_s / self.world, flops / max(total_tokens, 1), self._peak)
        return {"train_loss": total_loss / max(seen, 1), "tokens": int(total_tokens), "seconds": round(elapsed, 3),
                "tokens_per_s": tokens_per_s, "flops_per_token": flops / max(total_tokens, 1),
                "mfu": util, "world_size": self.world, "lr": sched.get_last_lr()[0]}
