"""Text generation for GPT2LMHeadModel: one `generate()` for greedy, sampling, beam search, beam
sampling and speculative decoding, token-identical to transformers' `generate` on the same weights.

Decoding follows Holtzman et al. (2020) for nucleus (top-p) sampling, Fan et al. (2018) for
top-k, Keskar et al. (2019) for the repetition penalty and Paulus et al. (2018) for n-gram
blocking; beam search and beam sampling are the ones transformers implements (Wu et al., 2016
length penalty); speculative decoding is Leviathan et al. (2023), "Fast Inference from
Transformers via Speculative Decoding" (Chen et al., 2023 in parallel).

The package
* `processors.py`: logits processors in transformers' order, and the exact fast nucleus filter
  (candidate set + full-sort fallback, identical kept set);
* `decoder.py`: the model side of a generation (KV cache, masks and positions of every step
  built once, fused q/k/v, sliced output layer, the static compiled step for `compile=True`);
* `sampling.py`: greedy and sampling (`decode_step`: a step without host synchronisation);
* `beam.py`: beam search and beam sampling;
* `speculative.py`: speculative decoding with an assistant (draft) model.

Conventions: prompts are LEFT-padded (`left_pad`); positions come from the mask (`cumsum - 1`),
so a padded prompt is encoded exactly as alone.  Rows stop independently on an EOS token or
(`stop_newlines`) once their continuation holds that many "\\n"; finished rows are filled with
`pad_token_id`.  Host synchronisation: none per token unless a stop rule is active; then "all
rows finished?" is read every `STOP_CHECK_EVERY[device]` steps and the output is cropped to the
step at which the last row finished.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from models.generation.beam import beam_search
from models.generation.decoder import inference_copies
from models.generation.processors import (LogitsSettings, apply_repetition_penalty, ban_repeated_ngrams,  # noqa: F401
                                          process_logits, top_k_filter, top_p_filter, top_p_filter_full)
from models.generation.sampling import StopRules, decode
from models.generation.speculative import speculative_decode

# How often (in decode steps) the loop reads "all rows finished?" back to the host.
STOP_CHECK_EVERY = {"cpu": 1, "cuda": 8}


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


def _as_id_tensor(ids: Union[None, int, Sequence[int], torch.Tensor], device) -> Optional[torch.Tensor]:
    if ids is None:
        return None
    t = torch.as_tensor([ids] if isinstance(ids, int) else ids, dtype=torch.long, device=device).flatten()
    return t if t.numel() else None


# ---- the entry point ---------------------------------------------------------------------------
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: int = 128, min_new_tokens: int = 0, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             stop_newlines: Union[None, int, torch.Tensor] = None,
             newline_counts: Optional[torch.Tensor] = None,
             compile: bool = False, assistant_model=None, num_assistant_tokens: int = 4,
             stats: Optional[dict] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Continue LEFT-padded prompts `input_ids` (B, T_in); returns (B, T_in + n_new) token ids.

    Arguments mean what they mean in transformers' `generate`.  `eos_token_id=None` means no EOS
    stop; `pad_token_id=None` means `model.config.pad_token_id`.  `num_beams > 1` with
    `do_sample=True` is beam sampling.  `stop_newlines` (int or (B,)) ends a row once its
    continuation holds that many "\\n" (needs `newline_counts`, made by
    `models.generation.newline_counts(tokenizer)`).  `compile=True` runs the decode steps through
    one `torch.compile`d static step (compiled once per shape; meant for GPUs, CUDA graphs: on a
    CPU the eager step through the packed weight copies is faster from two rows on).
    `assistant_model` (a GPT2LMHeadModel with the same vocabulary) turns on
    speculative decoding: it proposes `num_assistant_tokens` tokens, the model verifies them in
    one forward.  `stats`, a dict, receives counts of the run (`new_tokens`; with an assistant
    also `target_forwards`, `draft_tokens`, `accepted_tokens`, `acceptance_rate`, `compactions`).
    `on_token(tokens)` is called once per new-token index, in order, with the (B,) LongTensor of
    that index's tokens as soon as every row's is known (`pad_token_id` for finished rows;
    speculative decoding calls it for each committed index after a verify step; where the stop
    check runs every few steps (`STOP_CHECK_EVERY`) up to that many trailing calls may be all
    padding); not with beam search, whose tokens are known only at the end.  The models run in eval mode (dropout off)
    and are put back in their previous modes afterwards.
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
    if not sample and (top_k or (top_p is not None and top_p < 1.0) or temperature not in (0.0, 1.0)):
        warnings.warn("temperature/top_k/top_p only apply when sampling (do_sample=True, temperature > 0); "
                      "decoding greedily", stacklevel=2)
    if (compile and any(p != "dense" for p in model.gpt.layer_patterns)
            and config.attention_backend in ("flex", "sparse")):
        raise ValueError(f"compile=True needs fixed-shape masks; attention_backend {config.attention_backend!r} "
                         f"builds a BlockMask / SparseLayout per step: set attention_backend to 'sdpa' or 'auto' "
                         f"for compiled decoding")
    if on_token is not None and num_beams > 1:
        raise ValueError("on_token: beam search chooses its tokens only at the end; use num_beams=1")
    if assistant_model is not None:
        _check_assistant(model, assistant_model, num_beams, num_assistant_tokens, repetition_penalty,
                         no_repeat_ngram_size, compile)

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
    mask = attention_mask if bool((attention_mask == 0).any()) else None  # None: no padding, no mask

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
    if generator is not None and sample and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model runs on {device}; "
                         f"create it with torch.Generator(device={device.type!r})")

    if max_new_tokens == 0:
        return input_ids.clone()
    n_eos = 0 if eos_ids is None else eos_ids.numel()
    settings = LogitsSettings(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                              min_new_tokens=min_new_tokens, eos_ids=eos_ids, sample=sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, min_tokens_to_keep=max(2, n_eos + 1) if num_beams > 1 else 1)
    rules = StopRules(pad=pad, eos_ids=eos_ids, stop=stop, nl_counts=newline_counts)
    check_every = STOP_CHECK_EVERY.get(device.type, 8)
    models = [model] + ([assistant_model] if assistant_model is not None else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    # Each model's decode forwards have these many rows (a speculative target verifies k + 1 per row).
    rows = [B * (num_assistant_tokens + 1), B] if assistant_model is not None else [B * num_beams]
    copies = contextlib.ExitStack()
    try:
        for m, r in zip(models, rows):
            copies.enter_context(inference_copies([m], r, compiled=compile))
        if assistant_model is not None:
            out, run = speculative_decode(model, assistant_model, input_ids, mask, max_new_tokens, settings, rules,
                                          generator, num_assistant_tokens, on_token)
        elif num_beams > 1:
            out = beam_search(model, input_ids, mask, max_new_tokens, num_beams=num_beams,
                              length_penalty=length_penalty, early_stopping=early_stopping, settings=settings,
                              rules=rules, generator=generator, check_every=check_every, compile=compile)
            run = {}
        else:
            out = decode(model, input_ids, mask, max_new_tokens, settings, rules, generator, check_every,
                         compile=compile, on_token=on_token)
            run = {}
    finally:
        copies.close()
        for m, training in zip(models, modes):
            m.train(training)
    if stats is not None:
        stats.update(new_tokens=out.size(1) - P, **run)
    return out


def _check_assistant(model, assistant, num_beams, k, repetition_penalty, no_repeat_ngram_size, compile) -> None:
    if assistant.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"assistant_model has {assistant.config.vocab_size} tokens, the model "
                         f"{model.config.vocab_size}: speculative decoding needs the same vocabulary")
    if num_beams > 1:
        raise ValueError("assistant_model (speculative decoding) works with num_beams=1 only")
    if k < 1:
        raise ValueError(f"num_assistant_tokens must be >= 1, got {k}")
    if repetition_penalty != 1.0 or no_repeat_ngram_size > 0:
        raise ValueError("assistant_model (speculative decoding) does not support repetition_penalty or "
                         "no_repeat_ngram_size; leave them at 1.0 / 0")
    if compile:
        raise ValueError("compile=True is not available with assistant_model (its verify step changes shape)")
