"""Batching a token stream for language-model training.

Recurrent models: truncated backpropagation through time as in Zaremba et al. (2014) -- the
stream is cut into `batch_size` contiguous columns and read `bptt` steps at a time, the hidden
state carried (detached) from one segment to the next, so every column is one long text.
Transformer: contiguous blocks of `context + 1` tokens (inputs and shifted targets), shuffled.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (batch_size, N // batch_size): row b is the b-th contiguous slice of the stream;
    the last N % batch_size tokens are dropped."""
    n = stream.numel() // batch_size
    if n < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for batch size {batch_size}")
    return stream[:n * batch_size].view(batch_size, n)


def bptt_segments(data: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs (B, t), targets (B, t)) for consecutive segments of the columns, t <= bptt."""
    for i in range(0, data.size(1) - 1, bptt):
        t = min(bptt, data.size(1) - 1 - i)
        yield data[:, i:i + t], data[:, i + 1:i + 1 + t]


def transformer_blocks(stream: torch.Tensor, context: int, batch_size: int,
                       generator: Optional[torch.Generator] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs (B, context), targets (B, context)) from non-overlapping blocks of the stream in
    a shuffled order; blocks overlap by one token so that every token is a target once."""
    num_blocks = (stream.numel() - 1) // context
    starts = torch.arange(num_blocks) * context
    order = torch.randperm(num_blocks, generator=generator)
    offsets = torch.arange(context + 1)
    for i in range(0, num_blocks, batch_size):
        idx = starts[order[i:i + batch_size]][:, None] + offsets  # (B, context + 1)
        block = stream[idx]
        yield block[:, :-1], block[:, 1:]
