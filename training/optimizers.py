"""Optimisers and learning-rate schedules of the shared trainer, chosen by name (`TrainConfig`).

Parameter groups: weight decay only on trainable tensors with >= 2 dims (nanoGPT's rule: no decay on
biases and LayerNorm gains); with `layer_lr_decay` < 1 the learning rate of a GPT-2 parameter is
scaled by decay^(L - depth) (layer-wise learning-rate decay, Clark et al., 2020, "ELECTRA", and
Howard & Ruder, 2018, "ULMFiT"'s discriminative fine-tuning): depth 0 = the embeddings, 1..L the
transformer layers, L + 1 the final LayerNorm and task heads (full rate).  A task may add groups of
its own (`Callback.param_groups`), e.g. projections trained with a different rate.

Optimisers: `adamw` = ours (optimizer.py, the handout's AdamW, the default); `sgd` = torch's SGD with
momentum; `soap` (Vyas et al., 2024) and `shampoo` (Gupta et al., 2018) = ours (optim/), which
precondition the 2-D tensors of groups with `precondition` True (no larger than `max_precond_dim`)
and give every other tensor our AdamW's step; `torch_adamw`, `adam`, `radam`, `nadam`, `adafactor`,
`adagrad`, `rmsprop` = torch.optim's own (training/torch_optimizers.py).

Schedules map the optimiser step to a factor of the peak rate: linear warm-up over `warmup_steps`,
then linear decay (`linear`), half-cosine decay to 0 (`cosine`), constant (`constant`), or
1/sqrt(step) decay (`inverse_sqrt`, Vaswani et al., 2017).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from common.errors import ConfigError
from training.torch_optimizers import TORCH_OPTIMIZERS


def _adamw(groups, cfg):
    from optimizer import AdamW

    return AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _sgd(groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)


def _soap(groups, cfg):
    from optim import SOAP

    return SOAP(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, shampoo_beta=cfg.shampoo_beta,
                precondition_frequency=cfg.precondition_frequency, max_precond_dim=cfg.max_precond_dim)


def _shampoo(groups, cfg):
    from optim import Shampoo

    return Shampoo(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, shampoo_beta=cfg.shampoo_beta,
                   matrix_eps=cfg.matrix_eps, precondition_frequency=cfg.precondition_frequency,
                   max_precond_dim=cfg.max_precond_dim, grafting=cfg.shampoo_grafting)


# name -> builder(param groups, TrainConfig) -> torch.optim.Optimizer.  Group "weight_decay" values
# are honoured by every optimiser (SGD: coupled L2, as torch's SGD defines it).
OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "sgd": _sgd, "soap": _soap, "shampoo": _shampoo}
OPTIMIZERS.update(TORCH_OPTIMIZERS)  # torch.optim's own (training/torch_optimizers.py)

_LAYER = re.compile(r"(?:^|\.)gpt_layers\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, 1 + i for parameters of transformer layer i, num_layers + 1 for the rest."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)) + 1
    if "word_embedding" in name or "pos_embedding" in name:
        return 0
    return num_layers + 1


def _num_layers(model: nn.Module) -> int:
    return max((int(m.group(1)) + 1 for n, _ in model.named_parameters() for m in [_LAYER.search(n)] if m), default=0)


def param_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0,
                 extra: Iterable[dict] = (), precondition_embeddings: bool = False) -> list[dict]:
    """The optimiser's parameter groups for `model`'s trainable parameters (tied ones once).

    Each group carries `lr_scale` (1 unless layer-wise decay), which `build_optimizer` multiplies into
    its rate, and `precondition` (read by SOAP / Shampoo, optim/common.py; other optimisers ignore
    it): False for nn.Embedding weights unless `precondition_embeddings` (GPT-2's 50257 x D tied
    embedding is far past any preconditioner size), True for everything else."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen, buckets = set(), {}
    num_layers = _num_layers(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay, embedding = p.dim() >= 2, id(p) in embeddings
        depth = layer_depth(name, num_layers) if layer_lr_decay != 1.0 else num_layers + 1
        buckets.setdefault((decay, embedding, depth), []).append(p)
    order = sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1], kv[0][2]))
    groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
               "lr_scale": layer_lr_decay ** (num_layers + 1 - depth),
               "precondition": precondition_embeddings if embedding else True}
              for (decay, embedding, depth), ps in order]
    for g in extra:
        if any(id(p) in seen for p in g["params"]):
            raise ValueError("an extra parameter group repeats parameters of the model")
        groups.append({"weight_decay": 0.0, "lr_scale": 1.0, "precondition": True, **g})
    if not groups:
        raise ConfigError("freeze", "the model has no trainable parameters (everything is frozen)")
    return groups


def build_optimizer(model: nn.Module, cfg, extra_groups: Iterable[dict] = ()) -> torch.optim.Optimizer:
    """The optimiser `cfg.optimizer` (a TrainConfig) over `param_groups(model, ...)`."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError("optimizer", f"{cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, cfg.weight_decay, cfg.layer_lr_decay, extra_groups, cfg.precondition_embeddings)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return OPTIMIZERS[cfg.optimizer](groups, cfg)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Our AdamW with the decay / no-decay groups (a shorthand of `build_optimizer`)."""
    from training.config import TrainConfig

    return build_optimizer(model, TrainConfig(lr=lr, weight_decay=weight_decay))


# ---- schedules --------------------------------------------------------------------------------
def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over `warmup_steps`, then linear decay to 1/(decay steps) at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def lr_schedule(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor of the peak learning rate at optimiser step `step` (0-based) for schedule `name`."""
    def warm(step: int) -> Optional[float]:
        return (step + 1) / warmup_steps if step < warmup_steps else None

    if name == "linear":
        return linear_schedule(warmup_steps, total_steps)
    if name == "constant":
        return lambda step: 1.0 if step >= warmup_steps else warm(step)
    if name == "cosine":
        def cosine(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cosine
    if name == "inverse_sqrt":  # continuous at the end of warm-up: 1 at step warmup_steps - 1
        return lambda step: warm(step) if step < warmup_steps else math.sqrt(max(1, warmup_steps) / (step + 1))
    raise ConfigError("lr_schedule", f"{name!r} is not one of linear, cosine, constant, inverse_sqrt")
