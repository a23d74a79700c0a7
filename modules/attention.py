"""Causal multi-head self-attention (Vaswani et al., 2017) as GPT-2 uses it, with a KV cache.

All attention goes through `torch.nn.functional.scaled_dot_product_attention`.  The model
builds one boolean mask per forward (`build_attention_mask`) and hands it to every layer;
when there is no padding and no cache offset it passes `is_causal=True` instead, which lets
SDPA pick its fused kernels.

The KV cache is preallocated to (B, n_head, max_len, head_dim) and indexed by slot: a
forward with `cache_start=s` writes its keys and values at slots s..s+T-1 and attends over
slots 0..s+T-1.  Generation prefills with the prompt, then feeds one token at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config


class KVCache(nn.Module):
    """Preallocated key/value storage for one attention layer."""

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch_size, num_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to fill up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Select rows of the batch (beam search keeps the cache of the surviving beams)."""
        self.k = self.k.index_select(0, batch_index)
        self.v = self.v.index_select(0, batch_index)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        d = config.hidden_size
        # Separate projections (the CS224N names) so that LoRA can target each of them.
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dropout_p = config.attention_probs_dropout_prob
        self.kv_cache: Optional[KVCache] = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, cache_start: Optional[int] = None) -> torch.Tensor:
        """x: (B, T, D); attn_mask: boolean (B or 1, 1, T, S), True = may attend. Returns (B, T, D)."""
        B, T, D = x.shape
        q = self.split_heads(self.query(x))
        k = self.split_heads(self.key(x))
        v = self.split_heads(self.value(x))
        if cache_start is not None:
            if self.kv_cache is None:
                raise RuntimeError("cache_start given but no KV cache is set up (call setup_kv_cache first)")
            k, v = self.kv_cache.update(cache_start, k, v)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, D)


def build_attention_mask(attention_mask: Optional[torch.Tensor], num_queries: int, cache_start: int,
                         device: torch.device) -> tuple[Optional[torch.Tensor], bool]:
    """The one mask builder: returns (boolean mask (B|1, 1, T, S) or None, is_causal).

    `attention_mask` (B, S) marks real tokens (1) and padding (0) over every slot the queries
    may see, S = cache_start + T (a (B, T) mask is accepted when cache_start is 0).
    Query i sits at slot cache_start + i and sees slots <= its own that are not padding.
    Every query also sees itself, so a padded query never gets an empty row (and NaNs).
    """
    T, S = num_queries, cache_start + num_queries
    if attention_mask is None:
        if cache_start == 0:
            return None, True
        if T == 1:
            return None, False  # one new token sees every filled slot
    q_slot = torch.arange(cache_start, S, device=device)
    k_slot = torch.arange(S, device=device)
    allowed = k_slot[None, :] <= q_slot[:, None]  # (T, S)
    if attention_mask is not None:
        if attention_mask.size(-1) != S:
            raise ValueError(f"attention_mask covers {attention_mask.size(-1)} positions; expected {S} "
                             f"(cached {cache_start} + new {T})")
        key_ok = attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # (B, 1, S)
        allowed = (allowed[None] & key_ok) | (k_slot[None, :] == q_slot[:, None])[None]  # (B, T, S)
    else:
        allowed = allowed[None]
    return allowed[:, None], False  # (B|1, 1, T, S)
