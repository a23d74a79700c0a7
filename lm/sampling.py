"""Sampling continuations from the word-level baselines, one loop for all three.

The models share an interface (`begin_generation`, `forward(ids, state) -> (logits, state)`),
so the same loop decodes an RNN's hidden state and the transformer's KV cache.  This small loop
belongs to the lab's own vocabulary models; GPT-2 text generation uses the model's `generate()`.
Temperature 0 is greedy decoding (argmax); otherwise tokens are drawn from softmax(logits / T).
"""
from __future__ import annotations

from typing import Optional

import torch

from lm.vocab import Vocabulary


@torch.no_grad()
def sample(model, vocab: Vocabulary, prompt: str, max_new_tokens: int = 30, temperature: float = 0.0,
           generator: Optional[torch.Generator] = None, stop_at_eos: bool = True) -> str:
    """The continuation (words) of `prompt` (space-separated words; OOV words become `<unk>`)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    ids, _, _ = vocab.encode([prompt.split()])
    ids = ids[:-1]  # the prompt continues: no <eos> after it
    if ids.numel() == 0:
        ids = torch.tensor([vocab.eos_id])  # an empty prompt starts a new sentence
    limit = getattr(model, "context", None)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - ids.numel())
    was_training = model.training
    model.eval()
    state = model.begin_generation(1, ids.numel() + max_new_tokens, device)
    out: list[int] = []
    try:
        logits, state = model(ids[None].to(device), state)
        for _ in range(max_new_tokens):
            last = logits[0, -1].float()  # (V,)
            if temperature == 0:
                token = int(last.argmax())
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            if stop_at_eos and token == vocab.eos_id:
                break
            out.append(token)
            logits, state = model(torch.tensor([[token]], device=device), state)
    finally:
        model.end_generation()
        model.train(was_training)
    return vocab.decode(out)
