"""Language-model perplexity with a strided sliding window.

Perplexity is exp(mean negative log-likelihood per token).  A text longer than the model's
context is scored window by window, the way Hugging Face's "Perplexity of fixed-length models"
guide does it: windows of `window` input tokens start every `stride` tokens, and each window
scores only the targets the previous window did not, so every target is scored exactly once and,
with stride < window, has at least `window - stride + 1` tokens of context.  stride == window is
plain non-overlapping chunking (cheapest, least context); a small stride approaches full context.

Unlike the guide's loop, no target is lost at a window boundary: a window of inputs
`ids[b:e]` predicts `ids[b+1:e+1]`, so all N-1 targets of an N-token text are scored whatever
the stride.  For a text of at most `window + 1` tokens this is exactly the full-context loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new) per window: inputs `ids[begin:end]` predict `ids[begin+1:end+1]`, and
    only the last `new` of those targets are scored (the rest were scored by earlier windows)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    num_targets = num_tokens - 1
    if num_targets < 1:
        raise ValueError(f"need at least 2 tokens to score a text, got {num_tokens}")
    spans, scored, begin = [], 0, 0
    while scored < num_targets:
        end = min(begin + window, num_targets)
        spans.append((begin, end, end - scored))
        scored = end
        begin += stride
    return spans


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def sliding_window_nll(model, token_ids: torch.Tensor, window: int, stride: int,
                       batch_size: int = 8) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `token_ids` (N,) and the number of scored tokens
    (N - 1: the first token has no context).  `model(input_ids)` must return logits (B, T, V);
    windows are batched `batch_size` at a time, the shorter last window right-padded (the
    causal mask keeps padding from reaching real positions).  The model runs in eval mode and
    its training flag is restored afterwards."""
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (N,), got shape {tuple(token_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spans = window_spans(token_ids.numel(), window, stride)
    device = _model_device(model)
    ids = token_ids.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(spans), batch_size):
            chunk = spans[i:i + batch_size]
            width = max(end - begin for begin, end, _ in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long, device=device)  # (B, T)
            targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long, device=device)
            for row, (begin, end, new) in enumerate(chunk):
                length = end - begin
                inputs[row, :length] = ids[begin:end]
                targets[row, length - new:length] = ids[end - new + 1:end + 1]
            logits = model(inputs)  # (B, T, V)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            total += nll.item()
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(total_nll / num_tokens); inf when the mean overflows."""
    mean = total_nll / num_tokens
    return math.exp(mean) if mean < 700 else float("inf")


def score_windows(model, token_ids: torch.Tensor, window: Optional[int] = None, stride: Optional[int] = None,
                  batch_size: int = 8) -> tuple[float, int]:
    """`sliding_window_nll` with the defaults the scripts use: window = the model's context, stride =
    window // 2; a window beyond the context or a stride beyond the window is a ConfigError naming it."""
    from common.errors import ConfigError

    context = model.config.max_position_embeddings
    window = window or context
    if window > context:
        raise ConfigError("window", f"{window} exceeds the model's {context} positions")
    stride = stride or max(1, window // 2)
    if stride > window:
        raise ConfigError("stride", f"{stride} must not exceed the window {window}")
    return sliding_window_nll(model, token_ids, window=window, stride=stride, batch_size=batch_size)
