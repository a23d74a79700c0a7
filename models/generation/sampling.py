"""Greedy decoding and sampling: one token per row per step, rows stopping independently.

`decode_step` is the whole body of a step (forward, logits processing, choice, stop
bookkeeping) on tensors only: it never reads a value back to the host, so it can run under
CUDA graphs or FakeTensorMode.  `decode` is the loop around it; when a stop rule is active it
reads "all rows finished?" every `check_every` steps and crops the output to the step where the
last row finished, so the result does not depend on how often it looks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from models.generation.decoder import Decoder
from models.generation.processors import LogitsSettings, process_logits


@dataclass(frozen=True)
class StopRules:
    """EOS ids, the per-row newline budget (`stop_newlines`) and the fill token of finished rows."""
    pad: int
    eos_ids: Optional[torch.Tensor] = None  # (n_eos,)
    stop: Optional[torch.Tensor] = None  # (B,) newlines that end each row
    nl_counts: Optional[torch.Tensor] = None  # (V,) newlines of each token

    @property
    def active(self) -> bool:
        return self.eos_ids is not None or self.stop is not None

    def hits(self, tokens: torch.Tensor, newlines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (...) just chosen, newlines (...) so far -> (row ends here (...), newlines after)."""
        done = torch.zeros_like(tokens, dtype=torch.bool)
        if self.eos_ids is not None:
            done |= torch.isin(tokens, self.eos_ids)
        if self.stop is not None:
            newlines = newlines + self.nl_counts[tokens]
            done |= newlines >= self.stop.view(self.stop.shape + (1,) * (tokens.dim() - 1))
        return done, newlines


@dataclass
class DecodeState:
    """Everything a step reads and writes; rows are prompts."""
    tokens: torch.Tensor  # (B, P + max_new): prompt, then new tokens (pad where not generated)
    history_valid: Optional[torch.Tensor]  # (B, P + max_new) bool, False on prompt padding (history processors)
    unfinished: torch.Tensor  # (B,) bool
    finished_at: torch.Tensor  # (B,) new-token index at which the row finished (max_new: not yet)
    newlines: torch.Tensor  # (B,)
    prompt_len: int


def decode_step(decoder: Decoder, state: DecodeState, t: int, settings: LogitsSettings, rules: StopRules,
                generator: Optional[torch.Generator], logits: Optional[torch.Tensor] = None) -> None:
    """Choose new token t of every row (feeding token t - 1 through the model unless `logits`
    (B, V) are given, as after the prefill) and record it in `state`.  No host synchronisation."""
    cur = state.prompt_len + t  # slot of the token chosen now
    if logits is None:
        logits = decoder.step(state.tokens[:, cur - 1:cur], t)  # (B, V)
    valid = None if state.history_valid is None else state.history_valid[:, :cur]
    scores = process_logits(logits, state.tokens[:, :cur], valid, t, settings)
    if settings.sample:
        nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)
    else:
        nxt = scores.argmax(-1)
    if not rules.active:
        state.tokens[:, cur] = nxt
        return
    nxt = torch.where(state.unfinished, nxt, rules.pad)
    state.tokens[:, cur] = nxt
    done, state.newlines = rules.hits(nxt, state.newlines)
    state.finished_at = torch.where(state.unfinished & done, t, state.finished_at)
    state.unfinished &= ~done


def decode(model, input_ids: torch.Tensor, mask: Optional[torch.Tensor], max_new_tokens: int,
           settings: LogitsSettings, rules: StopRules, generator: Optional[torch.Generator],
           check_every: int, compile: bool = False,
           on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Greedy (settings.sample False) or sampling; (B, P) -> (B, P + n_new).  `on_token` gets each
    step's (B,) tokens right after they are chosen."""
    B, P = input_ids.shape
    device = input_ids.device
    tokens = torch.full((B, P + max_new_tokens), rules.pad, dtype=torch.long, device=device)
    tokens[:, :P] = input_ids
    history_valid = None
    if mask is not None and settings.uses_history:
        history_valid = torch.ones((B, P + max_new_tokens), dtype=torch.bool, device=device)
        history_valid[:, :P] = mask.bool()
    state = DecodeState(tokens, history_valid, torch.ones(B, dtype=torch.bool, device=device),
                        torch.full((B,), max_new_tokens, dtype=torch.long, device=device),
                        torch.zeros(B, dtype=torch.long, device=device), P)
    decoder = Decoder(model, P, mask, B, max_new_tokens, compile=compile)
    try:
        logits = decoder.prefill(input_ids, mask)
        steps = 0
        for t in range(max_new_tokens):
            decode_step(decoder, state, t, settings, rules, generator, logits if t == 0 else None)
            if on_token is not None:
                on_token(state.tokens[:, P + t])
            steps = t + 1
            if rules.active and (t + 1) % check_every == 0 and not bool(state.unfinished.any()):
                break
    finally:
        decoder.close()
    if rules.active and not bool(state.unfinished.any()):
        steps = int(state.finished_at.max()) + 1  # the last row finished here; later steps hold only padding
    return state.tokens[:, :P + steps]
