"""Several processes (torchrun) on PyTorch's own distributed engine: DDP, or FSDP with `--fsdp`.

`torchrun --nproc_per_node N script.py ...` sets WORLD_SIZE, RANK and LOCAL_RANK; `init_from_env`
(called by `training.build.select_device`) then joins the process group (nccl on CUDA, gloo on
the CPU) and each rank takes one device.  Without torchrun (WORLD_SIZE unset or 1) every helper
here is a no-op and the scripts run as one process.

Data: every rank builds the SAME global batches from the same seed (length bucketing included)
and takes its strided share of each (`local_share`).  Each rank's mean loss is weighted by its
share of the global batch, so after DDP averages the gradients the update equals one process
training on the global batch.  Inference shards the inputs, pads the last shard by repeating
inputs, gathers the results and keeps exactly one per input (`sharded_inference`).  Only rank 0
writes files (`is_main`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes in the environment; returns this rank's device
    (`cuda` becomes cuda:LOCAL_RANK under torchrun).  Without torchrun: `device` itself."""
    from common.errors import UserError

    world = env_world_size()
    if device.type == "cuda":
        if world > 1:
            if device.index is not None:
                raise UserError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda")
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; "
                                f"lower torchrun's --nproc_per_node")
            device = torch.device("cuda", local)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but ${var} is unset; "
                                f"start the script with torchrun --nproc_per_node N")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=30))
    return device


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. the run directory it created); `obj` itself in one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_share(global_batch: Sequence[int]) -> tuple[list[int], float]:
    """This rank's examples of a global batch (strided) and the weight of its mean loss,
    len(share)·world/len(global_batch), so that the DDP-averaged gradient is the global mean's.
    A rank left without examples (global batch smaller than the world) repeats the first one with
    weight 0, so that it still joins the gradient all-reduce."""
    w, r = world_size(), rank()
    share = list(global_batch[r::w])
    if not share:
        return [global_batch[0]], 0.0
    return share, len(share) * w / len(global_batch)


def wrap_model(model: nn.Module, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 with `fsdp`, one unit per GPT2Layer plus the root) when several ranks run;
    the model itself otherwise.  `unwrap` gives back the module whose state dict is saved."""
    if world_size() == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from modules.gpt2_layer import GPT2Layer

        for m in model.modules():
            if isinstance(m, GPT2Layer):
                fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP (FSDP2 modifies the module in place)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    return getattr(model, "_orig_mod", model)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


@contextlib.contextmanager
def full_params(model: nn.Module):
    """Under FSDP: every rank holds the full parameters inside the block and forwards gather
    nothing, so evaluation may run a different number of forwards on each rank.  No-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True)


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce for accumulation micro-batches (DDP); FSDP syncs every time."""
    inner = getattr(model, "_orig_mod", model)
    if skip and type(inner).__name__ == "DistributedDataParallel":
        return inner.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """(model state, optimiser state) as full tensors on the CPU of rank 0 (a collective under FSDP)."""
    from training.efficient import model_state

    module = unwrap(model)
    if not is_fsdp(model):  # a LoRA model saves only its adapters and heads
        return model_state(module), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(module, options=opts)
    osd = get_optimizer_state_dict(module, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state_dict(model: nn.Module, state: dict, optimizer=None, optimizer_state=None) -> None:
    from training.efficient import load_model_state

    module = unwrap(model)
    if not is_fsdp(model):
        load_model_state(module, state)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(module, state, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=opts)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum Python numbers over the ranks (one small collective)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sharded_inference(n: int, device: torch.device, run: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """Results of `run(indices) -> (len(indices), ...)` for indices 0..n-1, computed in shards.

    Rank r takes a contiguous shard of ceil(n / world) indices; the last shard is padded with
    repeats of index 0..; the shards are all-gathered and each index keeps its first result, so
    every input gets exactly one.  One process: `run(range(n))`."""
    w, r = world_size(), rank()
    if w == 1:
        return run(list(range(n)))
    per = -(-n // w)
    padded = list(range(n)) + [i % n for i in range(per * w - n)]
    local = run(padded[r * per:(r + 1) * per])  # (per, ...)
    comm = local.to(device) if device.type == "cuda" else local  # nccl gathers CUDA tensors
    parts = [torch.empty_like(comm) for _ in range(w)]
    dist.all_gather(parts, comm.contiguous())
    gathered = torch.cat(parts).to(local.device)  # (per * w, ...), index padded[k] at row k
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    seen = torch.zeros(n, dtype=torch.bool)
    for k, i in enumerate(padded):  # drop the duplicates of the padding
        if not seen[i]:
            out[i], seen[i] = gathered[k], True
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def keep_full_params(model: nn.Module) -> None:
    """Under FSDP: gather the full parameters on every rank and keep them (for inference after
    training, which may run a different number of forwards per rank).  No-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    for m in unwrap(model).modules():
        if isinstance(m, FSDPModule):
            m.set_reshard_after_forward(False)
            m.unshard()
