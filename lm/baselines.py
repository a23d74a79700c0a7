"""Training and evaluating the word-level baselines (RNN, LSTM, Transformer) on Penn Treebank.

Recurrent models train with truncated BPTT (`lm.batching.bptt_segments`) and are scored with
their state carried over the whole stream; the transformer trains on contiguous blocks and is
scored with `evaluation.perplexity.sliding_window_nll` (windows of its context, stride half of
it), so every model sees long context at test time.  Train perplexity per epoch is the running
mean of the training loss over that epoch (with dropout on), as in Zaremba et al. (2014).
After each epoch the learning rate is halved if valid perplexity did not improve; the weights
with the best valid perplexity are the ones tested.  This loop is specific to stateful
word-level models (hidden state carried across batches); GPT-2 training uses `training/`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from evaluation.perplexity import perplexity, sliding_window_nll
from lm.batching import batchify, bptt_segments, transformer_blocks
from common.params import count_parameters
from lm.sampling import sample
from optimizer import AdamW


@dataclass
class TrainSettings:
    epochs: int = 3
    max_minutes: Optional[float] = None  # stop (mid-epoch) once training has taken this long
    lr: float = 1e-3
    batch_size: int = 32
    bptt: int = 35
    clip: float = 0.5
    eval_batch_size: int = 10
    log_every: int = 50
    max_steps_per_epoch: Optional[int] = None  # for smoke tests
    seed: int = 0


@dataclass
class BaselineRun:
    name: str
    parameters: int
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, train_ppl, valid_ppl, lr, minutes
    step_losses: list[tuple[float, float]] = field(default_factory=list)  # (fractional epoch, loss)
    epochs_done: float = 0.0
    train_minutes: float = 0.0
    best_valid_ppl: float = float("inf")
    test_ppl: float = float("nan")
    cross_domain: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate_nll(model, stream: torch.Tensor, settings: TrainSettings) -> tuple[float, int]:
    """(total NLL in nats, scored tokens) of a token stream."""
    device = next(model.parameters()).device
    if model.kind == "transformer":
        return sliding_window_nll(model.gpt2, stream, window=model.context, stride=model.context // 2,
                                  batch_size=settings.eval_batch_size * 4)
    was_training = model.training
    model.eval()
    data = batchify(stream, max(1, min(settings.eval_batch_size, stream.numel() // 2))).to(device)
    total, count, state = 0.0, 0, None
    for inputs, targets in bptt_segments(data, settings.bptt):
        logits, state = model(inputs, state)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total, count


def evaluate_ppl(model, stream: torch.Tensor, settings: TrainSettings) -> float:
    return perplexity(*evaluate_nll(model, stream, settings))


def train_epoch(model, optimizer, train_stream: torch.Tensor, settings: TrainSettings, epoch: int,
                deadline: Optional[float], generator: torch.Generator, log: Callable[[str], None],
                run: BaselineRun) -> tuple[float, float, bool]:
    """One epoch (or until the deadline): returns (mean training loss, fraction of the epoch done, stopped)."""
    device = next(model.parameters()).device
    model.train()
    if model.kind == "transformer":
        num_steps = math.ceil(((train_stream.numel() - 1) // model.context) / settings.batch_size)
        batches = transformer_blocks(train_stream, model.context, settings.batch_size, generator)
    else:
        data = batchify(train_stream, settings.batch_size)
        num_steps = math.ceil((data.size(1) - 1) / settings.bptt)
        batches = bptt_segments(data, settings.bptt)
    if settings.max_steps_per_epoch:
        num_steps = min(num_steps, settings.max_steps_per_epoch)
    total_loss, total_tokens, state, t0 = 0.0, 0, None, time.time()
    step, stopped = 0, False
    for step, (inputs, targets) in enumerate(batches, start=1):
        inputs, targets = inputs.to(device), targets.to(device)
        if state is not None:
            state = model.detach_state(state)  # truncated BPTT: keep the values, cut the graph
        logits, state = model(inputs, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        total_loss += loss.item() * targets.numel()
        total_tokens += targets.numel()
        run.step_losses.append((epoch - 1 + step / num_steps, loss.item()))
        if step % settings.log_every == 0:
            ms = 1000 * (time.time() - t0) / step
            log(f"{run.name} epoch {epoch} step {step}/{num_steps} loss {loss.item():.3f} "
                f"ppl {math.exp(total_loss / total_tokens):.1f} ({ms:.0f} ms/step)")
        if step >= num_steps:
            break
        if deadline is not None and time.time() > deadline:
            stopped = True
            break
    return total_loss / total_tokens, step / num_steps, stopped


def train_baseline(model, name: str, streams: dict[str, torch.Tensor], settings: TrainSettings,
                   log: Callable[[str], None] = print) -> BaselineRun:
    """Train on streams['train'], score streams['valid'] after each epoch, keep the best weights
    (loaded back into `model` at the end)."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    run = BaselineRun(name=name, parameters=count_parameters(model)[1])
    optimizer = AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    start = time.time()
    deadline = start + 60 * settings.max_minutes if settings.max_minutes else None
    best_state = None
    for epoch in range(1, settings.epochs + 1):
        train_loss, fraction, stopped = train_epoch(model, optimizer, streams["train"], settings, epoch, deadline,
                                                    generator, log, run)
        run.epochs_done = epoch - 1 + fraction
        run.train_minutes = (time.time() - start) / 60  # includes the evaluations
        valid_ppl = evaluate_ppl(model, streams["valid"], settings)
        lr = optimizer.param_groups[0]["lr"]
        run.history.append({"epoch": round(run.epochs_done, 3), "train_ppl": math.exp(train_loss),
                            "valid_ppl": valid_ppl, "lr": lr, "minutes": (time.time() - start) / 60})
        log(f"{name} epoch {run.epochs_done:.2f}: train ppl {math.exp(train_loss):.1f} valid ppl {valid_ppl:.1f} "
            f"lr {lr:g} ({run.history[-1]['minutes']:.1f} min)")
        if valid_ppl < run.best_valid_ppl:
            run.best_valid_ppl = valid_ppl
            best_state = copy.deepcopy(model.state_dict())
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr / 2
        if stopped:
            log(f"{name}: time budget of {settings.max_minutes} min reached")
            break
    run.train_minutes = (time.time() - start) / 60
    if best_state is not None:
        model.load_state_dict(best_state)
    return run


def sample_prompts(model, vocab, prompts: list[str], max_new_tokens: int, temperature: float,
                   seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        greedy = sample(model, vocab, prompt, max_new_tokens, temperature=0.0)
        sampled = sample(model, vocab, prompt, max_new_tokens, temperature=temperature, generator=generator)
        out.append({"prompt": prompt, "greedy": greedy, f"T={temperature:g}": sampled})
    return out
