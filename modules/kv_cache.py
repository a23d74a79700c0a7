"""The preallocated key/value cache of one attention layer (gpt-fast's static cache).

Keys and values live in (B, n_head, max_len, head_dim) buffers indexed by slot.  A forward with
an int `start` writes its T new keys/values at slots start..start+T-1 and attends over the filled
slots 0..start+T-1 (views, no copy).  A forward with a LongTensor of slots (the compiled decode
step of `models/generation/decoder.py`) writes with `index_copy_` and attends over all `max_len`
slots, masked: every shape is then the same at every step, so `torch.compile` builds the step
once (and CUDA graphs can replay it).

`reorder` (beam search: keep the cache rows of the surviving beams) gathers the filled slots into
a spare buffer allocated once and swaps the two, so no cache is allocated per step; with
`static=True` the result is copied back instead, keeping the buffers' addresses fixed.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn


class KVCache(nn.Module):
    """Preallocated key/value storage for one attention layer: k, v (B, nh, max_len, hs)."""

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: Union[torch.device, str], static: bool = False):
        super().__init__()
        shape = (batch_size, num_heads, max_len, head_dim)
        # A static cache is read whole (masked), so it must hold finite values; the other reads only
        # filled slots and skips the zero-fill.
        alloc = torch.zeros if static else torch.empty
        self.register_buffer("k", alloc(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", alloc(shape, dtype=dtype, device=device), persistent=False)
        self.static = static
        self._spare: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # reorder's target, made on first use

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, start: Union[int, torch.Tensor], k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs); return the keys and values to attend over.

        `start` an int: slots start..start+T-1 of the first B rows, returns the filled slots
        (B, nh, start+T, hs).
        `start` a LongTensor (T,) of slots: returns every slot (B, nh, max_len, hs); the caller's
        mask hides the slots not filled yet."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v
        end, rows = start + k.size(2), k.size(0)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to fill up to {end}")
        if rows > self.k.size(0):
            raise ValueError(f"KV cache holds {self.k.size(0)} rows; got a batch of {rows}")
        self.k[:rows, :, start:end] = k  # a smaller batch uses the first rows (beam search prefills them)
        self.v[:rows, :, start:end] = v
        return self.k[:rows, :, :end], self.v[:rows, :, :end]

    def reorder(self, batch_index: torch.Tensor, length: Optional[int] = None) -> None:
        """Row i of the cache becomes row batch_index[i] (B,), in place, over the first `length`
        slots (default all).  The slots past `length` are left undefined: they are written before
        they are read."""
        n = self.max_len if length is None else length
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        for name, spare in zip(("k", "v"), self._spare):
            current = getattr(self, name)
            torch.index_select(current[:, :, :n], 0, batch_index, out=spare[:, :, :n])
        if self.static:  # keep the addresses: copy back
            self.k[:, :, :n].copy_(self._spare[0][:, :, :n])
            self.v[:, :, :n].copy_(self._spare[1][:, :, :n])
        else:  # swap the buffers: the spare becomes the cache
            old = (self.k, self.v)
            self.k, self.v = self._spare
            self._spare = old
