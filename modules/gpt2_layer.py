"""One GPT-2 transformer block: pre-LayerNorm attention and MLP, each with a residual.

GPT-2 (Radford et al., 2019) moved LayerNorm to the input of each sub-block (as in Child et
al.'s Sparse Transformer) and uses GELU (Hendrycks & Gimpel, 2016) in its tanh approximation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from modules.attention import CausalSelfAttention
from modules.inference_weights import linear


class GPT2Layer(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        d = config.hidden_size
        self.attention_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attention = CausalSelfAttention(config)
        self.attention_dense = nn.Linear(d, d)
        self.attention_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.out_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.interm_dense = nn.Linear(d, config.intermediate_size)
        self.out_dense = nn.Linear(config.intermediate_size, d)
        self.out_dropout = nn.Dropout(config.hidden_dropout_prob)

    def linear_layers(self) -> tuple[nn.Module, ...]:
        """The projections `forward` applies through `modules.inference_weights.linear`."""
        a = self.self_attention
        return a.query, a.key, a.value, self.attention_dense, self.interm_dense, self.out_dense

    def forward(self, hidden_states: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, cache_start: Optional[int] = None) -> torch.Tensor:
        """hidden_states: (B, T, D) -> (B, T, D)."""
        a = self.self_attention(self.attention_layer_norm(hidden_states), attn_mask, is_causal, cache_start)
        hidden_states = hidden_states + self.attention_dropout(linear(self.attention_dense, a))
        m = F.gelu(linear(self.interm_dense, self.out_layer_norm(hidden_states)), approximate="tanh")
        return hidden_states + self.out_dropout(linear(self.out_dense, m))
