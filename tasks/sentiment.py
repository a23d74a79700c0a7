"""Sentiment classification with GPT-2 (CS224N "Build GPT-2"): SST (5 classes) and CFIMDB (2 classes).

The classifier reads the final hidden state of each text's last non-pad token, applies dropout and a
linear layer.  The starter's `--fine-tune-mode last-linear-layer` is the shared freezing mechanism's
`all-but-head` mode (training/efficient.py), applied by the trainer; this module has no freezing of
its own.  Texts longer than the budget keep their END, because the prediction reads the last token.
"""
from __future__ import annotations

import torch
from torch import nn

from models.gpt2 import GPT2Model

DATASETS = {"sst": 5, "cfimdb": 2}  # name -> number of classes
FINE_TUNE_MODES = ("last-linear-layer", "full-model")


class GPT2SentimentClassifier(nn.Module):
    """GPT-2 backbone -> last non-pad token's hidden state -> dropout -> linear over the classes."""

    head_modules = ("classifier_head",)  # trained alongside LoRA adapters; kept by freeze all-but-head

    def __init__(self, gpt: GPT2Model, num_labels: int, hidden_dropout_prob: float):
        super().__init__()
        self.gpt = gpt
        self.num_labels = num_labels
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.classifier_head = nn.Linear(gpt.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = self.gpt(input_ids, attention_mask)["last_token"]  # (B, D)
        return self.classifier_head(self.dropout(last))  # (B, C)


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, keeping the last `max_length` tokens; (sequences, number truncated)."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    out, truncated = [], 0
    for seq in ids:
        if len(seq) > max_length:
            seq, truncated = seq[-max_length:], truncated + 1
        out.append(seq or [tokenizer.eos_token_id])  # an empty text still has one position to read
    return out, truncated
