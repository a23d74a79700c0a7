"""Text generation for GPT2LMHeadModel: one `generate()` for greedy, sampling and beam search.

Decoding follows Holtzman et al. (2020) for nucleus (top-p) sampling, Fan et al. (2018) for
top-k, Keskar et al. (2019) for the repetition penalty and Paulus et al. (2018) for n-gram
blocking; beam search is the one transformers implements (Wu et al., 2016 length penalty), and
every choice below is made so that the tokens are identical to `transformers`' `generate` on
the same weights (tests/test_generation.py proves it).

How it runs
* Prefill once with the whole (left-padded) prompt into the preallocated KV cache of
  `modules/attention.py`, then feed one token per step.  Only the last position goes through the
  output layer.  Positions come from the mask (`cumsum(mask) - 1`), so a left-padded prompt is
  encoded exactly as it would be alone.  Without padding no mask is built at all (SDPA runs
  `is_causal` for the prefill and maskless for each step).
* Logits are processed in transformers' order: repetition penalty, no-repeat-n-gram,
  min-new-tokens EOS suppression, then (sampling only) temperature -> top-k -> top-p.  top-p always
  keeps at least one token.  `do_sample=False` or `temperature=0` is greedy (argmax).  Sampling
  draws `torch.multinomial(probs, 1, generator=generator)`.
* Rows stop independently: on an EOS token, or (`stop_newlines`) once their continuation holds
  that many "\\n" characters.  A finished row is filled with `pad_token_id`.
* Host synchronisation: none per token unless a stop rule (EOS or `stop_newlines`) is active.
  With one, "are all rows finished?" is read every `STOP_CHECK_EVERY[device]` steps (every step
  on the CPU, where reading a tensor costs nothing; every 8 steps on CUDA).  Steps run past the
  point where every row finished only append padding, and the output is cropped to the step at
  which the last row finished, so the result does not depend on how often we look.
* Beam search (`num_beams > 1`) is a sibling loop with transformers' semantics: 2 * num_beams
  (more with several EOS ids) candidates per step, finished hypotheses scored
  `sum_logprobs / new_len ** length_penalty`, `early_stopping` True / False / "never", and the KV
  cache reordered with `reorder_kv_cache` after every step.  It returns the best hypothesis per
  prompt, padded with `pad_token_id`.  Beam sampling is not implemented.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
# How often (in decode steps) the loop reads "all rows finished?" back to the host.
STOP_CHECK_EVERY = {"cpu": 1, "cuda": 8}
_BEAM_DEAD = -1.0e9  # transformers' score for beams that may not be chosen


# ---- inputs ------------------------------------------------------------------------------------
def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths -> LEFT-padded (input_ids, attention_mask), both (B, T)."""
    if len(sequences) == 0:
        raise ValueError("left_pad: no sequences given")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"left_pad: sequence {lengths.index(0)} is empty; every prompt needs at least one token")
    T = max(lengths)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, T - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[i, T - len(seq):] = 1
    return input_ids, attention_mask


def newline_counts(tokenizer) -> torch.Tensor:
    """(V,) LongTensor: how many "\\n" characters each token id of `tokenizer` decodes to."""
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)], clean_up_tokenization_spaces=False)
    return torch.tensor([t.count("\n") for t in texts], dtype=torch.long)


# ---- logits processors (transformers' order and semantics) ---------------------------------------
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


def top_p_filter(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability reaches p
    (at least `min_tokens_to_keep`); the rest become -inf."""
    ascending, order = torch.sort(scores, dim=-1)
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)  # mass of this token and every less probable one
    drop = cum <= (1.0 - p)
    drop[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def _process(scores: torch.Tensor, history: torch.Tensor, valid: Optional[torch.Tensor], step: int, *,
             repetition_penalty: float, no_repeat_ngram_size: int, min_new_tokens: int,
             eos_ids: Optional[torch.Tensor], sample: bool, temperature: float, top_k: Optional[int],
             top_p: Optional[float]) -> torch.Tensor:
    """All logits processing for one step, in transformers' order."""
    if repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, history, valid, repetition_penalty)
    if no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, history, valid, no_repeat_ngram_size)
    if step < min_new_tokens and eos_ids is not None:
        scores = scores.index_fill(-1, eos_ids, NEG_INF)
    if sample:
        if temperature != 1.0:
            scores = scores / temperature
        if top_k:
            scores = top_k_filter(scores, top_k)
        if top_p is not None and top_p < 1.0:
            scores = top_p_filter(scores, top_p)
    return scores


# ---- the engine ------------------------------------------------------------------------------------
def _next_logits(model, tokens: torch.Tensor, mask: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                 cache_start: int) -> torch.Tensor:
    """Run `tokens` (B, T) through the cached model; float32 logits of the last position (B, V)."""
    gpt = model.gpt
    h = gpt.encode(tokens, mask, positions, cache_start)[:, -1]  # (B, D): only the last goes through the head
    return gpt.hidden_state_to_token(h).float()


def _as_id_tensor(ids: Union[None, int, Sequence[int], torch.Tensor], device) -> Optional[torch.Tensor]:
    if ids is None:
        return None
    t = torch.as_tensor([ids] if isinstance(ids, int) else ids, dtype=torch.long, device=device).flatten()
    return t if t.numel() else None


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: int = 128, min_new_tokens: int = 0, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             stop_newlines: Union[None, int, torch.Tensor] = None,
             newline_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Continue LEFT-padded prompts `input_ids` (B, T_in); returns (B, T_in + n_new) token ids.

    Arguments mean what they mean in transformers' `generate`.  `eos_token_id=None` means no EOS
    stop; `pad_token_id=None` means `model.config.pad_token_id`.  `stop_newlines` (int or (B,))
    ends a row once its continuation holds that many "\\n" (needs `newline_counts`, made by
    `models.generation.newline_counts(tokenizer)`).  The model runs in eval mode (dropout off) and
    is put back in its previous mode afterwards.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    B, P = input_ids.shape
    config = model.config
    if P == 0:
        raise ValueError("input_ids is empty: every prompt needs at least one token")
    if max_new_tokens < 0 or min_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and min_new_tokens ({min_new_tokens}) must be >= 0")
    if P + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{config.max_position_embeddings} positions; shorten the prompt or max_new_tokens")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    sample = do_sample and temperature > 0
    if num_beams > 1 and sample:
        raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not implemented; "
                         "use do_sample=False for beam search")
    if not sample and (top_k or (top_p is not None and top_p < 1.0) or temperature not in (0.0, 1.0)):
        warnings.warn("temperature/top_k/top_p only apply when sampling (do_sample=True, temperature > 0); "
                      "decoding greedily", stacklevel=2)

    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    eos_ids = _as_id_tensor(eos_token_id, device)

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    # One host read for validation and to choose the maskless fast path.
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()) or bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask must be LEFT-padded (zeros, then ones, with a real last token); "
                         "build batches with models.generation.left_pad")
    padded = bool((attention_mask == 0).any())

    stop = None
    if stop_newlines is not None:
        if newline_counts is None:
            raise ValueError("stop_newlines needs newline_counts=models.generation.newline_counts(tokenizer)")
        stop = torch.as_tensor(stop_newlines, dtype=torch.long, device=device).expand(B).contiguous()
        if bool((stop < 1).any()):
            raise ValueError(f"stop_newlines must be >= 1, got {stop_newlines}")
        V = config.vocab_size
        if newline_counts.numel() > V:
            raise ValueError(f"newline_counts has {newline_counts.numel()} entries but the model has {V} tokens")
        newline_counts = F.pad(newline_counts.to(device=device, dtype=torch.long), (0, V - newline_counts.numel()))

    if max_new_tokens == 0:
        return input_ids.clone()
    check_every = STOP_CHECK_EVERY.get(device.type, 8)
    was_training = model.training
    model.eval()
    try:
        common = dict(model=model, input_ids=input_ids, mask=attention_mask, padded=padded,
                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                      repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                      eos_ids=eos_ids, pad=pad, stop=stop, nl_counts=newline_counts, check_every=check_every)
        if num_beams > 1:
            return _beam_search(num_beams=num_beams, length_penalty=length_penalty,
                                early_stopping=early_stopping, **common)
        return _decode(sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=generator, **common)
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def _prefill(model, input_ids, mask, padded, batch_size, max_len):
    """Fill the KV cache with the prompts; returns (last-position logits (B, V), full mask
    (B, max_len) or None, next position of each row (B, 1) or None)."""
    B, P = input_ids.shape
    device_type = input_ids.device.type
    # Under autocast keys and values come out in the autocast dtype: store them that way.
    cache_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    model.setup_kv_cache(batch_size, max_len, dtype=cache_dtype)
    if not padded:
        return _next_logits(model, input_ids, None, None, 0), None, None
    full_mask = torch.ones((B, max_len), dtype=torch.long, device=input_ids.device)
    full_mask[:, :P] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): real tokens numbered from 0
    logits = _next_logits(model, input_ids, mask, positions, 0)
    return logits, full_mask, positions[:, -1:] + 1


def _decode(*, model, input_ids, mask, padded, max_new_tokens, min_new_tokens, repetition_penalty,
            no_repeat_ngram_size, eos_ids, pad, stop, nl_counts, check_every, sample, temperature,
            top_k, top_p, generator):
    """Greedy and sampling: one token per row per step."""
    B, P = input_ids.shape
    device = input_ids.device
    max_len = P + max_new_tokens
    if generator is not None and sample and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model runs on {device}; "
                         f"create it with torch.Generator(device={device.type!r})")
    tokens = torch.full((B, max_len), pad, dtype=torch.long, device=device)
    tokens[:, :P] = input_ids
    valid = mask.bool() if padded else None
    history_valid = None
    if valid is not None and (repetition_penalty != 1.0 or no_repeat_ngram_size > 0):
        history_valid = torch.ones((B, max_len), dtype=torch.bool, device=device)
        history_valid[:, :P] = valid
    stopping = eos_ids is not None or stop is not None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    finished_at = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    newlines = torch.zeros(B, dtype=torch.long, device=device)

    logits, full_mask, next_pos = _prefill(model, input_ids, mask, padded, B, max_len)
    steps = 0
    for t in range(max_new_tokens):
        cur = P + t  # slot of the token chosen this step
        if t > 0:
            feed = tokens[:, cur - 1: cur]
            logits = _next_logits(model, feed, None if full_mask is None else full_mask[:, :cur],
                                  None if next_pos is None else next_pos + (t - 1), cur - 1)
        scores = _process(logits, tokens[:, :cur], None if history_valid is None else history_valid[:, :cur], t,
                          repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                          min_new_tokens=min_new_tokens, eos_ids=eos_ids, sample=sample,
                          temperature=temperature, top_k=top_k, top_p=top_p)
        if sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        steps = t + 1
        if not stopping:
            tokens[:, cur] = nxt
            continue
        nxt = torch.where(unfinished, nxt, pad)
        tokens[:, cur] = nxt
        done = torch.zeros_like(unfinished)
        if eos_ids is not None:
            done |= torch.isin(nxt, eos_ids)
        if stop is not None:
            newlines += nl_counts[nxt]
            done |= newlines >= stop
        finished_at = torch.where(unfinished & done, t, finished_at)
        unfinished &= ~done
        if (t + 1) % check_every == 0 and not bool(unfinished.any()):
            break
    if stopping and not bool(unfinished.any()):
        steps = int(finished_at.max()) + 1  # the last row finished here; later steps hold only padding
    return tokens[:, :P + steps]


def _beam_search(*, model, input_ids, mask, padded, max_new_tokens, min_new_tokens, repetition_penalty,
                 no_repeat_ngram_size, eos_ids, pad, stop, nl_counts, check_every, num_beams,
                 length_penalty, early_stopping):
    """Beam search with transformers' semantics (see the module docstring); best beam per prompt."""
    B, P = input_ids.shape
    k = num_beams
    device = input_ids.device
    max_len = P + max_new_tokens
    n_eos = 0 if eos_ids is None else eos_ids.numel()
    n_cand = max(2, 1 + n_eos) * k  # candidates kept per step, enough that k can stay unfinished
    is_top_k = torch.arange(n_cand, device=device) < k  # only the first k candidates may finish

    logits, full_mask, next_pos = _prefill(model, input_ids, mask, padded, B, max_len)
    expand = torch.arange(B, device=device).repeat_interleave(k)  # row b -> its k beams
    model.reorder_kv_cache(expand)
    logits = logits.index_select(0, expand)  # (B*k, V)
    if full_mask is not None:
        full_mask, next_pos = full_mask.index_select(0, expand), next_pos.index_select(0, expand)
    valid = None
    if full_mask is not None and (repetition_penalty != 1.0 or no_repeat_ngram_size > 0):
        valid = full_mask.bool()
    V = logits.size(-1)

    seqs = torch.full((B, k, max_len), pad, dtype=torch.long, device=device)
    seqs[:, :, :P] = input_ids[:, None, :]
    run_scores = torch.zeros((B, k), dtype=torch.float32, device=device)
    run_scores[:, 1:] = _BEAM_DEAD  # start from one beam so the k beams do not pick the same tokens
    run_newlines = torch.zeros((B, k), dtype=torch.long, device=device)
    fin_seqs = seqs.clone()
    fin_scores = torch.full((B, k), _BEAM_DEAD, dtype=torch.float32, device=device)
    fin_done = torch.zeros((B, k), dtype=torch.bool, device=device)
    fin_len = torch.zeros((B, k), dtype=torch.long, device=device)  # new tokens of each finished hypothesis
    improvable = torch.ones((B, 1), dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * k

    for t in range(max_new_tokens):
        cur = P + t
        if t > 0:
            feed = seqs[:, :, cur - 1].reshape(B * k, 1)
            logits = _next_logits(model, feed, None if full_mask is None else full_mask[:, :cur],
                                  None if next_pos is None else next_pos + (t - 1), cur - 1)
        logp = F.log_softmax(logits, dim=-1)
        logp = _process(logp, seqs.view(B * k, max_len)[:, :cur], None if valid is None else valid[:, :cur], t,
                        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                        min_new_tokens=min_new_tokens, eos_ids=eos_ids, sample=False, temperature=1.0,
                        top_k=None, top_p=None)
        total = (logp.view(B, k, V) + run_scores[:, :, None]).view(B, k * V)
        cand_scores, flat_idx = torch.topk(total, n_cand)  # (B, n_cand)
        src, tok = flat_idx // V, flat_idx % V
        cand_seqs = torch.take_along_dim(seqs, src[:, :, None], dim=1)  # (B, n_cand, max_len)
        cand_seqs[:, :, cur] = tok
        hits = torch.full_like(tok, t + 1 >= max_new_tokens, dtype=torch.bool)
        if eos_ids is not None:
            hits |= torch.isin(tok, eos_ids)
        cand_newlines = run_newlines.gather(1, src)
        if stop is not None:
            cand_newlines = cand_newlines + nl_counts[tok]
            hits |= cand_newlines >= stop[:, None]

        # The k best candidates that did not finish carry on.
        alive_scores = cand_scores + hits.to(torch.float32) * _BEAM_DEAD
        keep = torch.topk(alive_scores, k)[1]  # (B, k)
        seqs = torch.take_along_dim(cand_seqs, keep[:, :, None], dim=1)
        run_scores = alive_scores.gather(1, keep)
        run_newlines = cand_newlines.gather(1, keep)
        beam_src = src.gather(1, keep)

        # Finished candidates among the top k join the finished pool if they beat its worst.
        scored = cand_scores / ((t + 1) ** length_penalty)
        pool_full = fin_done.all(-1, keepdim=True) & (early_stopping is True)
        scored += pool_full.to(torch.float32) * _BEAM_DEAD
        scored += (~improvable).to(torch.float32) * _BEAM_DEAD
        just_finished = hits & is_top_k[None, :]
        scored += (~just_finished) * _BEAM_DEAD
        pool = torch.topk(torch.cat((fin_scores, scored), 1), k)[1]
        fin_seqs = torch.take_along_dim(torch.cat((fin_seqs, cand_seqs), 1), pool[:, :, None], dim=1)
        fin_scores = torch.cat((fin_scores, scored), 1).gather(1, pool)
        fin_done = torch.cat((fin_done, just_finished), 1).gather(1, pool)
        fin_len = torch.cat((fin_len, torch.full_like(tok, t + 1)), 1).gather(1, pool)

        model.reorder_kv_cache((beam_src + batch_offset).view(-1))

        # Can a running beam still beat the worst finished one?  (transformers' heuristic)
        best_len = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else t + 1
        best_running = run_scores[:, :1] / (best_len ** length_penalty)
        worst_finished = torch.where(fin_done, fin_scores.min(1, keepdim=True)[0], _BEAM_DEAD)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if (t + 1) % check_every == 0 or t + 1 == max_new_tokens:
            go_on = bool(improvable.any()) and not (early_stopping is True and bool(fin_done.all())) \
                and not bool(hits.all())
            if not go_on:
                break
    best = fin_seqs[:, 0]  # (B, max_len), padded with `pad` past each hypothesis
    return best[:, :P + int(fin_len[:, 0].max())]
