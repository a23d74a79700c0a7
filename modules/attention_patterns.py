"""Sparse attention patterns: LogSparse, local window, their union, and global tokens, as flags.

LogSparse attention (Li et al., 2019, "Enhancing the Locality and Breaking the Memory
Bottleneck of Transformer on Time Series Forecasting") lets position l attend to
I(l) = {l - 2^floor(log2 l), ..., l - 2, l - 1, l}: itself and every key a power of two
behind it, O(log l) keys instead of l.  A local window (as in Child et al., 2019, "Generating
Long Sequences with Sparse Transformers") keeps the W most recent keys l-W+1 .. l, and the
hybrid pattern is the union of the two.  Global tokens (Beltagy et al., 2020, "Longformer:
The Long-Document Transformer") add the first G positions to every pattern: every position
attends to them, and they attend to every earlier position (causal, so: to all of theirs).
Any subset of layers can be sparse; the others stay dense (`sparse_layers`).

`pattern_allows` is the ONE definition of a pattern; `pattern_key_ranges` enumerates the same
keys as position ranges, for the gather path (`modules/sparse_attention.py`), whose in-block
mask is again `pattern_allows`.  `attention_mask_mod` combines it with causality, key padding
and the KV cache into a FlexAttention `mask_mod`; the attention mask builder
(`modules.attention.build_attention_mask`) evaluates that same function on every (query, key)
pair for the boolean SDPA mask, on the gathered pairs of the sparse path, or hands it to
`create_block_mask` for the block-sparse FlexAttention path.  `choose_path` picks the path.

Patterns act on token positions, not cache slots: with left padding (batched generation)
the position of every slot is `cumsum(attention_mask) - 1`, for queries and keys alike.
"""
from __future__ import annotations

import math

from typing import Callable, Optional

import torch

from config import ATTENTION_BACKENDS, ATTENTION_PATTERNS

PATTERNS = ATTENTION_PATTERNS  # dense, logsparse, local, hybrid
BACKENDS = ATTENTION_BACKENDS  # auto, sdpa, flex, sparse


def pattern_allows(pattern: str, q: torch.Tensor, k: torch.Tensor, window: int,
                   global_tokens: int = 0) -> torch.Tensor:
    """True where a query at position `q` may attend to a key at position `k` (tensors broadcast).

    dense:     k <= q
    logsparse: k == q, or q - k is a power of two and k >= 0
    local:     q - window < k <= q
    hybrid:    local or logsparse
    and with `global_tokens` G > 0 (sparse patterns): also 0 <= k < G, k <= q (and so every
    query q < G sees all of 0 .. q).
    """
    if pattern == "dense":
        return k <= q
    d = q - k
    local = (d >= 0) & (d < window)
    if pattern == "local":
        allowed = local
    else:
        # d > 0 is a power of two exactly when it has one set bit: d & (d - 1) == 0.
        logsparse = (d == 0) | ((d > 0) & ((d & (d - 1)) == 0) & (k >= 0))
        if pattern == "logsparse":
            allowed = logsparse
        elif pattern == "hybrid":
            allowed = local | logsparse
        else:
            raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {PATTERNS}")
    if global_tokens > 0:
        allowed = allowed | ((d >= 0) & (k >= 0) & (k < global_tokens))
    return allowed


def pattern_key_ranges(pattern: str, q: torch.Tensor, window: int, global_tokens: int,
                       max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys `pattern_allows` gives query positions `q` (any shape), as inclusive position
    ranges: (lo, hi), each of shape q.shape + (R,); an empty range has lo > hi.

    Their union is exactly {k >= 0 : pattern_allows(pattern, q, k, window, global_tokens)} for
    queries at positions q <= `max_position` (tests check it).  Ranges may overlap.
    """
    if pattern not in PATTERNS or pattern == "dense":
        raise ValueError(f"pattern_key_ranges: {pattern!r} is not a sparse pattern; choose one of {PATTERNS[1:]}")
    q = q.long()[..., None]  # (..., 1)
    lo, hi = [], []
    if pattern in ("local", "hybrid"):
        lo.append((q - window + 1).clamp(min=0))
        hi.append(q)
    if pattern in ("logsparse", "hybrid"):
        first = 0 if pattern == "logsparse" else (window - 1).bit_length()  # hybrid: 2^j < W is in the window
        powers = [2 ** j for j in range(first, max(1, max_position).bit_length())]  # 2^j <= max_position
        offsets = torch.tensor(([0] if pattern == "logsparse" else []) + powers, dtype=torch.long, device=q.device)
        if offsets.numel():
            points = q - offsets  # (..., R) one-key ranges; a key before position 0 becomes the empty [1, 0]
            lo.append(points.masked_fill(points < 0, 1))
            hi.append(points.masked_fill(points < 0, 0))
    if global_tokens > 0:
        lo.append(torch.zeros_like(q))
        hi.append(torch.minimum(q, torch.full_like(q, global_tokens - 1)))
    return torch.cat(lo, -1), torch.cat(hi, -1)


# Query/key block size of the sparse path per pattern (modules/sparse_attention.py), chosen with
# `python -m bench.attention --block_sizes` on CPU: small blocks gather fewer unused keys, large
# ones make larger matrix products.
DEFAULT_BLOCK_SIZE = {"local": 32, "logsparse": 16, "hybrid": 32}


def estimated_keys_per_query(pattern: str, window: int, global_tokens: int, num_keys: int,
                             block_size: Optional[int] = None) -> int:
    """Scores the sparse path computes per query (block keys + points) for S = `num_keys` keys
    without padding, at block size C (default: the pattern's); `choose_path` compares it with S."""
    C = block_size or DEFAULT_BLOCK_SIZE[pattern]
    # The own block and the one before hold offsets < C; a window W adds ceil((W - 1) / C) blocks.
    blocks = 2 if pattern == "logsparse" else math.ceil((window - 1) / C) + 1
    points = 0
    if pattern in ("logsparse", "hybrid"):  # one point per power of two >= max(C, W) up to S - 1
        first = C if pattern == "logsparse" else max(C, window)
        points = sum(1 for j in range(max(1, num_keys - 1).bit_length()) if 2 ** j >= first)
    blocks += -(-global_tokens // C)
    return min(num_keys, blocks * C + points)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1/0 mask -> (B, S) int32 positions: cumsum(mask) - 1 (left padding gets -1)."""
    return attention_mask.long().cumsum(-1).sub(1).to(torch.int32)


def attention_mask_mod(pattern: str, window: int, cache_start: int,
                       key_valid: Optional[torch.Tensor] = None,
                       positions: Optional[torch.Tensor] = None, global_tokens: int = 0) -> Callable:
    """FlexAttention `mask_mod(b, h, q_idx, kv_idx)` for queries 0..T-1 over slots 0..S-1.

    Query q_idx sits at slot cache_start + q_idx.  A query sees keys at slots <= its own that
    are not padding (`key_valid` (B, S) bool) and that its pattern allows between the two
    positions (`positions` (B, S) int, default: the slot).  Every query also sees itself, so a
    padded query never gets an empty row (and NaNs).  Works on scalars inside FlexAttention
    and on broadcast index tensors (how the boolean SDPA mask and the sparse path's in-block
    mask are made).
    """
    def mask_mod(b, h, q_idx, kv_idx):
        q_slot = q_idx + cache_start
        allowed = kv_idx <= q_slot
        if pattern != "dense":  # dense: slot causality is position causality for real tokens
            if positions is None:
                q_pos, k_pos = q_slot, kv_idx
            else:
                q_pos, k_pos = positions[b, q_slot], positions[b, kv_idx]
            allowed = allowed & pattern_allows(pattern, q_pos, k_pos, window, global_tokens)
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
    G = config.attention_global_tokens
    if not isinstance(G, int) or isinstance(G, bool) or G < 0:
        raise ValueError(f"config field attention_global_tokens {G!r}: must be an integer >= 0 "
                         f"(the first N positions are global; 0: none)")
    if G > 0 and config.attention == "dense":
        raise ValueError(f"config field attention_global_tokens {G}: global tokens extend a sparse pattern; "
                         f"dense attention already sees every earlier position (set attention to logsparse, "
                         f"local or hybrid, or attention_global_tokens to 0)")
    sparse = set(parse_sparse_layers(config.sparse_layers, config.num_hidden_layers))
    return [config.attention if i in sparse else "dense" for i in range(config.num_hidden_layers)]


# When `auto` takes a sparse path, per (device, attention dropout active): the sequence must hold
# at least `min_keys` keys (the path's fixed costs: building the layout, a Python loop over chunks)
# and the path must compute at most `max_key_share` of them per query (`estimated_keys_per_query`).
# With dropout, SDPA runs its O(T^2) math kernel and sparsity pays early; without, it runs a fused
# kernel and pays later.  CPU: from `python -m bench.attention` (docs/sparse_attention.md), the
# lengths from which the sparse path beat the masked SDPA path for every pattern (train 512,
# eval 1024).  CUDA: NOT measured (no GPU was lent), conservative guesses.
SPARSE_AUTO = {("cpu", True): dict(min_keys=512, max_key_share=0.5),
               ("cpu", False): dict(min_keys=1024, max_key_share=0.25),
               ("cuda", True): dict(min_keys=4096, max_key_share=0.1),
               ("cuda", False): dict(min_keys=1024, max_key_share=0.25)}


def choose_path(backend: str, pattern: str, device: torch.device, num_queries: int, num_keys: int,
                window: int, global_tokens: int, dropout_active: bool, cached: bool) -> str:
    """The execution path of a layer with `pattern`: "sdpa" (boolean mask; dense layers always),
    "flex" (block-sparse FlexAttention) or "sparse" (`modules/sparse_attention.py`).

    `backend` sdpa / flex / sparse forces that path on sparse layers (flex refuses attention
    dropout, which it does not have).  `auto` picks:
      * one-token decoding (T = 1): sdpa, a (B, 1, 1, S) mask costs nothing;
      * CUDA, no attention dropout, no KV cache: flex (the compiled kernel) where sparsity pays;
      * otherwise sparse where it computes a small enough share of the pairs (`SPARSE_AUTO`),
        dense SDPA with the mask where sparsity does not pay (short sequences, wide windows).
    """
    if pattern == "dense" or backend == "sdpa":
        return "sdpa"
    if backend == "flex":
        if dropout_active:
            raise ValueError("attention_backend flex: FlexAttention has no attention dropout; set the attention "
                             "dropout (attention_probs_dropout_prob) to 0, or use attention_backend sparse or auto")
        return "flex"
    if backend == "sparse":
        return "sparse"
    if backend != "auto":
        raise ValueError(f"attention_backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if num_queries == 1:
        return "sdpa"
    rule = SPARSE_AUTO["cuda" if device.type == "cuda" else "cpu", dropout_active]
    keys = estimated_keys_per_query(pattern, window, global_tokens, num_keys)
    pays = num_keys >= rule["min_keys"] and keys <= rule["max_key_share"] * num_keys
    if not pays:
        return "sdpa"
    return "flex" if device.type == "cuda" and not dropout_active and not cached else "sparse"
