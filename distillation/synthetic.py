"""Training the cloze paraphrase detector on Impossible Distillation data (Jung et al., 2023):
the training set of `paraphrase_detection.py --synthetic_train` (real and/or synthetic pairs with
per-example weights) and the loss

    mean_i( w_i * CE_i ) + kl_lambda * KL( p_student || p_initial )

over the two answer tokens ("no", "yes"); w_i = 1 for real pairs and `--synthetic_weight` for
synthetic ones; p_initial comes from a frozen copy of the model as it was before training, which
keeps the detector close to where it started while it learns from noisy synthetic labels.
With no synthetic file and kl_lambda = 0 the loss is exactly the plain cross-entropy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def training_examples(para_train: str, synthetic_train: Optional[str], synthetic_weight: float,
                      limit: Optional[int] = None) -> tuple[list, torch.Tensor, int]:
    """(real + synthetic training examples, their loss weights (N,), how many are synthetic).  `para_train` "none" means no
    real pairs; `limit` applies to each file."""
    from tasks.data import read_paraphrase

    real = [] if para_train == "none" else read_paraphrase(para_train, labeled=True)
    synth = read_paraphrase(synthetic_train, labeled=True) if synthetic_train else []
    if limit:
        real, synth = real[:limit], synth[:limit]
    weights = torch.tensor([1.0] * len(real) + [synthetic_weight] * len(synth))
    return real + synth, weights, len(synth)


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
