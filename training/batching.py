"""Length-bucketed batching: little compute goes into padding, the order stays random.

Training: shuffle all indices, cut them into chunks of `bucket_batches` batches, sort each chunk by
length, cut it into batches, then shuffle the batches.  Evaluation: sort everything by length.
"""
from __future__ import annotations

from typing import Sequence

import torch


def bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                     bucket_batches: int = 50) -> list[list[int]]:
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist()
    chunk = batch_size * bucket_batches
    batches = []
    for start in range(0, n, chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic batches for evaluation, longest first (a too-large batch fails at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max), right-padded."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask
