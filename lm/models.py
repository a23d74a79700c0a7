"""Three word-level language models with one interface, for the Penn Treebank baselines.

* `RNNLM`: an Elman network (Elman, 1990) written from scratch -- our own cell
  h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) and our own loop over time.
* `LSTMLM`: the LSTM of Hochreiter & Schmidhuber (1997) through `nn.LSTM`, sized like the
  small model of Zaremba et al. (2014), "Recurrent Neural Network Regularization".
* `TransformerLM`: a small GPT-2 decoder -- our own `GPT2LMHeadModel` with a `GPT2Config`
  whose vocabulary is the PTB vocabulary (there is one transformer in this codebase).

All three map (input ids (B, T), state) -> (logits (B, T, V), state).  For the recurrent models
the state is the hidden state carried across truncated-BPTT segments; the transformer has no
recurrent state in training (state None) and, while generating, its state is the number of
positions already in its KV cache (`begin_generation` sets the cache up).  Input and output
embeddings are tied in all three (Press & Wolf, 2017; Inan et al., 2017), as GPT-2 ties them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from config import GPT2Config
from models.gpt2 import GPT2LMHeadModel


class ElmanRNNCell(nn.Module):
    """One step of a tanh RNN: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in (self.weight_ih, self.bias_ih, self.bias_hh):
            nn.init.uniform_(p, -bound, bound)
        # An orthogonal recurrent matrix keeps early gradients from exploding or vanishing.
        nn.init.orthogonal_(self.weight_hh)

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """x W_ih^T + b_ih for all time steps at once (it does not depend on h): (..., I) -> (..., H)."""
        return x @ self.weight_ih.T + self.bias_ih

    def step(self, projected_x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The recurrence given the projected input: (B, H), (B, H) -> (B, H)."""
        return torch.tanh(projected_x + h @ self.weight_hh.T + self.bias_hh)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step: x (B, I), h (B, H) -> h' (B, H)."""
        return self.step(self.input_projection(x), h)


class ElmanRNN(nn.Module):
    """Stacked Elman layers unrolled over time by our own loop; batch first."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.cells = nn.ModuleList(ElmanRNNCell(input_size if i == 0 else hidden_size, hidden_size)
                                   for i in range(num_layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, I), h0 (L, B, H) -> outputs of the top layer (B, T, H), h_T (L, B, H)."""
        finals = []
        for layer, cell in enumerate(self.cells):
            if layer > 0:
                x = self.dropout(x)
            projected = cell.input_projection(x)  # (B, T, H)
            h, outputs = h0[layer], []
            for t in range(x.size(1)):
                h = cell.step(projected[:, t], h)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)  # (B, T, H)
            finals.append(h)
        return x, torch.stack(finals)


class RecurrentLM(nn.Module):
    """Embedding -> recurrent layers -> tied output layer (shared by RNNLM and LSTMLM)."""

    kind = "recurrent"

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def run_layers(self, x: torch.Tensor, state):
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device):
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, state=None):
        """input_ids (B, T), state from the previous segment (None: zeros) -> logits (B, T, V), state."""
        if state is None:
            state = self.init_state(input_ids.size(0), input_ids.device)
        x = self.dropout(self.embedding(input_ids))  # (B, T, H)
        out, state = self.run_layers(x, state)
        logits = self.dropout(out) @ self.embedding.weight.T + self.decoder_bias  # (B, T, V)
        return logits, state

    @staticmethod
    def detach_state(state):
        return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()

    def begin_generation(self, batch_size: int, max_len: int, device: torch.device):
        return self.init_state(batch_size, device)

    def end_generation(self) -> None:
        pass


class RNNLM(RecurrentLM):
    name = "RNN"

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_layers: int = 2, dropout: float = 0.2):
        super().__init__(vocab_size, hidden_size, num_layers, dropout)
        self.rnn = ElmanRNN(hidden_size, hidden_size, num_layers, dropout)

    def init_state(self, batch_size, device):
        return torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)

    def run_layers(self, x, state):
        return self.rnn(x, state)


class LSTMLM(RecurrentLM):
    name = "LSTM"

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_layers: int = 2, dropout: float = 0.2):
        super().__init__(vocab_size, hidden_size, num_layers, dropout)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)

    def init_state(self, batch_size, device):
        z = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)
        return z, z.clone()

    def run_layers(self, x, state):
        return self.lstm(x, state)


class TransformerLM(nn.Module):
    """A small GPT-2 (our `GPT2LMHeadModel`) over the word vocabulary; context `context` words."""

    kind = "transformer"
    name = "Transformer"

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                 context: int = 128, dropout: float = 0.2):
        super().__init__()
        self.config = GPT2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                 num_attention_heads=num_heads, max_position_embeddings=context,
                                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                 pad_token_id=0, eos_token_id=1, name="ptb-word")
        self.gpt2 = GPT2LMHeadModel(self.config)
        self.context = context

    def forward(self, input_ids: torch.Tensor, state: Optional[int] = None):
        """Training/scoring (state None): logits for a block of at most `context` tokens.
        Generation (state = positions already cached): appends to the KV cache."""
        logits = self.gpt2(input_ids, cache_start=state)
        return logits, None if state is None else state + input_ids.size(1)

    @staticmethod
    def detach_state(state):
        return state

    def begin_generation(self, batch_size: int, max_len: int, device: torch.device) -> int:
        self.gpt2.setup_kv_cache(batch_size, min(max_len, self.context), device=device)
        return 0

    def end_generation(self) -> None:
        self.gpt2.clear_kv_cache()


def build_baseline(kind: str, vocab_size: int, **kwargs) -> nn.Module:
    classes = {"rnn": RNNLM, "lstm": LSTMLM, "transformer": TransformerLM}
    if kind not in classes:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {sorted(classes)}")
    return classes[kind](vocab_size, **kwargs)
