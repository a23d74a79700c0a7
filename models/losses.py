"""The language-modelling losses every script uses: ONE next-token cross-entropy.

Targets are laid out per position (`targets[b, t]` is the token predicted from position t, or
IGNORE_INDEX), so a loss never slices the (B, T, V) logits into a copy nor scatters their gradient
back into zeros: `next_token_targets` shifts the INPUT ids left instead (the last position, and every
position whose next token is padding, gets IGNORE_INDEX).

    next_token_loss(logits, input_ids, attention_mask)   mean (or summed) CE over real next tokens
    block_loss_sum(model, input_ids)                      summed CE of packed blocks and its target count
    token_nll(logits, targets)                            CE over any per-position targets
    sequence_logprob(logits, targets)                     (B,) summed log p of each row's targets (DPO)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) targets: input_ids[:, t + 1] where that token is real, IGNORE_INDEX elsewhere."""
    nxt = input_ids[:, 1:]
    if attention_mask is not None:
        nxt = nxt.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return F.pad(nxt, (0, 1), value=IGNORE_INDEX)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) targets, IGNORE_INDEX skipped; in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over real (non-pad) targets only."""
    return token_nll(logits, next_token_targets(input_ids, attention_mask), reduction)


def block_loss_sum(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of full (unpadded) blocks (B, T) and the number of targets,
    B * (T - 1): language-model training and validation on packed blocks."""
    B, T = input_ids.shape
    return next_token_loss(model(input_ids), input_ids, reduction="sum"), B * (T - 1)


def count_targets(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum()


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) sum over positions of log p(targets[b, t] | prefix), IGNORE_INDEX positions excluded."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * keep).sum(-1)
