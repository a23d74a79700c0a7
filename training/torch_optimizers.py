"""torch.optim's own optimisers in the trainer's registry (`training.optimizers.OPTIMIZERS`): the
handout's "PyTorch supports many other optimization algorithms", each one line away from every
training script's `--optimizer`.

Every builder takes the trainer's parameter groups (each with its own `lr` and `weight_decay`, so
layer-wise learning-rate decay and the no-decay group of biases and LayerNorm gains hold for all) and
the TrainConfig; the rest are torch's defaults.  Weight decay is DECOUPLED (the parameter shrinks by
lr * weight_decay, as in our AdamW) for torch_adamw, radam, nadam and adafactor, and an L2 term added
to the gradient (torch's only form) for adam, adagrad and rmsprop.

    torch_adamw  torch.optim.AdamW (Loshchilov & Hutter, 2019): the same update as ours, foreach kernels
    adam         torch.optim.Adam (Kingma & Ba, 2015)
    radam        torch.optim.RAdam (Liu et al., 2020): variance-rectified warm-up
    nadam        torch.optim.NAdam (Dozat, 2016): Nesterov momentum in Adam
    adafactor    torch.optim.Adafactor (Shazeer & Stern, 2018): factored second moments, ~no optimiser
                 memory for matrices; `lr` caps its relative step size
    adagrad      torch.optim.Adagrad (Duchi et al., 2011)
    rmsprop      torch.optim.RMSprop (Tieleman & Hinton, 2012)

Their `state_dict` resumes them exactly (tests/test_torch_optimizers.py).
"""
from __future__ import annotations

from typing import Callable

import torch

TORCH_OPTIMIZERS: dict[str, Callable] = {
    "torch_adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr),
    "adam": lambda groups, cfg: torch.optim.Adam(groups, lr=cfg.lr),
    "radam": lambda groups, cfg: torch.optim.RAdam(groups, lr=cfg.lr, decoupled_weight_decay=True),
    "nadam": lambda groups, cfg: torch.optim.NAdam(groups, lr=cfg.lr, decoupled_weight_decay=True),
    "adafactor": lambda groups, cfg: torch.optim.Adafactor(groups, lr=cfg.lr),
    "adagrad": lambda groups, cfg: torch.optim.Adagrad(groups, lr=cfg.lr),
    "rmsprop": lambda groups, cfg: torch.optim.RMSprop(groups, lr=cfg.lr),
}
