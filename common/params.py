"""Parameter counting shared by every model family (GPT-2, the RNN/LSTM baselines, students)."""
from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors (one Parameter in two places) count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
