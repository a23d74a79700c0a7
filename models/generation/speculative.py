"""Speculative decoding (Leviathan et al., 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al., 2023): a small draft model proposes k tokens one at a time,
the target scores all of them in one forward, and a prefix of them is accepted.

* Greedy: draft token j is accepted while it equals the target's argmax at that position; the
  target's argmax after the accepted prefix comes free (a correction, or a bonus token when all
  k were accepted).  The output is plain greedy decoding of the target (up to float ties: the
  verify forward computes the same logits as one-token steps to ~1e-6).
* Sampling: draft token d ~ q is accepted with probability min(1, p(d) / q(d)); at the first
  rejection the token is drawn from norm(max(0, p - q)), after k acceptances from p.  Each
  token is then distributed exactly as p (Leviathan et al., Theorem 1), p and q being the
  processed (temperature, top-k, top-p) target and draft distributions.

Batches: rows accept different numbers of tokens, yet every row's cache uses the same slots.
An iteration writes slots s..s+k for every row ([last, d_1..d_k]); a row that accepted n < k
marks slots s+n+1..s+k invalid (masked out, like padding; positions come from the mask, so the
row is encoded as if they were never there) and the next iteration starts at s + 1 + max n.
When the slots run out, the cache is compacted (each row's valid slots moved to the right end).
The draft re-feeds the token at slot s - 1 with its first proposal: after k acceptances that
is d_k, which the draft had proposed but not yet cached.  Host reads: one per round (how far the
slots advance, -1 once every row is done; with `on_token` one more), the statistics are counted
on the device and read at the end, and no boolean-mask indexing (a device sync) is used.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from models.generation.decoder import FUSE_QKV_DEVICES, lm_logits, step_masks
from models.generation.processors import LogitsSettings, NEG_INF, warp
from models.generation.sampling import StopRules


def _forward(gpt, tokens: torch.Tensor, positions: torch.Tensor, start: int,
             key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """tokens (B, T) at cache slots start..start+T-1 -> hidden states (B, T, D); `key_valid`
    (B, >= start + T) marks the slots that may be attended to (None: all)."""
    end = start + tokens.size(1)
    masks = step_masks(gpt, None if key_valid is None else key_valid[:, :end], tokens.size(1), start, tokens.device)
    return gpt.encode_with_masks(tokens, positions, masks, cache_start=start)


def _processed(logits: torch.Tensor, index: torch.Tensor, s: LogitsSettings) -> torch.Tensor:
    """Logits (N, V) of the tokens with new-token indices `index` (N,) -> processed scores:
    EOS suppressed before `min_new_tokens`, then (sampling) the warpers."""
    if s.eos_ids is not None and s.min_new_tokens > 0:
        early = (index < s.min_new_tokens)[:, None]
        eos = torch.zeros_like(logits, dtype=torch.bool).index_fill_(-1, s.eos_ids, True)
        logits = logits.masked_fill(early & eos, NEG_INF)
    return warp(logits, s) if s.sample else logits


def _compact(models, key_valid: torch.Tensor, slot_tokens: torch.Tensor, s: int) -> int:
    """Move every row's valid slots (< s) to the right end of slots 0..C-1 (C = most valid slots
    of a row), in order, in both caches, `key_valid` and `slot_tokens`; returns C."""
    valid = key_valid[:, :s]
    C = int(valid.sum(-1).max())
    src = torch.sort(valid.to(torch.int8), dim=-1, stable=True).indices[:, s - C:]  # (B, C): holes first
    key_valid[:, :C] = valid.gather(1, src)
    key_valid[:, C:] = 0
    slot_tokens[:, :C] = slot_tokens[:, :s].gather(1, src)
    for model in models:
        for layer in model.gpt.gpt_layers:
            cache = layer.self_attention.kv_cache
            for name in ("k", "v"):
                buf = getattr(cache, name)  # (B, nh, S, hs)
                idx = src[:, None, :, None].expand(-1, buf.size(1), -1, buf.size(3))
                buf[:, :, :C] = buf[:, :, :s].gather(2, idx)
    return C


def speculative_decode(model, draft, input_ids: torch.Tensor, mask: Optional[torch.Tensor], max_new_tokens: int,
                       settings: LogitsSettings, rules: StopRules, generator: Optional[torch.Generator],
                       k: int, on_token: Optional[Callable[[torch.Tensor], None]] = None) -> tuple[torch.Tensor, dict]:
    """(B, P) prompts -> ((B, P + n_new) tokens, statistics of the run).  `on_token` gets the (B,)
    tokens of each new-token index once every row has committed it (pad for finished rows)."""
    B, P = input_ids.shape
    device = input_ids.device
    slots = P + max_new_tokens + 2 * (k + 1)
    steps = torch.arange(k + 1, device=device)
    # Drafts past max_new_tokens are never kept; their positions are clamped into the embedding table.
    top = min(model.config.max_position_embeddings, draft.config.max_position_embeddings) - 1
    key_valid = torch.ones((B, slots), dtype=torch.long, device=device)
    if mask is not None:
        key_valid[:, :P] = mask
    holes = mask is not None or B > 1  # otherwise every slot stays valid: maskless one-token steps
    slot_tokens = torch.zeros((B, slots), dtype=torch.long, device=device)
    slot_tokens[:, :P] = input_ids
    out = torch.full((B, max_new_tokens + k + 1), rules.pad, dtype=torch.long, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)  # committed new tokens
    newlines = torch.zeros(B, dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    n_iter = compactions = 0
    drafted, accepted = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))  # read at the end
    emitted = 0  # new-token indices passed to on_token

    def emit(upto: int) -> None:  # indices emitted..upto-1, every row's final token (pad past a row's end)
        nonlocal emitted
        for j in range(emitted, upto):
            on_token(out[:, j].masked_fill(n_out <= j, rules.pad))
        emitted = max(emitted, upto)

    for m in (model, draft):
        m.setup_kv_cache(B, slots)
        if device.type in FUSE_QKV_DEVICES:
            m.fuse_qkv()
    try:
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
        h = model.gpt.encode(input_ids, mask, positions, cache_start=0)
        draft.gpt.encode(input_ids, mask, positions, cache_start=0)
        pos = (torch.full((B,), P, device=device) if mask is None else mask.sum(-1))  # position of `last`
        logits = _processed(lm_logits(model.gpt, h[:, -1]), n_out, settings)
        last = (torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1) if settings.sample
                else logits.argmax(-1))  # (B,) new token 0, not yet in any cache
        out[:, 0] = last
        n_out += 1
        done, newlines = rules.hits(last, newlines)
        unfinished &= ~done & (n_out < max_new_tokens)
        s = P
        more = bool(unfinished.any())  # then each round reads once, at its end
        while more:
            if s + k + 1 > slots:
                s = _compact((model, draft), key_valid, slot_tokens, s)
                compactions += 1
            n_iter += 1
            kv = key_valid if holes else None
            # Draft: k proposals; the first forward re-feeds slot s - 1 (see the module docstring).
            key_valid[:, s:s + k + 1] = 1
            proposals, q_dists = [], []
            feed = torch.stack((slot_tokens[:, s - 1], last), 1)  # (B, 2)
            feed_pos = torch.stack((pos - 1, pos), 1).clamp(min=0, max=top)
            start = s - 1
            for j in range(k):
                hd = _forward(draft.gpt, feed, feed_pos, start, kv)
                q = _processed(lm_logits(draft.gpt, hd[:, -1]), n_out + j, settings)  # (B, V)
                if settings.sample:
                    q = q.softmax(-1)
                    d = torch.multinomial(q, 1, generator=generator).squeeze(1)
                    q_dists.append(q)
                else:
                    d = q.argmax(-1)
                proposals.append(d)
                feed, feed_pos, start = d[:, None], (pos + j + 1).clamp(max=top)[:, None], s + j + 1
            drafts = torch.stack(proposals, 1)  # (B, k)
            # Target: [last, d_1..d_k] at slots s..s+k in one forward; p_j predicts the token after slot s+j.
            fed = torch.cat((last[:, None], drafts), 1)  # (B, k+1)
            ht = _forward(model.gpt, fed, (pos[:, None] + steps).clamp(max=top), s, kv)  # (B, k+1, D)
            index = (n_out[:, None] + steps).reshape(-1)
            p = _processed(lm_logits(model.gpt, ht.reshape(B * (k + 1), -1)), index, settings).view(B, k + 1, -1)
            if settings.sample:
                p = p.softmax(-1)
                q = torch.stack(q_dists, 1)  # (B, k, V)
                u = torch.rand((B, k), generator=generator, device=device)
                p_d = p[:, :k].gather(2, drafts[:, :, None]).squeeze(2)
                q_d = q.gather(2, drafts[:, :, None]).squeeze(2)
                ok = u * q_d < p_d  # accept with probability min(1, p/q)
            else:
                choice = p.argmax(-1)  # (B, k+1)
                ok = drafts == choice[:, :k]
            n_acc = ok.to(torch.long).cumprod(1).sum(1)  # (B,) leading acceptances
            if settings.sample:
                rows = torch.arange(B, device=device)
                target = p[rows, n_acc]  # (B, V): p after the accepted prefix
                rejected = n_acc < k
                residual = (target - q[rows, n_acc.clamp(max=k - 1)]).clamp(min=0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target)
                final = torch.multinomial(torch.where(rejected[:, None], residual, target), 1,
                                          generator=generator).squeeze(1)
                committed = torch.cat((drafts, drafts[:, :1]), 1).scatter(1, n_acc[:, None], final[:, None])
            else:
                committed = choice  # accepted drafts equal the target's choices
            # Stop rules over the committed tokens j <= n_acc; the max_new_tokens-th token ends a row too.
            in_play = (steps[None, :] <= n_acc[:, None]) & unfinished[:, None]  # (B, k+1)
            done = torch.zeros_like(in_play)
            if rules.eos_ids is not None:
                done |= torch.isin(committed, rules.eos_ids)
            cum_nl = newlines[:, None] + (torch.zeros_like(committed) if rules.stop is None
                                          else (rules.nl_counts[committed] * in_play).cumsum(1))
            if rules.stop is not None:
                done |= cum_nl >= rules.stop[:, None]
            done |= (n_out[:, None] + steps) >= max_new_tokens - 1
            done &= in_play
            ends = done.any(1)
            length = torch.where(ends, done.to(torch.long).argmax(1) + 1, n_acc + 1) * unfinished  # tokens kept
            out.scatter_(1, n_out[:, None] + steps, committed)  # past `length`: overwritten later or cropped
            newlines = cum_nl.gather(1, (length - 1).clamp(min=0)[:, None]).squeeze(1).where(length > 0, newlines)
            drafted += k * unfinished.sum()
            accepted += (n_acc * unfinished).sum()
            # Cache bookkeeping: slots s..s+k hold [last, d_1..d_k]; valid up to the accepted prefix.
            slot_tokens[:, s:s + k + 1] = fed
            key_valid[:, s:s + k + 1] = ((steps[None, :] <= n_acc[:, None]) & unfinished[:, None]).to(key_valid.dtype)
            n_out += length
            pos += n_acc + 1
            last = committed.gather(1, n_acc[:, None]).squeeze(1)
            unfinished &= ~ends
            advance = int(torch.where(unfinished, n_acc, -1).max())  # the round's one host read; -1: all done
            if advance < 0:
                break
            if on_token is not None:
                emit(int(torch.where(unfinished, n_out, max_new_tokens).min()))
            s += 1 + advance
    finally:
        for m in (model, draft):
            m.clear_kv_cache()
            m.unfuse_qkv()
    width = int(n_out.max())
    if on_token is not None:
        emit(width)
    new = out[:, :width].masked_fill(torch.arange(width, device=device)[None, :] >= n_out[:, None], rules.pad)
    drafted, accepted = int(drafted), int(accepted)
    stats = {"target_forwards": n_iter + 1, "draft_tokens": drafted, "accepted_tokens": accepted,
             "acceptance_rate": accepted / drafted if drafted else float("nan"), "compactions": compactions}
    return torch.cat((input_ids, new), 1), stats
