"""Batched no-grad inference over variable-length token sequences, results back in input order."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from training.batching import pad_right, sorted_batches
from training.build import autocast


@torch.no_grad()
def batched_inference(sequences: Sequence[list[int]], batch_size: int, pad_id: int, device: torch.device,
                      precision: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn(input_ids, attention_mask)` (right-padded, on `device`) -> (B, ...) for length-sorted batches;
    returns the concatenated (N, ...) results (float32, CPU) in the order of `sequences`."""
    if not sequences:
        raise ValueError("batched_inference: no sequences")
    out: list = [None] * len(sequences)
    for batch in sorted_batches([len(s) for s in sequences], batch_size):
        ids, mask = pad_right([sequences[i] for i in batch], pad_id)
        with autocast(device, precision):
            result = fn(ids.to(device), mask.to(device)).float().cpu()
        for j, i in enumerate(batch):
            out[i] = result[j]
    return torch.stack(out)
