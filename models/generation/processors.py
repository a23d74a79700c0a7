"""Logits processors in transformers' order and semantics, and an exact fast nucleus filter.

Repetition penalty (Keskar et al., 2019, CTRL), no-repeat-n-gram blocking (Paulus et al., 2018),
min-new-tokens EOS suppression, then for sampling temperature -> top-k (Fan et al., 2018) ->
top-p (Holtzman et al., 2020).  Every function gives bit for bit what the matching transformers
LogitsProcessor gives (tests/test_generation.py).

Exact fast nucleus (`top_p_filter`).  The full algorithm (`top_p_filter_full`, transformers'
TopPLogitsWarper) sorts the whole vocabulary (12 x 50,257 logits: about a third of a decode step
on a CPU).  The nucleus of a trained model holds a few hundred tokens, so we look only at the
`NUCLEUS_CANDIDATES` largest logits (`torch.topk`) and compute in float64 the mass c_i of each
candidate and every less probable token, which is what the full algorithm compares with 1 - p
(it drops a token when its float32 cumulative mass `cum_i <= 1 - p`).  A row takes the full
sort instead when
* its candidates do not reach the boundary (candidate mass below p: a flat distribution; when
  even K times the top probability is below p for every row, `torch.topk` is skipped), or
* a candidate's c_i lies within `nucleus_rtol(...) * c_i` of 1 - p, where the float32 arithmetic
  of the full algorithm could decide either way (a rigorous error bound, derived there), or
* the boundary falls inside a group of tied logits (then the full sort's order of the ties
  decides which of them it keeps; we let it decide).
Every other row keeps exactly the tokens the full algorithm keeps, so the filtered scores, and
with a seeded generator the drawn token, are identical.  Ties inside the kept set or inside the
dropped set do not matter (all kept / all dropped); `min_tokens_to_keep` keeps the top ones as
transformers does, and a tie across that boundary also takes the full sort.  The fallback reads
a flag back to the host, free on a CPU; on other devices (where the sort is cheap and a host
read is not) `top_p_filter` runs the full algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
NUCLEUS_CANDIDATES = 1024
# Devices on which top_p_filter uses the candidate set (a host read per call decides the fallback).
NUCLEUS_FAST_DEVICES = ("cpu",)


def nucleus_rtol(vocab_size: int, e: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Per-row bound on |cum_i - c_i| / c_i, `cum_i` being the full algorithm's float32
    cumulative mass and c_i the exact one; e (N, K) float64 exp(x - max) of the candidates in
    descending order, total (N, 1) the float64 sum over the whole row.

    `cum = softmax(sorted).cumsum()` on a CPU: the cumsum accumulates in float64 (exact enough),
    so the error is that of the float32 softmax: its exponentials, the product with 1 / sum
    (a few ulp each; 128 ulp are allowed for them, the rounding of x - max for logit gaps up to
    ~100 included) and above all its float32 sum s of the V exponentials.  That sum runs in one
    vector accumulator of L >= 8 lanes over the ascending array (`vec::reduce_all`), then adds
    the lanes: by Higham ("Accuracy and Stability of Numerical Algorithms", 2002, eq. 4.3) its
    error is at most 2^-24 * sum over terms of (term * the additions it takes part in).  A term
    of descending rank i meets at most i / 8 + 2 later additions in its lane, any term at most
    V / 8 + 2, plus log2(L) <= 4 for the lanes.  The candidates' ranks are known, the rest of
    the row (mass total - sum(e)) is bounded by V / 8 + 2: a peaked row gets a bound of ~1e-5
    (the measured error is ~2e-7), a flat one ~4e-4."""
    u = 2.0 ** -24
    rank = torch.arange(e.size(-1), device=e.device, dtype=e.dtype)
    head = (e * (rank / 8 + 2)).sum(-1, keepdim=True)
    rest = (total - e.sum(-1, keepdim=True)).clamp(min=0) * (vocab_size / 8 + 2)
    return u * ((head + rest) / total + 4 + 128)  # (N, 1)


# ---- processors ---------------------------------------------------------------------------------------
def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, valid: Optional[torch.Tensor],
                             penalty: float) -> torch.Tensor:
    """CTRL's penalty: scores of tokens present in `history` (B, L) are divided by `penalty`
    when positive and multiplied when negative.  Positions where `valid` is False (padding)
    do not count."""
    V = scores.size(-1)
    ids = history.clamp(max=V)
    if valid is not None:
        ids = ids.masked_fill(~valid, V)  # padding goes to a spare column that is dropped below
    padded = F.pad(scores, (0, 1))  # (B, V + 1)
    picked = padded.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, ids, picked)[:, :V]


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, valid: Optional[torch.Tensor],
                        n: int) -> torch.Tensor:
    """Forbid every token that would complete an n-gram already present in `history` (B, L).
    N-grams that touch padding (`valid` False) are ignored."""
    B, L = history.shape
    if L < n:
        return scores
    V = scores.size(-1)
    windows = history.unfold(1, n, 1)  # (B, L - n + 1, n)
    suffix = history[:, L - n + 1:]  # (B, n - 1): the n-gram the next token would complete
    matches = (windows[..., :-1] == suffix[:, None, :]).all(-1)  # (B, L - n + 1)
    if valid is not None:
        matches &= valid.unfold(1, n, 1).all(-1) & valid[:, L - n + 1:].all(-1, keepdim=True)
    banned = torch.zeros((B, V + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], NEG_INF)


def top_k_filter(scores: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores per row (ties with the k-th kept too); the rest become -inf."""
    k = min(max(k, min_tokens_to_keep), scores.size(-1))
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter_full(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """The full nucleus algorithm (transformers' TopPLogitsWarper): keep the smallest set of most
    probable tokens whose probability reaches p (at least `min_tokens_to_keep`); the rest -inf."""
    ascending, order = torch.sort(scores, dim=-1)
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)  # mass of this token and every less probable one
    drop = cum <= (1.0 - p)
    drop[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def top_p_filter(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1,
                 candidates: int = NUCLEUS_CANDIDATES) -> torch.Tensor:
    """Exactly `top_p_filter_full`, computed on the `candidates` largest scores of each row when
    that decides the row (see the module docstring); (..., V) -> (..., V)."""
    V = scores.size(-1)
    K = min(V, max(candidates, min_tokens_to_keep + 1))
    if K >= V or scores.device.type not in NUCLEUS_FAST_DEVICES:
        return top_p_filter_full(scores, p, min_tokens_to_keep)
    flat = scores.reshape(-1, V)  # (N, V)
    total = (flat.double() - flat.max(-1, keepdim=True).values.double()).exp().sum(-1, keepdim=True)  # (N, 1)
    if bool((K / total < p).all()):  # K tokens of at most the top probability 1/total cannot hold p: flat rows
        return top_p_filter_full(scores, p, min_tokens_to_keep)
    out, fallback = nucleus_on_candidates(flat, p, min_tokens_to_keep, K, total)
    if bool(fallback.any()):  # host read: only on NUCLEUS_FAST_DEVICES
        rows = fallback.nonzero().squeeze(1)
        out[rows] = top_p_filter_full(flat[rows], p, min_tokens_to_keep)
    return out.view(scores.shape)


def nucleus_on_candidates(flat: torch.Tensor, p: float, min_tokens_to_keep: int, K: int,
                          total: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate-set nucleus of rows (N, V): (filtered scores (N, V), fallback (N,) bool).
    Rows flagged `fallback` are not decided by their K largest scores (their output row is
    meaningless); every other row equals `top_p_filter_full`'s.  `total` (N, 1): the float64
    softmax denominator sum(exp(x - max)), computed here when not given."""
    V = flat.size(-1)
    cand, index = torch.topk(flat, K, dim=-1)  # (N, K), descending
    top = cand[:, :1].double()
    if total is None:
        total = (flat.double() - top).exp().sum(-1, keepdim=True)  # (N, 1): float64 softmax denominator
    e = (cand.double() - top).exp()  # (N, K)
    mass = 1.0 - (e.cumsum(-1) - e) / total  # c_i: candidate i and everything less probable
    threshold = torch.tensor(1.0 - p, dtype=flat.dtype).item()  # what `cum <= 1 - p` compares with
    rank = torch.arange(K, device=flat.device)
    kept = torch.clamp((mass > threshold).sum(-1), min=min_tokens_to_keep)  # (N,): a prefix of the candidates
    uncertain = ((mass - threshold).abs() <= nucleus_rtol(V, e, total) * mass) & (rank >= min_tokens_to_keep)
    last_kept = cand.gather(1, (kept - 1)[:, None]).squeeze(1)
    first_dropped = cand.gather(1, kept.clamp(max=K - 1)[:, None]).squeeze(1)
    fallback = uncertain.any(-1) | (kept >= K) | (last_kept == first_dropped)
    drop = torch.ones_like(flat, dtype=torch.bool).scatter_(1, index, rank >= kept[:, None])
    return flat.masked_fill(drop, NEG_INF), fallback


# ---- one step's processing ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitsSettings:
    """Every logits-processing choice of one generate() call."""
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    eos_ids: Optional[torch.Tensor] = None  # (n_eos,)
    sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_tokens_to_keep: int = 1  # transformers keeps n_eos + 1 (at least 2) for beam sampling

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0


def process_logits(scores: torch.Tensor, history: torch.Tensor, valid: Optional[torch.Tensor], step: int,
                   s: LogitsSettings) -> torch.Tensor:
    """All logits processing for the token of new-token index `step`, in transformers' order.
    scores (B, V), history (B, L) tokens so far, valid (B, L) False on padding (or None)."""
    if s.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, history, valid, s.repetition_penalty)
    if s.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, history, valid, s.no_repeat_ngram_size)
    if step < s.min_new_tokens and s.eos_ids is not None:
        scores = scores.index_fill(-1, s.eos_ids, NEG_INF)
    return warp(scores, s) if s.sample else scores


def warp(scores: torch.Tensor, s: LogitsSettings) -> torch.Tensor:
    """The sampling warpers: temperature -> top-k -> top-p (transformers' order)."""
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        scores = top_k_filter(scores, s.top_k, s.min_tokens_to_keep)
    if s.top_p is not None and s.top_p < 1.0:
        scores = top_p_filter(scores, s.top_p, s.min_tokens_to_keep)
    return scores
