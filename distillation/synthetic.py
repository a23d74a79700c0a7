"""Training the cloze paraphrase detector on Impossible Distillation data (Jung et al., 2023):
the flags `paraphrase_detection.py` adds, the training set (real and/or synthetic pairs with
per-example weights) and the loss

    mean_i( w_i * CE_i ) + kl_lambda * KL( p_student || p_initial )

over the two answer tokens ("no", "yes"); w_i = 1 for real pairs and `--synthetic_weight` for
synthetic ones; p_initial comes from a frozen copy of the model as it was before training, which
keeps the detector close to where it started while it learns from noisy synthetic labels.
With no synthetic file and kl_lambda = 0 the loss is exactly the plain cross-entropy.
"""
from __future__ import annotations

import argparse
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def add_synthetic_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Impossible Distillation (synthetic pairs from impossible_distillation.py)")
    g.add_argument("--synthetic_train", default=None, metavar="FILE",
                   help="Quora-format pairs written by `impossible_distillation.py build`, added to the training set "
                        "(--para_train none: train on them alone)")
    g.add_argument("--synthetic_weight", type=float, default=1.0,
                   help="loss weight of each synthetic pair (real pairs weigh 1)")
    g.add_argument("--kl_lambda", type=float, default=0.0,
                   help="weight of KL(model || frozen initial model) on the yes/no distribution (0: off)")


def check_synthetic_args(args: argparse.Namespace) -> None:
    if args.synthetic_weight <= 0:
        raise SystemExit(f"--synthetic_weight must be > 0, got {args.synthetic_weight}")
    if args.synthetic_weight != 1.0 and not args.synthetic_train:
        raise SystemExit("--synthetic_weight needs --synthetic_train")
    if args.kl_lambda < 0:
        raise SystemExit(f"--kl_lambda must be >= 0, got {args.kl_lambda}")
    if args.para_train == "none" and not args.synthetic_train:
        raise SystemExit("--para_train none needs --synthetic_train (there would be nothing to train on)")


def training_examples(args: argparse.Namespace, read_paraphrase) -> tuple[list, torch.Tensor]:
    """(real + synthetic training examples, their loss weights (N,)); `--limit` applies to each file."""
    real = [] if args.para_train == "none" else read_paraphrase(args.para_train, labeled=True)
    synth = read_paraphrase(args.synthetic_train, labeled=True) if args.synthetic_train else []
    if args.limit:
        real, synth = real[: args.limit], synth[: args.limit]
    if synth:
        print(f"[para] training on {len(real)} real and {len(synth)} synthetic pairs "
              f"(synthetic weight {args.synthetic_weight})")
    weights = torch.tensor([1.0] * len(real) + [args.synthetic_weight] * len(synth))
    return real + synth, weights


def frozen_reference(model: nn.Module, kl_lambda: float) -> Optional[nn.Module]:
    """A frozen copy of `model` as it is now (the initial model), or None when kl_lambda == 0."""
    if kl_lambda == 0:
        return None
    from distillation.models import freeze

    return freeze(copy.deepcopy(model))


def paraphrase_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    ref_logits: Optional[torch.Tensor] = None, kl_lambda: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy over (B, 2) answer logits plus kl_lambda * KL(student || reference)."""
    logits = logits.float()
    loss = (F.cross_entropy(logits, labels, reduction="none") * weights).mean()
    if kl_lambda and ref_logits is not None:
        log_p = F.log_softmax(logits, -1)
        log_q = F.log_softmax(ref_logits.float(), -1)
        loss = loss + kl_lambda * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return loss
