"""GPT-2 configuration with the CS224N field names and the four OpenAI sizes as presets.

The presets follow Radford et al. (2019), "Language Models are Unsupervised Multitask
Learners", Table 2.  `tiny` is ours: full GPT-2 vocabulary, small width, for CPU smoke runs.
Conversion to and from Hugging Face's `config.json` lives here too, so that one place knows
both spellings of every field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

GPT2_VOCAB_SIZE = 50257
EOS_TOKEN_ID = 50256
# The values of the sparse-attention fields (modules/attention_patterns.py documents them).
AttentionPattern = Literal["dense", "logsparse", "local", "hybrid"]
AttentionBackend = Literal["auto", "sdpa", "flex", "sparse"]
ATTENTION_PATTERNS: tuple[str, ...] = get_args(AttentionPattern)
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


@dataclass
class GPT2Config:
    vocab_size: int = GPT2_VOCAB_SIZE
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: Optional[int] = None  # None -> 4 * hidden_size
    hidden_dropout_prob: float = 0.1  # embeddings and residual branches
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int = EOS_TOKEN_ID  # GPT-2 has no pad token; the EOS token stands in
    eos_token_id: int = EOS_TOKEN_ID
    name: str = "custom"
    # Sparse attention (modules/attention_patterns.py): the pattern of the sparse layers, the
    # local window, Longformer-style global tokens (the first N positions attend to and are
    # attended by every position), which layers are sparse (the rest dense), and the execution
    # path (auto | sdpa: masked dense | flex: block-sparse FlexAttention | sparse: the gather
    # path of modules/sparse_attention.py).
    attention: AttentionPattern = "dense"
    attention_window: int = 64
    attention_global_tokens: int = 0
    sparse_layers: str = "all"  # all | even | odd | comma-separated layer indices
    attention_backend: AttentionBackend = "auto"

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, field)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {p}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPT2Config":
        """A preset by name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `tiny`)."""
        key = name.split("/")[-1]  # "openai-community/gpt2-large" -> "gpt2-large"
        if key not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], "name": key, **overrides})

    # ---- Hugging Face config.json <-> ours -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict, name: str = "custom") -> "GPT2Config":
        """Build a config from a Hugging Face GPT-2 `config.json` dictionary.

        Raises ValueError for GPT-2 variants this implementation does not compute
        (another activation, scaled or reordered attention).
        """
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt2'")
        unsupported = {
            "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_weights": (True,),
            "scale_attn_by_inverse_layer_idx": (False,),
            "reorder_and_upcast_attn": (False,),
        }
        for key, allowed in unsupported.items():
            if key in hf and hf[key] not in allowed:
                raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (expected one of {allowed})")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["n_embd"],
            num_hidden_layers=hf["n_layer"],
            num_attention_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner"),
            hidden_dropout_prob=hf.get("resid_pdrop", 0.1),
            attention_probs_dropout_prob=hf.get("attn_pdrop", 0.1),
            max_position_embeddings=hf["n_positions"],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            initializer_range=hf.get("initializer_range", 0.02),
            eos_token_id=_first_set(hf.get("eos_token_id"), EOS_TOKEN_ID),
            pad_token_id=_first_set(hf.get("pad_token_id"), hf.get("eos_token_id"), EOS_TOKEN_ID),
            name=name,
            **{k: v for k, v in hf.get(SPARSE_ATTENTION_KEY, {}).items() if k in SPARSE_ATTENTION_FIELDS},
        )

    def to_hf_dict(self) -> dict:
        """The `config.json` that `transformers.GPT2Config` reads back to this architecture.

        Non-default sparse-attention settings go under one extra key (`sparse_attention`) that
        transformers keeps as an unused attribute and `from_hf_dict` reads back.
        """
        sparse = {k: getattr(self, k) for k in SPARSE_ATTENTION_FIELDS}
        extra = {SPARSE_ATTENTION_KEY: sparse} if sparse != SPARSE_ATTENTION_DEFAULTS else {}
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_embd": self.hidden_size,
            "n_layer": self.num_hidden_layers,
            "n_head": self.num_attention_heads,
            "n_inner": self.intermediate_size,
            "n_positions": self.max_position_embeddings,
            "n_ctx": self.max_position_embeddings,
            "activation_function": "gelu_new",
            "resid_pdrop": self.hidden_dropout_prob,
            "embd_pdrop": self.hidden_dropout_prob,
            "attn_pdrop": self.attention_probs_dropout_prob,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": self.initializer_range,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            **extra,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _first_set(*values):
    """The first value that is not None (0 is a valid token id: `or` would skip it)."""
    return next(v for v in values if v is not None)


SPARSE_ATTENTION_KEY = "sparse_attention"
SPARSE_ATTENTION_FIELDS = ("attention", "attention_window", "attention_global_tokens", "sparse_layers",
                           "attention_backend")
SPARSE_ATTENTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPT2Config)
                             if f.name in SPARSE_ATTENTION_FIELDS}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "gpt2-medium": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "gpt2-large": dict(hidden_size=1280, num_hidden_layers=36, num_attention_heads=20),
    "gpt2-xl": dict(hidden_size=1600, num_hidden_layers=48, num_attention_heads=25),
    # Random init only; for smoke runs and tests on a laptop CPU.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512),
}
