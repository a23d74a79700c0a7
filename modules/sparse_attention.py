"""The sparse execution path of sparse attention patterns: gathered keys, work ~ T x K.

The masked dense path (`modules/attention.py`, SDPA with a boolean mask) computes every
(query, key) pair and throws most away.  This path computes only the keys a pattern allows
(plus the rest of their blocks), in plain PyTorch ops, forward and backward, on CPU and CUDA,
with attention dropout.  Two kinds of keys:

* blocks, for contiguous key ranges (the local window, a query's own neighbourhood, global
  tokens): queries are cut into blocks of C consecutive slots, keys into blocks of C slots, and
  each query block lists the key blocks holding a key one of its queries may see -- from the
  pattern's key ranges (`pattern_key_ranges`: O(T x ranges), never O(T x S)).  NB = the longest
  list (shorter ones padded with masked blocks), L = NB x C keys per query block.  For a local
  window this is Longformer's sliding-chunk attention (Beltagy et al., 2020): the own block and
  the ceil((W - 1) / C) before it, L ~ W + C;
* points, for isolated keys: the LogSparse keys (Li et al., 2019) a power of two >= C behind
  the query, one per power, P ~ log2(T / C) per query, gathered query by query (a block per
  power would compute C times more scores than needed).

Each query's softmax runs over its L + P scores; the mask on them is the reference `mask_mod`
(`modules.attention_patterns.attention_mask_mod`) evaluated on exactly these pairs (and a
point that also lies in a gathered block is masked once), so the softmax runs over the very
keys of the masked dense reference.  A custom autograd Function processes chunks of query
blocks, FlashAttention-style (Dao et al., 2022): the forward keeps the output, each row's
log-sum-exp and the dropout keep-mask; the backward recomputes the scores.

The layout (`SparseLayout`) is built once per forward from the padding mask and shared by every
layer, like the boolean mask of the dense path; it works for any padding (left, right, holes),
the KV cache (queries after `cache_start` cached slots) and one-token decoding (C = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from modules.attention_patterns import DEFAULT_BLOCK_SIZE, attention_mask_mod, pattern_key_ranges


@dataclass
class SparseLayout:
    """Which keys every query of one forward gathers, and which of those pairs it may use.

    Two kinds of keys: blocks (contiguous ranges: the local window, the own neighbourhood,
    global tokens) and points (isolated keys, the LogSparse offsets >= C: one key of a block).
    key_slots:     (B|1, nQB * L) long, the L block-key slots of each of the nQB query blocks;
    point_slots:   (B|1, nQB * C * P) long, the P point keys of every query (P may be 0);
    blocked:       (B|1, 1, nQB, C, L + P) bool, True where the pair is NOT allowed (masked to
                   -inf), or is a point already among the query block's block keys (each key
                   counts once).
    """
    block_size: int
    num_queries: int
    num_keys: int
    key_slots: torch.Tensor
    point_slots: torch.Tensor
    blocked: torch.Tensor

    @property
    def num_blocks(self) -> int:  # nQB
        return self.blocked.size(2)

    @property
    def keys_per_block(self) -> int:  # L
        return self.key_slots.size(1) // self.num_blocks

    @property
    def points_per_query(self) -> int:  # P
        return self.blocked.size(-1) - self.keys_per_block

    @property
    def keys_per_query(self) -> int:  # scores computed per query: L + P
        return self.blocked.size(-1)


def default_block_size(pattern: str, num_queries: int) -> int:
    """C: the pattern's default, at most the number of queries (one-token decoding: C = 1)."""
    return max(1, min(DEFAULT_BLOCK_SIZE[pattern], num_queries))


def build_sparse_layout(pattern: str, window: int, cache_start: int, num_queries: int,
                        key_valid: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                        device: torch.device, global_tokens: int = 0,
                        block_size: Optional[int] = None) -> SparseLayout:
    """The layout of queries cache_start .. cache_start + T - 1 over slots 0 .. S - 1.

    `key_valid` (B, S) bool marks real tokens (None: no padding); `positions` (B, S) are their
    positions (`positions_from_mask`; None: the slot).  The same arguments as the reference
    `attention_mask_mod`, which decides every gathered pair.
    """
    T, S = num_queries, cache_start + num_queries
    C = block_size or default_block_size(pattern, T)
    nQB, nKB = -(-T // C), -(-S // C)
    Bp = 1 if key_valid is None else key_valid.size(0)
    q_slot = torch.arange(cache_start, S, device=device)  # (T,)
    if positions is None:
        q_pos = q_slot[None]  # (1, T)
    else:
        q_pos = positions[:, cache_start:].long()  # (B, T)
    lo, hi = pattern_key_ranges(pattern, q_pos, window, global_tokens, max_position=S - 1)  # (B|1, T, R)
    nonempty = lo <= hi
    # A one-key range at least C behind is a point; the rest are gathered as key blocks.
    point = nonempty & (lo == hi) & (q_pos[..., None] - lo >= C)
    point_cols = point.flatten(0, 1).any(0)
    in_blocks = nonempty & ~point
    if positions is not None:  # key positions -> slots: the p-th real token of the row
        slot_of = torch.argsort((~key_valid).to(torch.int8), dim=-1, stable=True)  # (B, S)
        lo = slot_of.gather(1, lo.clamp(0, S - 1).flatten(1)).view_as(lo)
        hi = slot_of.gather(1, hi.clamp(0, S - 1).flatten(1)).view_as(hi)
    # Key-block ranges of every query, plus its own block (a padded query sees itself).
    own = (q_slot // C).expand(Bp, T)[..., None]  # (B|1, T, 1)
    first = torch.cat([lo // C, own], -1)
    last = torch.cat([hi // C, own], -1)
    in_blocks = torch.cat([in_blocks, torch.ones_like(own, dtype=torch.bool)], -1)  # (B|1, T, R + 1)
    # Occupancy of (query block, key block): +1 at the first block of a range, -1 after its last.
    row = (torch.arange(Bp, device=device)[:, None] * nQB + torch.arange(T, device=device)[None] // C) * (nKB + 1)
    n = Bp * nQB * (nKB + 1)
    starts = (row[..., None] + first)[in_blocks]
    ends = (row[..., None] + last + 1)[in_blocks]
    occupied = (torch.bincount(starts, minlength=n) - torch.bincount(ends, minlength=n)).view(Bp, nQB, nKB + 1)
    occupied = occupied.cumsum(-1)[..., :nKB] > 0  # (B|1, nQB, nKB)
    counts = occupied.sum(-1)  # (B|1, nQB)
    NB = int(counts.max())
    blocks = torch.argsort(occupied.to(torch.int8), dim=-1, descending=True, stable=True)[..., :NB]  # (B|1, nQB, NB)
    slots = blocks[..., None] * C + torch.arange(C, device=device)  # (B|1, nQB, NB, C)
    slot_ok = (torch.arange(NB, device=device) < counts[..., None])[..., None] & (slots < S)
    slots, slot_ok = slots.clamp(max=S - 1).flatten(2), slot_ok.flatten(2)  # (B|1, nQB, L)
    # The reference mask on the gathered pairs.
    q_idx = torch.arange(nQB * C, device=device).view(nQB, C)
    q_real = q_idx < T
    mask_mod = attention_mask_mod(pattern, window, cache_start, key_valid, positions, global_tokens)
    b = torch.arange(Bp, device=device).view(Bp, 1, 1, 1)
    q_in = q_idx.clamp(max=T - 1)[None, :, :, None]  # (1, nQB, C, 1)
    allowed = mask_mod(b, 0, q_in, slots[:, :, None, :])  # (B|1, nQB, C, L)
    allowed = allowed & slot_ok[:, :, None, :] & q_real[None, :, :, None]
    allowed[..., 0] |= ~q_real  # the rows that pad the last query block: one finite score, no NaN
    # Points: allowed by the reference, and not in a key block the query block already gathers.
    pad = nQB * C - T
    pts = F.pad(lo[..., point_cols], (0, 0, 0, pad))  # (B|1, nQB * C, P)
    pt_ok = F.pad(point[..., point_cols], (0, 0, 0, pad)).view(Bp, nQB, C, -1)
    pts = pts.view(Bp, nQB, C, -1)
    pt_ok &= ~occupied.gather(2, (pts // C).flatten(2)).view_as(pts)
    pt_ok &= mask_mod(b, 0, q_in, pts)
    blocked = ~torch.cat([allowed, pt_ok], -1)[:, None]  # (B|1, 1, nQB, C, L + P)
    return SparseLayout(C, T, S, slots.flatten(1), pts.clamp(max=S - 1).flatten(1), blocked)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SparseLayout,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of q (B, nh, T, hs) over k, v (B, nh, S, hs) on `layout`'s pairs -> (B, nh, T, hs).

    Softmax scale 1/sqrt(hs) as in SDPA; `dropout_p` drops attended probabilities (scaling the
    kept ones by 1 / (1 - p)), as SDPA's dropout does.
    """
    B, H, T, hs = q.shape
    if T != layout.num_queries or k.size(2) != layout.num_keys:
        raise ValueError(f"sparse layout built for {layout.num_queries} queries over {layout.num_keys} keys; "
                         f"got {T} queries over {k.size(2)} keys")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {dropout_p}")
    return _GatheredAttention.apply(q, k, v, layout, dropout_p)



class _GatheredAttention(torch.autograd.Function):
    """Forward and backward over chunks of query blocks: the forward keeps the output, the
    log-sum-exp of every row and the dropout keep-mask; the backward recomputes each chunk's
    scores from them instead of storing T x (L + P) probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, layout: SparseLayout, dropout_p: float):
        B, H, T, hs = q.shape
        k, v = k.contiguous(), v.contiguous()  # (B, nh, S, hs), for the row gathers
        C, nQB = layout.block_size, layout.num_blocks
        pad = nQB * C - T
        qb = (F.pad(q, (0, 0, 0, pad)) if pad else q).reshape(B, H, nQB, C, hs)
        out = torch.empty_like(qb)
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (fp64 inputs: fp64)
        lse = torch.empty(B, H, nQB, C, dtype=acc, device=q.device)
        keep = (torch.empty(B, H, nQB, C, layout.blocked.size(-1), dtype=torch.bool, device=q.device)
                if dropout_p > 0 else None)
        for c0, c1, chunk in _chunks(layout, qb, k, v):
            p = chunk.probabilities(lse[:, :, c0:c1], acc, store_lse=True)
            if keep is not None:
                keep[:, :, c0:c1] = torch.rand_like(p) >= dropout_p
                p.mul_(keep[:, :, c0:c1]).div_(1.0 - dropout_p)
            out[:, :, c0:c1] = chunk.weighted_values(p)
        ctx.save_for_backward(qb, k, v, out, lse, keep)
        ctx.layout, ctx.dropout_p, ctx.T = layout, dropout_p, T
        return out.view(B, H, nQB * C, hs)[:, :, :T]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qb, k, v, out, lse, keep = ctx.saved_tensors
        layout, dropout_p, T = ctx.layout, ctx.dropout_p, ctx.T
        B, H, nQB, C, hs = qb.shape
        pad = nQB * C - T
        dout = (F.pad(dout, (0, 0, 0, pad)) if pad else dout).reshape(B, H, nQB, C, hs)
        dq = torch.empty_like(qb)
        dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        acc = lse.dtype
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (B, nh, nQB, C, 1): rowsum(dP * P)
        for c0, c1, chunk in _chunks(layout, qb, k, v):
            p = chunk.probabilities(lse[:, :, c0:c1], acc, store_lse=False)  # softmax probabilities
            do_c = dout[:, :, c0:c1]
            dp = chunk.value_scores(do_c).to(acc)  # d(dropped probabilities)
            if keep is not None:
                kept = keep[:, :, c0:c1] / (1.0 - dropout_p)
                chunk.add_value_grad(dv, (p * kept).to(do_c.dtype), do_c)
                dp.mul_(kept)
            else:
                chunk.add_value_grad(dv, p.to(do_c.dtype), do_c)
            ds = p.mul_(dp.sub_(delta[:, :, c0:c1])).mul_(chunk.scale).to(qb.dtype)  # d(scores) * scale
            dq[:, :, c0:c1] = chunk.query_grad(ds)
            chunk.add_key_grad(dk, ds)
        return dq.view(B, H, nQB * C, hs)[:, :, :T], dk, dv, None, None


# Query blocks per chunk: each chunk's gathered keys and scores stay a few MB (reused memory)
# instead of T x (L + P) tensors per step.
CHUNK_ELEMENTS = 1 << 16


def _chunks(layout: SparseLayout, qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(first block, end block, _Chunk) over the query blocks, a few MB of scores at a time."""
    B, H, nQB, C, hs = qb.shape
    step = max(1, CHUNK_ELEMENTS // (B * H * C * layout.blocked.size(-1)))
    for c0 in range(0, nQB, step):
        c1 = min(nQB, c0 + step)
        yield c0, c1, _Chunk(layout, qb, k, v, c0, c1)


class _Chunk:
    """Query blocks c0 .. c1 - 1 with their gathered block keys (L) and point keys (P)."""

    def __init__(self, layout: SparseLayout, qb, k, v, c0: int, c1: int):
        B, H, _, C, hs = qb.shape
        L, P = layout.keys_per_block, layout.points_per_query
        self.q, self.L, self.P, self.scale = qb[:, :, c0:c1], L, P, 1.0 / math.sqrt(hs)
        self.blocked = layout.blocked[:, :, c0:c1]
        self.idx = layout.key_slots[:, c0 * L:c1 * L]
        self.kg, self.vg = [_gather(x, self.idx).view(B, H, c1 - c0, L, hs) for x in (k, v)]  # (B, nh, n, L, hs)
        if P:
            self.pidx = layout.point_slots[:, c0 * C * P:c1 * C * P]
            self.kp, self.vp = [_gather(x, self.pidx).view(B, H, c1 - c0, C, P, hs) for x in (k, v)]

    def probabilities(self, lse: torch.Tensor, acc: torch.dtype, store_lse: bool) -> torch.Tensor:
        """Softmax over each query's L + P keys, (B, nh, n, C, L + P); computes `lse` (B, nh, n, C)
        in place when `store_lse`, else uses it."""
        s = torch.matmul(self.q, self.kg.transpose(-1, -2))  # (B, nh, n, C, L)
        if self.P:
            s = torch.cat([s, torch.einsum("bhncd,bhncpd->bhncp", self.q, self.kp)], -1)  # (B, nh, n, C, L + P)
        s = s.to(acc).mul_(self.scale).masked_fill_(self.blocked, float("-inf"))
        if store_lse:
            lse.copy_(torch.logsumexp(s, -1))
        return s.sub_(lse[..., None]).exp_()

    def weighted_values(self, p: torch.Tensor) -> torch.Tensor:
        """(B, nh, n, C, L + P) probabilities -> (B, nh, n, C, hs) weighted sum of the values."""
        p = p.to(self.vg.dtype)
        y = torch.matmul(p[..., :self.L], self.vg)
        if self.P:
            y += torch.einsum("bhncp,bhncpd->bhncd", p[..., self.L:], self.vp)
        return y

    def value_scores(self, do: torch.Tensor) -> torch.Tensor:
        """do (B, nh, n, C, hs) -> do . v for every key, (B, nh, n, C, L + P)."""
        s = torch.matmul(do, self.vg.transpose(-1, -2))
        if self.P:
            s = torch.cat([s, torch.einsum("bhncd,bhncpd->bhncp", do, self.vp)], -1)
        return s

    def add_value_grad(self, dv: torch.Tensor, p: torch.Tensor, do: torch.Tensor) -> None:
        _scatter_add(dv, self.idx, torch.matmul(p[..., :self.L].transpose(-1, -2), do).flatten(2, 3))
        if self.P:
            _scatter_add(dv, self.pidx, (p[..., self.L:, None] * do[..., None, :]).flatten(2, 4))

    def query_grad(self, ds: torch.Tensor) -> torch.Tensor:
        dq = torch.matmul(ds[..., :self.L], self.kg)
        if self.P:
            dq += torch.einsum("bhncp,bhncpd->bhncd", ds[..., self.L:], self.kp)
        return dq

    def add_key_grad(self, dk: torch.Tensor, ds: torch.Tensor) -> None:
        _scatter_add(dk, self.idx, torch.matmul(ds[..., :self.L].transpose(-1, -2), self.q).flatten(2, 3))
        if self.P:
            _scatter_add(dk, self.pidx, (ds[..., self.L:, None] * self.q[..., None, :]).flatten(2, 4))


def _flat_index(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Slots idx (B|1, N) of x (B, nh, S, hs) -> rows of x.view(-1, hs), (B * nh * N,)."""
    B, H, S, _ = x.shape
    rows = torch.arange(B * H, device=x.device).view(B, H, 1) * S
    return (rows + idx[:, None, :]).flatten()


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, nh, S, hs) contiguous, idx (B|1, N) slots -> (B, nh, N, hs).  Rows of a 2-D view:
    many times faster on CPU than index_select along dim 2 of the 4-D tensor."""
    B, H, _, hs = x.shape
    return x.view(-1, hs).index_select(0, _flat_index(x, idx)).view(B, H, -1, hs)


def _scatter_add(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """out[:, :, idx] += src (repeated slots add up); the adjoint of `_gather`."""
    out.view(-1, out.size(-1)).index_add_(0, _flat_index(out, idx), src.reshape(-1, out.size(-1)))
