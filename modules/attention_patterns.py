"""Sparse attention patterns: LogSparse, local window and their union, as flags.

LogSparse attention (Li et al., 2019, "Enhancing the Locality and Breaking the Memory
Bottleneck of Transformer on Time Series Forecasting") lets position l attend to
I(l) = {l - 2^floor(log2 l), ..., l - 2, l - 1, l}: itself and every key a power of two
behind it, O(log l) keys instead of l.  A local window (as in Child et al., 2019, "Generating
Long Sequences with Sparse Transformers") keeps the W most recent keys l-W+1 .. l, and the
hybrid pattern is the union of the two.  Any subset of layers can be sparse; the others stay
dense (`--sparse_layers`).

`pattern_allows` is the ONE definition of a pattern.  `attention_mask_mod` combines it with
causality, key padding and the KV cache into a FlexAttention `mask_mod`; the attention mask
builder (`modules.attention.build_attention_mask`) evaluates that same function on every
(query, key) pair for the boolean SDPA mask, or hands it to `create_block_mask` for the
block-sparse FlexAttention path, which skips the key blocks no query of a block may see.

Patterns act on token positions, not cache slots: with left padding (batched generation)
the position of every slot is `cumsum(attention_mask) - 1`, for queries and keys alike.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PATTERNS = ("dense", "logsparse", "local", "hybrid")
BACKENDS = ("auto", "sdpa", "flex")


def pattern_allows(pattern: str, q: torch.Tensor, k: torch.Tensor, window: int) -> torch.Tensor:
    """True where a query at position `q` may attend to a key at position `k` (tensors broadcast).

    dense:     k <= q
    logsparse: k == q, or q - k is a power of two and k >= 0
    local:     q - window < k <= q
    hybrid:    local or logsparse
    """
    if pattern == "dense":
        return k <= q
    d = q - k
    local = (d >= 0) & (d < window)
    if pattern == "local":
        return local
    # d > 0 is a power of two exactly when it has one set bit: d & (d - 1) == 0.
    logsparse = (d == 0) | ((d > 0) & ((d & (d - 1)) == 0) & (k >= 0))
    if pattern == "logsparse":
        return logsparse
    if pattern == "hybrid":
        return local | logsparse
    raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {PATTERNS}")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1/0 mask -> (B, S) int32 positions: cumsum(mask) - 1 (left padding gets -1)."""
    return attention_mask.long().cumsum(-1).sub(1).to(torch.int32)


def attention_mask_mod(pattern: str, window: int, cache_start: int,
                       key_valid: Optional[torch.Tensor] = None,
                       positions: Optional[torch.Tensor] = None) -> Callable:
    """FlexAttention `mask_mod(b, h, q_idx, kv_idx)` for queries 0..T-1 over slots 0..S-1.

    Query q_idx sits at slot cache_start + q_idx.  A query sees keys at slots <= its own that
    are not padding (`key_valid` (B, S) bool) and that its pattern allows between the two
    positions (`positions` (B, S) int, default: the slot).  Every query also sees itself, so a
    padded query never gets an empty row (and NaNs).  Works on scalars inside FlexAttention
    and on broadcast index tensors (how the boolean SDPA mask is made).
    """
    def mask_mod(b, h, q_idx, kv_idx):
        q_slot = q_idx + cache_start
        allowed = kv_idx <= q_slot
        if pattern != "dense":  # dense: slot causality is position causality for real tokens
            if positions is None:
                q_pos, k_pos = q_slot, kv_idx
            else:
                q_pos, k_pos = positions[b, q_slot], positions[b, kv_idx]
            allowed = allowed & pattern_allows(pattern, q_pos, k_pos, window)
        if key_valid is not None:
            allowed = (allowed & key_valid[b, kv_idx]) | (kv_idx == q_slot)
        return allowed
    return mask_mod


# ---- which layers are sparse ---------------------------------------------------------------
def parse_sparse_layers(spec: str, num_layers: Optional[int]) -> list[int]:
    """`all`, `even`, `odd` or comma-separated indices (e.g. `0,2,5`) -> sorted layer indices.

    With `num_layers=None` only the syntax is checked (the CLI does not know the model yet).
    """
    spec = str(spec).strip().lower()
    if num_layers is None and spec in ("all", "even", "odd"):
        return []
    if spec == "all":
        return list(range(num_layers))
    if spec == "even":
        return list(range(0, num_layers, 2))
    if spec == "odd":
        return list(range(1, num_layers, 2))
    indices = []
    for part in spec.split(","):
        part = part.strip()
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"sparse_layers {spec!r}: {part!r} is not a layer index; use all, even, odd "
                             f"or comma-separated indices such as 0,2,5") from None
        if i < 0:
            raise ValueError(f"sparse_layers {spec!r}: layer indices start at 0, got {i}")
        if num_layers is not None and i >= num_layers:
            raise ValueError(f"sparse_layers {spec!r}: layer {i} does not exist in a {num_layers}-layer "
                             f"model (valid indices 0..{num_layers - 1})")
        indices.append(i)
    if len(set(indices)) != len(indices):
        raise ValueError(f"sparse_layers {spec!r}: a layer index is repeated")
    return sorted(indices)


def layer_patterns(config) -> list[str]:
    """The pattern of each layer of a GPT2Config; validates the attention fields (set by the
    flags, or read from a checkpoint's config.json)."""
    if config.attention not in PATTERNS:
        raise ValueError(f"attention {config.attention!r}: "
                         f"choose one of {', '.join(PATTERNS)}")
    if config.attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend {config.attention_backend!r}: "
                         f"choose one of {', '.join(BACKENDS)}")
    if not isinstance(config.attention_window, int) or config.attention_window < 1:
        raise ValueError(f"attention_window {config.attention_window!r}: "
                         f"must be a positive integer")
    sparse = set(parse_sparse_layers(config.sparse_layers, config.num_hidden_layers))
    return [config.attention if i in sparse else "dense" for i in range(config.num_hidden_layers)]


def use_flex(backend: str, device: torch.device, dropout_active: bool, cached: bool) -> bool:
    """Whether sparse layers run FlexAttention (block-sparse) rather than SDPA with a boolean mask.

    `auto` takes FlexAttention on CUDA for uncached forwards without attention dropout
    (FlexAttention has no dropout; decoding one token at a time gains nothing from blocks).
    `flex` forces it (on CPU: eager, forward only — a correctness path, not a fast one).
    """
    if backend == "sdpa":
        return False
    if backend == "flex":
        if dropout_active:
            raise ValueError("attention_backend flex: FlexAttention has no attention dropout; set the "
                             "attention dropout (attention_probs_dropout_prob) to 0, or use attention_backend "
                             "auto or sdpa")
        return True
    if backend == "auto":
        return device.type == "cuda" and not dropout_active and not cached
    raise ValueError(f"attention_backend {backend!r}: choose one of {', '.join(BACKENDS)}")
