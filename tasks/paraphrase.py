"""The cloze formulation of Quora paraphrase detection, shared by `paraphrase_detection.py` and
Impossible Distillation's critic: ONE prompt template, its truncation rule, the two answer tokens.

    Question 1: "{sentence1}"
    Question 2: "{sentence2}"
    Are these two questions asking the same thing? Answer yes or no.
    <- the next token is read here: "yes" (8505) or "no" (3919)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from models.gpt2 import GPT2LMHeadModel
from tasks.data import NO_TOKEN_ID, YES_TOKEN_ID

PROMPT = ('Question 1: "', '"\nQuestion 2: "', '"\nAre these two questions asking the same thing? Answer yes or no.\n')
LABEL_TOKENS = torch.tensor([NO_TOKEN_ID, YES_TOKEN_ID])  # class 0 = "no", class 1 = "yes"


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> tuple[list[list[int]], int]:
    """Prompt token ids of each pair, truncated to `max_length`: a pair that does not fit keeps the whole template and the
    answer slot and cuts the questions (the longer one first, each keeping its beginning)."""
    pre, mid, suf = (tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in PROMPT)
    budget = max_length - len(pre) - len(mid) - len(suf)
    if budget < 2:
        raise ConfigError("max_length", f"{max_length} leaves no room for the questions "
                          f"(the template alone takes {max_length - budget} tokens)")
    firsts = tokenizer([a for a, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    seconds = tokenizer([b for _, b in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    out, truncated = [], 0
    for a, b in zip(firsts, seconds):
        a, b, cut = fit_pair(a, b, budget)
        truncated += cut
        out.append(pre + a + mid + b + suf)
    return out, truncated


def fit_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int], bool]:
    """Two token sequences cut to `budget` tokens together, each keeping its beginning: the longer one
    is cut first, and when both are long each keeps about half.  Returns (a, b, whether anything was cut)."""
    if len(a) + len(b) <= budget:
        return a, b, False
    half = budget // 2
    if len(a) <= half:
        return a, b[: budget - len(a)], True
    if len(b) <= budget - half:
        return a[: budget - len(b)], b, True
    return a[:half], b[: budget - half], True


def answer_logits(last_hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
    """Logits of ("no", "yes") from the hidden state (B, D) at the answer slot, through the LM head
    (the tied embedding, (V, D)): (B, 2).  Class 0 = "no", class 1 = "yes"."""
    return F.linear(last_hidden, lm_head_weight[LABEL_TOKENS.to(last_hidden.device)])


def two_way_logits(model: GPT2LMHeadModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of ("no", "yes") as the next token after each row's last non-pad position, (B, 2)."""
    last = model.gpt(input_ids, attention_mask)["last_token"]  # (B, D)
    return answer_logits(last, model.lm_head_weight)
