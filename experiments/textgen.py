"""Prompt -> text for generate.py: which model a checkpoint argument means, batched completion of
plain prompts with `model.generate` (models/generation/), and token streaming.

* `resolve_model(model_size, checkpoint)`: a preset / hub name / HF directory, optionally with a
  trainer run's weights (a run directory or its best.pt/last.pt, LoRA runs included); a run's base
  model and its architecture overrides (sparse attention) are read from the run's metrics.jsonl
  `start` record when no model is named.
* `complete(...)`: left-padded batches, one seeded generator for the whole call, each row's
  continuation cut at its first EOS; the same prompts, seed and batch size give the same text.
* Streaming: `StreamingLM` passes `TokenStream.put` as `generate(on_token=...)`, called with each
  step's chosen tokens; `TokenStream` decodes row 0 incrementally and prints it (holding back a
  partial UTF-8 character).  The tokens streamed are compared with what `generate` returns at the
  end (any difference is an error, never a silently different text).  Batch size 1, greedy,
  sampling or speculative decoding (beam search picks its tokens only at the end).
* `load_assistant`: the draft model of speculative decoding (`--assistant_model`), checked to
  share the target's vocabulary and tokenizer.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from common.errors import ConfigError
from common.io import read_jsonl_log
from tasks.completion import generate_in_batches, keep_prompt_ends


@dataclass
class ModelSource:
    spec: str  # what from_name_or_path loads
    checkpoint: Optional[str]  # trainer weights loaded on top (run dir or .pt)
    random_init: bool
    overrides: dict  # GPT2Config overrides the run was trained with (sparse attention)
    tokenizer: Optional[str]  # an explicit tokenizer directory (the flag's, else the run's)
    model_dir: Optional[str]  # a model directory that may hold the tokenizer files


def run_model_config(checkpoint: str | Path) -> Optional[dict]:
    """The ModelConfig (as a dict) a trainer run was built with, from its metrics.jsonl start record."""
    path = Path(checkpoint)
    directory = path if path.is_dir() else path.parent
    log = directory / "metrics.jsonl"
    if not log.is_file():
        return None
    for record in read_jsonl_log(log):
        if record.get("event") == "start" and isinstance((record.get("run") or {}).get("model"), dict):
            return record["run"]["model"]
    return None


def resolve_model(model_size: Optional[str], checkpoint: Optional[str], random_init: bool = False,
                  tokenizer: Optional[str] = None, overrides: Optional[dict] = None) -> ModelSource:
    """What to load for `--model_size` / `--checkpoint` (see the module docstring).  A run's
    architecture overrides (sparse attention) apply whenever its log says them; flags given win."""
    from training.config import ModelConfig

    overrides = dict(overrides or {})
    if checkpoint is not None and not Path(checkpoint).exists():
        raise ConfigError("checkpoint", f"{checkpoint}: no such run directory or checkpoint file")
    saved = run_model_config(checkpoint) if checkpoint is not None else None
    cfg = ModelConfig(**{k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__}) if saved else None
    arch = {k: v for k, v in cfg.overrides().items() if not k.endswith("dropout_prob")} if cfg else {}
    if model_size is None and checkpoint is not None:
        if cfg is None:
            raise ConfigError("model_size", f"{checkpoint} has no metrics.jsonl saying which model it trained; name "
                              f"the base model with model_size")
        return ModelSource(cfg.spec, checkpoint, cfg.random_init, {**arch, **overrides}, tokenizer or cfg.tokenizer,
                           None if cfg.random_init else cfg.spec)
    spec = model_size or "gpt2"
    return ModelSource(spec, checkpoint, random_init, {**arch, **overrides}, tokenizer, None if random_init else spec)


def prompt_budget(context: int, max_new_tokens: int, max_length: Optional[int] = None) -> int:
    budget = min(context - max_new_tokens, max_length or math.inf)
    if budget < 1:
        raise ConfigError("max_new_tokens", f"{max_new_tokens} leaves no room for a prompt in the model's {context} "
                          f"positions; lower it")
    return int(budget)


@torch.no_grad()
def complete(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, seed: int,
             device: torch.device, precision: str = "fp32", generate_kwargs: Optional[dict] = None,
             max_length: Optional[int] = None, report: Callable[[str], None] = print) -> list[str]:
    """The continuation (text after the prompt, up to EOS) of every prompt.  A prompt longer than the
    budget keeps its end; an empty prompt starts from <|endoftext|> (unconditional samples)."""
    eos = tokenizer.eos_token_id
    budget = prompt_budget(model.config.max_position_embeddings, max_new_tokens, max_length)
    seqs = [s or [eos] for s in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    seqs = keep_prompt_ends(seqs, budget, report, "")
    rows = generate_in_batches(model, seqs, eos=eos, device=device, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, seed=seed, precision=precision,
                               generate_kwargs=generate_kwargs, report=report)
    return [tokenizer.decode(row[:row.index(eos)] if eos in row else row) for row in rows]


class TokenStream:
    """Prints the tokens of one row as they are chosen, decoded incrementally."""

    def __init__(self, tokenizer, write: Optional[Callable[[str], None]] = None,
                 flush: Optional[Callable[[], None]] = None):
        self.tokenizer = tokenizer
        self._write = write or (lambda text: sys.stdout.write(text))  # sys.stdout as it is when printing
        self._flush = flush or (lambda: sys.stdout.flush())
        self.stop_ids = {tokenizer.eos_token_id}
        self.begin()

    def begin(self) -> None:
        self.tokens: list[int] = []
        self.printed, self.finished = "", False

    def put(self, tokens: torch.Tensor) -> None:
        """`generate`'s on_token: the token just chosen for the (single) row, (1,) or a scalar."""
        if self.finished:
            return
        token = int(tokens.reshape(-1)[0])
        if token in self.stop_ids:
            self.finished = True
            return
        self.tokens.append(token)
        self._show()

    def _show(self, final: bool = False) -> None:
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") and not final:
            return  # part of a multi-byte character: wait for the rest
        self._write(text[len(self.printed):])
        self._flush()
        self.printed = text

    def end(self, new_tokens: list[int]) -> None:
        """After generate: check the streamed tokens against the result and print what is left (nothing,
        unless generate stopped calling on_token early)."""
        stop = next((i for i, t in enumerate(new_tokens) if t in self.stop_ids), len(new_tokens))
        result = new_tokens[:stop]
        if result[:len(self.tokens)] != self.tokens:
            raise RuntimeError("streamed tokens differ from the tokens generate() returned (a bug in "
                               "models.generation's on_token); run without --stream")
        for token in result[len(self.tokens):]:
            self.tokens.append(token)
        self._show(final=True)
        self.finished = True


class StreamingLM:
    """The parts of a GPT2LMHeadModel that completion code calls (`config`, `generate`), streaming row 0
    of every generate call through `stream`; `on_begin(i)` is called before the i-th call."""

    def __init__(self, model, stream: TokenStream, on_begin: Callable[[int], None] = lambda i: None):
        self.model, self.stream, self.on_begin, self.calls = model, stream, on_begin, 0

    @property
    def config(self):
        return self.model.config

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if input_ids.shape[0] != 1:
            raise ConfigError("batch_size", f"streaming prints one row at a time; got {input_ids.shape[0]} rows: "
                              f"use batch_size 1")
        if kwargs.get("num_beams", 1) > 1:
            raise ConfigError("decoding", "beam search chooses its tokens only at the end; it cannot stream")
        self.on_begin(self.calls)
        self.calls += 1
        self.stream.begin()
        out = self.model.generate(input_ids, attention_mask, on_token=self.stream.put, **kwargs)
        self.stream.end(out[0, input_ids.shape[1]:].tolist())
        return out


def load_for_generation(source: ModelSource, device: torch.device):
    """(model in eval mode on `device`, tokenizer) of a ModelSource."""
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from training.checkpoint import load_model

    model = load_model(GPT2LMHeadModel, source.spec, source.checkpoint, source.random_init, **source.overrides)
    return model.to(device).eval(), load_tokenizer(source.tokenizer, source.model_dir)


def load_assistant(path: str, model, tokenizer, device: torch.device):
    """The draft model of speculative decoding (`assistant_model`): a Hugging Face model directory
    (config.json), or a training run (its directory with metrics.jsonl, or its best.pt / last.pt)
    on top of its base model; in eval mode on `device`.  A ConfigError naming assistant_model
    unless it loads and shares `model`'s vocabulary and `tokenizer`'s token ids."""
    from common.errors import UserError
    from models.hf_io import WeightsFileError

    p = Path(path)
    is_run = p.is_file() and p.suffix == ".pt" or p.is_dir() and (p / "metrics.jsonl").is_file()
    if not p.exists():
        raise ConfigError("assistant_model", f"{path}: no such model directory, run directory or checkpoint file")
    if not is_run and not (p.is_dir() and (p / "config.json").is_file()):
        raise ConfigError("assistant_model", f"{path}: expected a Hugging Face model directory (config.json), a "
                          f"training run directory (metrics.jsonl) or a run's best.pt / last.pt")
    try:
        source = resolve_model(None, str(p)) if is_run else resolve_model(str(p), None)
        draft, draft_tokenizer = load_for_generation(source, device)
    except (UserError, WeightsFileError, OSError, ValueError) as exc:
        raise ConfigError("assistant_model", f"{path}: cannot be loaded as a GPT-2 model: {exc}") from None
    if draft.config.vocab_size != model.config.vocab_size:
        raise ConfigError("assistant_model", f"{path} has {draft.config.vocab_size} tokens, the model "
                          f"{model.config.vocab_size}: speculative decoding needs the same vocabulary")
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab() or draft_tokenizer.eos_token_id != tokenizer.eos_token_id:
        raise ConfigError("assistant_model", f"{path}: its tokenizer ({draft_tokenizer.name_or_path}) maps tokens to "
                          f"other ids than the model's ({tokenizer.name_or_path}); the draft must share the tokenizer")
    return draft


def generation_kwargs(gen_cfg, model, tokenizer, device: torch.device) -> dict:
    """`generate()` keyword arguments of a validated GenerationConfig for `model`: its `kwargs()`,
    plus the loaded draft model when `assistant_model` is set (`load_assistant`).  A ConfigError
    names compile_generation when the model's sparse layers build a mask per step."""
    kwargs = gen_cfg.kwargs()
    cfg = model.config
    if (gen_cfg.compile_generation and cfg.attention_backend in ("flex", "sparse")
            and any(p != "dense" for p in model.gpt.layer_patterns)):
        raise ConfigError("compile_generation", f"the model's sparse layers run on attention_backend "
                          f"{cfg.attention_backend}, which builds a mask per decode step; use attention_backend "
                          f"auto or sdpa, or decode without compile_generation")
    if gen_cfg.assistant_model is not None:
        kwargs["assistant_model"] = load_assistant(gen_cfg.assistant_model, model, tokenizer, device)
    return kwargs
