"""Building models and choosing the device: the one place `--model_size` and friends turn into a model."""
from __future__ import annotations

import argparse
import contextlib
import random

import numpy as np
import torch


def select_device(use_gpu: bool) -> torch.device:
    """This process's device.  Under torchrun (WORLD_SIZE > 1) also joins the process group
    (nccl on CUDA, gloo on the CPU) and picks the GPU of LOCAL_RANK; see training/distributed.py."""
    from training.distributed import init_from_env

    if use_gpu and not torch.cuda.is_available():
        raise SystemExit("--use_gpu was given but no CUDA device is available (torch.cuda.is_available() "
                         "is False); drop --use_gpu to run on the CPU or install a CUDA build of torch")
    return init_from_env(use_gpu)


def autocast(device: torch.device, precision: str):
    """Autocast context for `--precision` (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(model_cls, args: argparse.Namespace, **overrides):
    """`model_cls.from_name_or_path(args.model_size, ...)` with the config overrides of the common
    flags (e.g. attention patterns) and the caller's (e.g. dropout); later LoRA/freezing hooks go here."""
    from training.cli import config_overrides

    kwargs = {**config_overrides(args), **overrides}
    return model_cls.from_name_or_path(args.model_size, random_init=getattr(args, "random_init", False), **kwargs)


def load_tokenizer_for(args: argparse.Namespace):
    from models.tokenizer import load_tokenizer

    model_dir = args.model_size if not getattr(args, "random_init", False) else None
    return load_tokenizer(getattr(args, "tokenizer", None), model_dir)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
