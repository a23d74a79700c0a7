"""Beam search and beam sampling with transformers' semantics (its `_beam_search`).

Each step keeps n_cand = max(2, 1 + n_eos) * k candidates per prompt out of the k * V
continuations of its k beams: the n_cand best (beam search), or n_cand drawn without
replacement from softmax(beam score + processed log-prob) (beam sampling, `do_sample=True`;
the warpers temperature -> top-k -> top-p then act on the log-probs and keep at least
max(2, n_eos + 1) tokens, as in transformers).  The k best candidates that did not finish carry
on; finished candidates among the first k join a pool of k hypotheses scored
`sum_logprobs / new_len ** length_penalty` (Wu et al., 2016); `early_stopping` True / False /
"never" and the "can a running beam still win?" heuristic decide when to stop.  The KV cache
rows follow their beams in place (`Decoder.reorder`).  Returns the best hypothesis per prompt,
padded with `pad`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from models.generation.decoder import Decoder
from models.generation.processors import LogitsSettings, process_logits
from models.generation.sampling import StopRules

BEAM_DEAD = -1.0e9  # transformers' score for beams that may not be chosen


def beam_search(model, input_ids: torch.Tensor, mask: Optional[torch.Tensor], max_new_tokens: int, *,
                num_beams: int, length_penalty: float, early_stopping: Union[bool, str],
                settings: LogitsSettings, rules: StopRules, generator: Optional[torch.Generator],
                check_every: int, compile: bool = False) -> torch.Tensor:
    """(B, P) prompts -> (B, P + n_new) best hypotheses; `settings.sample` = beam sampling."""
    B, P = input_ids.shape
    k = num_beams
    device = input_ids.device
    max_len = P + max_new_tokens
    n_eos = 0 if rules.eos_ids is None else rules.eos_ids.numel()
    n_cand = max(2, 1 + n_eos) * k  # candidates kept per step, enough that k can stay unfinished
    is_top_k = torch.arange(n_cand, device=device) < k  # only the first k candidates may finish

    valid = None
    if mask is not None and settings.uses_history:
        valid = torch.ones((B * k, max_len), dtype=torch.bool, device=device)
        valid[:, :P] = mask.bool().repeat_interleave(k, 0)
    seqs = torch.full((B, k, max_len), rules.pad, dtype=torch.long, device=device)
    seqs[:, :, :P] = input_ids[:, None, :]
    run_scores = torch.zeros((B, k), dtype=torch.float32, device=device)
    run_scores[:, 1:] = BEAM_DEAD  # start from one beam so the k beams do not pick the same tokens
    run_newlines = torch.zeros((B, k), dtype=torch.long, device=device)
    fin_seqs = seqs.clone()
    fin_scores = torch.full((B, k), BEAM_DEAD, dtype=torch.float32, device=device)
    fin_done = torch.zeros((B, k), dtype=torch.bool, device=device)
    fin_len = torch.zeros((B, k), dtype=torch.long, device=device)  # new tokens of each finished hypothesis
    improvable = torch.ones((B, 1), dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * k

    decoder = Decoder(model, P, mask, B * k, max_new_tokens, compile=compile)
    try:
        logits = decoder.prefill(input_ids, mask)
        expand = torch.arange(B, device=device).repeat_interleave(k)  # row b -> its k beams
        decoder.expand(expand)
        logits = logits.index_select(0, expand)  # (B*k, V)
        V = logits.size(-1)
        for t in range(max_new_tokens):
            cur = P + t
            if t > 0:
                logits = decoder.step(seqs[:, :, cur - 1].reshape(B * k, 1), t)
            logp = F.log_softmax(logits, dim=-1)
            logp = process_logits(logp, seqs.view(B * k, max_len)[:, :cur], None if valid is None else valid[:, :cur],
                                  t, settings)
            total = (logp.view(B, k, V) + run_scores[:, :, None]).view(B, k * V)
            if settings.sample:
                flat_idx = torch.multinomial(total.softmax(-1), n_cand, generator=generator)  # (B, n_cand)
                cand_scores = total.gather(1, flat_idx)
            else:
                cand_scores, flat_idx = torch.topk(total, n_cand)  # (B, n_cand)
            src, tok = flat_idx // V, flat_idx % V
            cand_seqs = torch.take_along_dim(seqs, src[:, :, None], dim=1)  # (B, n_cand, max_len)
            cand_seqs[:, :, cur] = tok
            hits = torch.full_like(tok, t + 1 >= max_new_tokens, dtype=torch.bool)
            cand_hits, cand_newlines = rules.hits(tok, run_newlines.gather(1, src))
            hits |= cand_hits

            # The k best candidates that did not finish carry on.
            alive_scores = cand_scores + hits.to(torch.float32) * BEAM_DEAD
            keep = torch.topk(alive_scores, k)[1]  # (B, k)
            seqs = torch.take_along_dim(cand_seqs, keep[:, :, None], dim=1)
            run_scores = alive_scores.gather(1, keep)
            run_newlines = cand_newlines.gather(1, keep)
            beam_src = src.gather(1, keep)

            # Finished candidates among the first k join the finished pool if they beat its worst.
            scored = cand_scores / ((t + 1) ** length_penalty)
            pool_full = fin_done.all(-1, keepdim=True) & (early_stopping is True)
            scored += pool_full.to(torch.float32) * BEAM_DEAD
            scored += (~improvable).to(torch.float32) * BEAM_DEAD
            just_finished = hits & is_top_k[None, :]
            scored += (~just_finished) * BEAM_DEAD
            pool = torch.topk(torch.cat((fin_scores, scored), 1), k)[1]
            fin_seqs = torch.take_along_dim(torch.cat((fin_seqs, cand_seqs), 1), pool[:, :, None], dim=1)
            fin_scores = torch.cat((fin_scores, scored), 1).gather(1, pool)
            fin_done = torch.cat((fin_done, just_finished), 1).gather(1, pool)
            fin_len = torch.cat((fin_len, torch.full_like(tok, t + 1)), 1).gather(1, pool)

            if t + 1 < max_new_tokens:
                decoder.reorder((beam_src + batch_offset).view(-1), t)

            # Can a running beam still beat the worst finished one?  (transformers' heuristic)
            best_len = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else t + 1
            best_running = run_scores[:, :1] / (best_len ** length_penalty)
            worst_finished = torch.where(fin_done, fin_scores.min(1, keepdim=True)[0], BEAM_DEAD)
            improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
            if (t + 1) % check_every == 0 or t + 1 == max_new_tokens:
                stop = ~improvable.any() | hits.all()
                if early_stopping is True:
                    stop |= fin_done.all()
                if bool(stop):  # one host read per check
                    break
    finally:
        decoder.close()
    best = fin_seqs[:, 0]  # (B, max_len), padded with `pad` past each hypothesis
    return best[:, :P + int(fin_len[:, 0].max())]
