"""Completing sonnet prompts with `model.generate` (models/generation/), as the CS224N sonnet task
needs: batched and left-padded, reproducible (an own seeded generator), every row stopping at the end
of its 14th line (its continuation holds 14 - prompt lines + 1 newlines), at EOS, or after
`max_new_tokens`.

Every prompt gets the same budget whatever the batch: a prompt longer than the context minus
`max_new_tokens` keeps its END (the lines the continuation follows) and the number cut is reported,
so that a long prompt never shortens the others' room and the output does not depend on the batch
size.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from common.precision import autocast
from models.generation import left_pad, newline_counts

SONNET_LINES = 14


class SpeculativeTally:
    """Acceptance counts of speculative decoding summed over the generate calls of a completion
    (each call's `stats`, see models.generation.generate); `line()` is the report."""

    def __init__(self):
        self.drafted = self.accepted = self.forwards = self.new_tokens = 0

    def stats_for(self, kwargs: dict) -> Optional[dict]:
        """A fresh stats dict for one generate call when it decodes speculatively, else None."""
        return {} if kwargs.get("assistant_model") is not None else None

    def add(self, stats: Optional[dict]) -> None:
        if stats:
            self.drafted += stats["draft_tokens"]
            self.accepted += stats["accepted_tokens"]
            self.forwards += stats["target_forwards"]
            self.new_tokens += stats["new_tokens"]

    def line(self) -> Optional[str]:
        if not self.forwards:
            return None
        rate = self.accepted / self.drafted if self.drafted else float("nan")
        return (f"speculative decoding: acceptance rate {rate:.3f} ({self.accepted} of {self.drafted} drafted tokens), "
                f"{self.forwards} target forwards for {self.new_tokens} new-token slots")


def keep_prompt_ends(seqs: list[list[int]], budget: int, report: Callable[[str], None], why: str) -> list[list[int]]:
    """Every token list cut to its last `budget` tokens (the lines a continuation follows); the
    indices of the cut ones are reported, with `why` (the budget's origin)."""
    cut = [i for i, s in enumerate(seqs) if len(s) > budget]
    if cut:
        report(f"{len(cut)} prompt(s) longer than {budget} tokens{why} keep their last {budget} tokens: prompts {cut[:5]}")
    return [s[-budget:] if len(s) > budget else s for s in seqs]


def generate_in_batches(model, seqs: list[list[int]], *, eos: int, device: torch.device, batch_size: int,
                        max_new_tokens: int, seed: int, precision: str = "fp32",
                        generate_kwargs: Optional[dict] = None,
                        batch_kwargs: Callable[[int, int], dict] = lambda start, n: {},
                        report: Callable[[str], None] = print) -> list[list[int]]:
    """The new tokens (EOS-padded) of every token list: `model.generate` over left-padded batches of
    `batch_size`, stopping at EOS, one generator seeded with `seed` for the whole run;
    `batch_kwargs(start, n)` adds per-batch arguments (e.g. stop rules).  Speculative decoding's
    acceptance counts are summed and reported."""
    generator = torch.Generator(device).manual_seed(seed)
    kwargs = dict(generate_kwargs or {})
    out, tally = [], SpeculativeTally()
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        ids, mask = left_pad(chunk, eos)
        stats = tally.stats_for(kwargs)
        with autocast(device, precision):
            result = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, eos_token_id=eos,
                                    pad_token_id=eos, generator=generator, stats=stats,
                                    **kwargs, **batch_kwargs(start, len(chunk)))
        tally.add(stats)
        out.extend(result[:, ids.shape[1]:].tolist())
    if len(out) != len(seqs):
        raise RuntimeError(f"{len(out)} completions for {len(seqs)} prompts")
    if tally.line():
        report(tally.line())
    return out


class SonnetWriter:
    """Completes sonnet prompts with `model.generate`; `generate_kwargs` come from a GenerationConfig."""

    def __init__(self, tokenizer, device: torch.device, *, batch_size: int, max_new_tokens: int, seed: int,
                 precision: str = "fp32", generate_kwargs: Optional[dict] = None,
                 report: Callable[[str], None] = print):
        self.tokenizer, self.device, self.batch_size = tokenizer, device, batch_size
        self.max_new_tokens, self.seed, self.precision = max_new_tokens, seed, precision
        self.kwargs = dict(generate_kwargs or {})
        self.newlines = newline_counts(tokenizer).to(device)
        self.report = report

    def prompt_budget(self, context: int) -> int:
        """The longest prompt (tokens) that leaves `max_new_tokens` of room in a `context`-token model."""
        return context - self.max_new_tokens

    def encode(self, prompts: list[str], context: int) -> list[list[int]]:
        budget = self.prompt_budget(context)
        if budget < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in the model's "
                             f"{context} positions; lower max_new_tokens")
        seqs = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return keep_prompt_ends(seqs, budget, lambda line: self.report(f"[sonnet] {line}"),
                                f" (context {context} - max_new_tokens {self.max_new_tokens})")

    @torch.no_grad()
    def complete(self, model, prompts: list[str]) -> list[str]:
        tok = self.tokenizer
        seqs = self.encode(prompts, model.config.max_position_embeddings)
        # Each row stops at the end of its 14th line: its continuation holds 14 - prompt lines + 1 newlines.
        stops = [max(1, SONNET_LINES - p.count("\n")) for p in prompts]
        rows = generate_in_batches(
            model, seqs, eos=tok.eos_token_id, device=self.device, batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens, seed=self.seed, precision=self.precision, generate_kwargs=self.kwargs,
            batch_kwargs=lambda start, n: dict(stop_newlines=torch.tensor(stops[start:start + n], device=self.device),
                                               newline_counts=self.newlines),
            report=lambda line: self.report(f"[sonnet] {line}"))
        return [(prompt + tok.decode([t for t in row if t != tok.eos_token_id])).rstrip()
                for prompt, row in zip(prompts, rows)]
