"""Batched no-grad inference over variable-length token sequences, results back in input order."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from training.batching import pad_right, sorted_batches
from common.precision import autocast
from training.distributed import sharded_inference


@torch.no_grad()
def batched_inference(sequences: Sequence[list[int]], batch_size: int, pad_id: int, device: torch.device,
                      precision: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn(input_ids, attention_mask)` (right-padded, on `device`) -> (B, ...) for length-sorted batches;
    returns the concatenated (N, ...) results (float32, CPU) in the order of `sequences`.
    Under torchrun every rank runs a shard and all get the gathered results, one per sequence."""
    if not sequences:
        raise ValueError("batched_inference: no sequences")

    def run(indices: list[int]) -> torch.Tensor:
        out: list = [None] * len(indices)
        for batch in sorted_batches([len(sequences[i]) for i in indices], batch_size):
            ids, mask = pad_right([sequences[indices[j]] for j in batch], pad_id)
            with autocast(device, precision):
                result = fn(ids.to(device), mask.to(device)).float().cpu()
            for k, j in enumerate(batch):
                out[j] = result[k]
        return torch.stack(out)

    return sharded_inference(len(sequences), device, run)  # under torchrun: each rank a shard, gathered
