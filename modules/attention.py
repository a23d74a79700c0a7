"""Causal multi-head self-attention (Vaswani et al., 2017) as GPT-2 uses it, with a KV cache.

Dense attention goes through `torch.nn.functional.scaled_dot_product_attention`.  The model
builds one mask per forward (`build_attention_mask`) and hands it to every layer;
when there is no padding and no cache offset it passes `is_causal=True` instead, which lets
SDPA pick its fused kernels.

The KV cache (`modules/kv_cache.py`) is preallocated to (B, n_head, max_len, head_dim) and
indexed by slot: a forward with `cache_start=s` writes its keys and values at slots s..s+T-1 and
attends over slots 0..s+T-1.  Generation prefills with the prompt, then feeds one token at a time.
For inference the three projections can be fused into one matmul (`fuse_qkv`), the layout of
GPT-2's original `c_attn`; LoRA-wrapped projections are never fused.  During generation on a CPU
the projections run through oneDNN-packed copies (`modules/inference_weights.py`).

Sparse patterns (`modules/attention_patterns.py`) are masks on this same attention, run by one
of three paths, all built by `build_attention_mask` from the one pattern function: a boolean SDPA
mask (the reference: every pair computed), a FlexAttention `BlockMask` (block-sparse, compiled on
CUDA), or a `SparseLayout` (`modules/sparse_attention.py`: only the gathered key blocks and
points, forward and backward on any device, with dropout).  `attend` dispatches on the mask type.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from modules.attention_patterns import attention_mask_mod, positions_from_mask
from modules.inference_weights import linear
from modules.kv_cache import KVCache  # noqa: F401  (re-exported: the cache of CausalSelfAttention)
from modules.sparse_attention import SparseLayout, build_sparse_layout, sparse_attention

try:  # FlexAttention (torch >= 2.5): the block-sparse path of sparse layers
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: only the SDPA path exists
    BlockMask = create_block_mask = flex_attention = None


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
        # Fused q/k/v for inference: (3D, D) weight and (3D,) bias while fused, else None.  Buffers
        # (not persistent: never in a state_dict) so that .to() moves them and CUDA graphs see them
        # as static inputs.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_qkv(self) -> bool:
        """Inference only: concatenate the query/key/value weights into one (3D, D) projection that
        `forward` uses while gradients are off.  Refused (returns False) when a projection is not a
        plain nn.Linear, e.g. wrapped by peft's LoRA.  The copy goes stale if the weights change:
        `unfuse_qkv` when done (generate() does both)."""
        projections = (self.query, self.key, self.value)
        if not all(type(p) is nn.Linear and p.bias is not None for p in projections):
            self.unfuse_qkv()
            return False
        with torch.no_grad():
            self.qkv_weight = torch.cat([p.weight for p in projections])  # (3D, D)
            self.qkv_bias = torch.cat([p.bias for p in projections])
        return True

    def unfuse_qkv(self) -> None:
        self.qkv_weight = self.qkv_bias = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, cache_start=None) -> torch.Tensor:
        """x: (B, T, D); attn_mask: boolean (B or 1, 1, T, S), True = may attend. Returns (B, T, D).
        A padding-only mask (the starter's additive (B, 1, 1, S) float mask) is made causal here.
        `cache_start`: None (no cache), an int or a LongTensor of slots (see `KVCache.update`)."""
        attn_mask = as_causal_mask(attn_mask, x.size(1))
        B, T, D = x.shape
        if self.qkv_weight is not None and not torch.is_grad_enabled():
            q, k, v = (self.split_heads(t) for t in F.linear(x, self.qkv_weight, self.qkv_bias).split(D, dim=-1))
        else:
            q, k, v = (self.split_heads(linear(p, x)) for p in (self.query, self.key, self.value))
        if cache_start is not None:
            if self.kv_cache is None:
                raise RuntimeError("cache_start given but no KV cache is set up (call setup_kv_cache first)")
            k, v = self.kv_cache.update(cache_start, k, v)  # (B, nh, S, hs)
        y = attend(q, k, v, attn_mask, is_causal, self.dropout_p if self.training else 0.0)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, D)


_compiled_flex = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, is_causal: bool = False,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of q (B, nh, T, hs) over k, v (B, nh, S, hs) -> (B, nh, T, hs).

    `attn_mask` is None, a boolean (B|1, 1, T, S) tensor (SDPA), a `SparseLayout` (the sparse
    path), or a FlexAttention BlockMask (block-sparse).  FlexAttention is compiled on GPUs (the
    fused kernel); on CPU it runs eagerly, forward only (torch has no FlexAttention backward on CPU).
    """
    if isinstance(attn_mask, SparseLayout):
        return sparse_attention(q, k, v, attn_mask, dropout_p)
    if BlockMask is None or not isinstance(attn_mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              is_causal=is_causal and attn_mask is None, dropout_p=dropout_p)
    if dropout_p > 0:
        raise ValueError("FlexAttention has no attention dropout: set attention_probs_dropout_prob to 0, "
                         "or use attention_backend sparse (or auto)")
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise NotImplementedError("FlexAttention has no backward on CPU: train on CPU with "
                                      "attention_backend sparse, sdpa or auto")
        return flex_attention(q, k, v, block_mask=attn_mask)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=attn_mask)


MASK_PATHS = ("sdpa", "flex", "sparse")


def build_attention_mask(attention_mask: Optional[torch.Tensor], num_queries: int, cache_start: int,
                         device: torch.device, pattern: str = "dense", window: int = 64,
                         path: str = "sdpa", global_tokens: int = 0,
                         block_size: Optional[int] = None) -> tuple[Optional[object], bool]:
    """The one mask builder: returns (mask or None, is_causal).

    `attention_mask` (B, S) marks real tokens (1) and padding (0) over every slot the queries
    may see, S = cache_start + T (a (B, T) mask is accepted when cache_start is 0).
    Query i sits at slot cache_start + i and sees slots <= its own that are not padding and
    that `pattern` allows (see `modules/attention_patterns.py`; positions come from the mask,
    cumsum - 1, so patterns act on positions under left padding; `global_tokens` adds the first
    positions).  Every query also sees itself, so a padded query never gets an empty row (and NaNs).

    `path` picks the mask type, each from the very same mask_mod: "sdpa" a boolean tensor
    (B|1, 1, T, S); "flex" a FlexAttention BlockMask; "sparse" a `SparseLayout` (key blocks of
    `block_size`, default per pattern).  Dense attention without padding on "sdpa" returns
    (None, True) so SDPA can use its fused causal kernels.
    """
    if path not in MASK_PATHS:
        raise ValueError(f"build_attention_mask: path {path!r}; choose one of {', '.join(MASK_PATHS)}")
    T, S = num_queries, cache_start + num_queries
    if attention_mask is None and pattern == "dense" and path == "sdpa":
        if cache_start == 0:
            return None, True
        if T == 1:
            return None, False  # one new token sees every filled slot
    key_valid = positions = None
    if attention_mask is not None:
        if attention_mask.size(-1) != S:
            raise ValueError(f"attention_mask covers {attention_mask.size(-1)} positions; expected {S} "
                             f"(cached {cache_start} + new {T})")
        key_valid = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
        if pattern != "dense":
            positions = positions_from_mask(key_valid)  # (B, S)
    if path == "sparse":
        return build_sparse_layout(pattern, window, cache_start, T, key_valid, positions, device,
                                   global_tokens, block_size), False
    mask_mod = attention_mask_mod(pattern, window, cache_start, key_valid, positions, global_tokens)
    B = 1 if key_valid is None else key_valid.size(0)
    if path == "flex":
        if create_block_mask is None:
            raise RuntimeError(f"block-sparse attention needs FlexAttention (torch >= 2.5); torch is {torch.__version__}")
        return create_block_mask(mask_mod, None if key_valid is None else B, None, T, S, device=device), False
    b = torch.arange(B, device=device, dtype=torch.int32)[:, None, None, None]
    q_idx = torch.arange(T, device=device, dtype=torch.int32)[None, None, :, None]
    kv_idx = torch.arange(S, device=device, dtype=torch.int32)[None, None, None, :]
    return mask_mod(b, 0, q_idx, kv_idx).expand(B, 1, T, S), False  # (B|1, 1, T, S)


ADDITIVE_MASKED = -1e3  # an additive mask entry at or below this excludes the key (the starter uses -10000)


def as_causal_mask(attn_mask, num_queries: int):
    """The mask a layer was given, as one `attend` obeys without losing causality.

    Our own masks (None, a boolean (B|1, 1, T, S) mask from `build_attention_mask`, a BlockMask)
    pass unchanged.  A PADDING-ONLY mask of shape (B, 1, 1, S) with T > 1 queries would let every
    query see every later token, so it is turned into the causal + padding mask of those keys:
    boolean (True = real token), or the CS224N starter's additive float mask
    (`get_extended_attention_mask`: 0 for real tokens, -10000 for padding; any value <= -1e3 counts
    as masked).  Anything else is refused: a full additive (B, 1, T, S) float mask (we cannot tell
    whether it is causal), other values, other dtypes or shapes.
    """
    if attn_mask is None or not torch.is_tensor(attn_mask):
        return attn_mask  # None or a FlexAttention BlockMask
    floating = attn_mask.is_floating_point()
    if attn_mask.dtype != torch.bool and not floating:
        raise TypeError(f"attention mask of dtype {attn_mask.dtype}: pass a boolean mask (True = may attend) or "
                        f"the starter's additive float mask (0 = attend, -10000 = padding)")
    if attn_mask.dim() != 4 or attn_mask.size(1) != 1 or attn_mask.size(2) not in (1, num_queries):
        raise ValueError(f"attention mask of shape {tuple(attn_mask.shape)}: expected (B, 1, 1, S) (padding) or "
                         f"(B, 1, {num_queries}, S) (boolean, per query)")
    if floating:
        keep, masked = attn_mask == 0, attn_mask <= ADDITIVE_MASKED
        if not bool((keep | masked).all()):
            raise ValueError("additive attention mask with values other than 0 (attend) and large negatives "
                             "(masked, <= -1e3): a soft bias is not supported; pass a boolean mask")
        if attn_mask.size(2) != 1:
            raise ValueError(f"additive attention mask of shape {tuple(attn_mask.shape)}: a per-query float mask "
                             f"may not be causal; pass a boolean mask, or the (B, 1, 1, S) padding mask")
        attn_mask = keep
    if attn_mask.size(2) == 1 and num_queries > 1:  # padding only: add causality
        S = attn_mask.size(-1)
        if S < num_queries:
            raise ValueError(f"padding mask over {S} keys for {num_queries} queries: it must cover every key")
        attn_mask, _ = build_attention_mask(attn_mask[:, 0, 0, :], num_queries, S - num_queries, attn_mask.device)
    return attn_mask
