"""GPT-2 (Radford et al., 2019), written from scratch: the backbone and the language-model head.

`GPT2Model` maps token ids to hidden states and also returns the representation of the last
real (non-pad) token, which the classification heads read.  `GPT2LMHeadModel` adds the output
layer, tied to the input embedding (the very same Parameter).  Both load any Hugging Face GPT-2
checkpoint and save one that transformers reads back (see `models/hf_io.py`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from modules.attention import KVCache, build_attention_mask
from modules.attention_patterns import choose_path, layer_patterns
from modules.gpt2_layer import GPT2Layer


def last_token_index(attention_mask: Optional[torch.Tensor], batch_size: int, seq_len: int,
                     device: torch.device) -> torch.Tensor:
    """Index of the last real token of each row, (B,). Works for right and left padding."""
    if attention_mask is None:
        return torch.full((batch_size,), seq_len - 1, device=device, dtype=torch.long)
    mask = attention_mask.to(device=device, dtype=torch.long)
    # The last position holding a 1: T - 1 - (index of the first 1 in the reversed row).
    return seq_len - 1 - mask.flip(1).argmax(dim=1)


class GPT2PreTrainedModel(nn.Module):
    """Shared by both model classes: initialisation, loading, saving, KV-cache management."""

    config: GPT2Config

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) for weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def init_weights(self) -> None:
        self.apply(self._init_weights)
        # Residual projections scaled by 1/sqrt(2 * n_layer), as in GPT-2.
        scaled_std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attention_dense.weight", "out_dense.weight")):
                nn.init.normal_(p, mean=0.0, std=scaled_std)

    @property
    def backbone(self) -> "GPT2Model":
        return self if isinstance(self, GPT2Model) else self.gpt

    # ---- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = "gpt2", d: Optional[int] = None, l: Optional[int] = None,
                        num_heads: Optional[int] = None, **config_overrides):
        """Load a Hugging Face GPT-2 checkpoint: a hub name (`gpt2`, `gpt2-medium`, ...; found in the
        Hugging Face cache under either of its names, offline too) or a local directory with
        `config.json` and `model.safetensors` or `pytorch_model.bin`.

        Returns the model in eval mode, as transformers' and the CS224N starter's `from_pretrained`
        do (no dropout until `.train()`).  `d`, `l`, `num_heads` are the starter's names for
        hidden_size, num_hidden_layers and num_attention_heads: a pretrained model's shape comes from
        its `config.json`, so they are only checked against it (a mismatch is a ValueError naming
        both).  `config_overrides` (e.g. dropout probabilities) replace values read from `config.json`.
        """
        from models.hf_io import load_hf_checkpoint

        shape = {"hidden_size": d, "num_hidden_layers": l, "num_attention_heads": num_heads}
        return load_hf_checkpoint(cls, model, expected={k: v for k, v in shape.items() if v is not None},
                                  **config_overrides).eval()

    @classmethod
    def from_name_or_path(cls, spec: str, random_init: bool = False, **config_overrides):
        """What `--model_size` means in every script.

        `tiny` (or any preset with `random_init=True`) builds a randomly initialised model of that
        shape without touching the network; a preset or hub name (`gpt2`, `gpt2-large`,
        `openai-community/gpt2`) or a local HF checkpoint directory loads pretrained weights.  A
        directory with `random_init=True` takes only the architecture from its `config.json`.
        """
        from config import PRESETS
        from models.hf_io import read_hf_config

        if spec == "tiny" or (random_init and spec.split("/")[-1] in PRESETS):
            return cls(GPT2Config.from_name(spec, **config_overrides))
        if random_init:
            config = read_hf_config(Path(spec))
            for key, value in config_overrides.items():
                setattr(config, key, value)
            return cls(config)
        return cls.from_pretrained(spec, **config_overrides)

    def save_pretrained(self, directory: str | Path, tokenizer=None, generation: Optional[dict] = None) -> Path:
        """Write a complete Hugging Face directory (config.json, model.safetensors, generation_config.json,
        vocab.json, merges.txt, tokenizer_config.json) that transformers' AutoModelForCausalLM,
        AutoTokenizer and pipeline load.  `tokenizer`: the run's tokenizer or its directory (default:
        the usual resolution, see models/tokenizer.py); `generation`: decoding defaults for
        generation_config.json (transformers' names).  See `models.hf_export.save_hf_checkpoint`."""
        from models.hf_export import save_hf_checkpoint

        return save_hf_checkpoint(self.backbone, directory, tokenizer, generation)

    # ---- inference: KV cache, fused q/k/v ----------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None,
                       device: Optional[torch.device] = None, static: bool = False) -> None:
        """Preallocate a KV cache of `max_len` slots in every attention layer (`static`: reorder
        keeps the buffers' addresses, for a compiled decode step; see modules/kv_cache.py).

        A slot is not a position: speculative decoding leaves masked holes in the cache, so the
        cache may hold more slots than the model has positions (positions are checked by the
        forward that uses them)."""
        cfg, ref = self.config, self.backbone.word_embedding.weight
        for layer in self.backbone.gpt_layers:
            layer.self_attention.kv_cache = KVCache(batch_size, cfg.num_attention_heads, max_len, cfg.head_dim,
                                                    dtype or ref.dtype, device or ref.device, static=static)

    def reorder_kv_cache(self, batch_index: torch.Tensor, length: Optional[int] = None) -> None:
        """In place: cache row i becomes row batch_index[i], over the first `length` slots."""
        for layer in self.backbone.gpt_layers:
            layer.self_attention.kv_cache.reorder(batch_index, length)

    def clear_kv_cache(self) -> None:
        for layer in self.backbone.gpt_layers:
            layer.self_attention.kv_cache = None

    def fuse_qkv(self) -> bool:
        """Fuse every layer's query/key/value projections for inference (see
        `CausalSelfAttention.fuse_qkv`); False, and nothing fused, when any layer is LoRA-wrapped."""
        attentions = [layer.self_attention for layer in self.backbone.gpt_layers]
        if all(a.fuse_qkv() for a in attentions):
            return True
        self.unfuse_qkv()
        return False

    def unfuse_qkv(self) -> None:
        for layer in self.backbone.gpt_layers:
            layer.self_attention.unfuse_qkv()


class GPT2Model(GPT2PreTrainedModel):
    gradient_checkpointing: bool = False  # recompute layers in backward (training.efficient.set_grad_checkpointing)

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.word_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.gpt_layers = nn.ModuleList(GPT2Layer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layer_patterns = layer_patterns(config)  # "dense" or the sparse pattern, per layer
        self.init_weights()

    def embed(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token + position embeddings (B, T) -> (B, T, D); positions default to 0..T-1 (the starter's
        `embed(input_ids)`)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device)[None]  # (1, T)
        return self.embed_dropout(self.word_embedding(input_ids) + self.pos_embedding(position_ids))

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None, cache_start: Optional[int] = None) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, D).

        `attention_mask` (B, S): 1 for real tokens, 0 for padding, over the S = cache_start + T
        slots visible to the queries.  `position_ids` default to the slot index; generation with
        left padding passes positions derived from the mask.  `cache_start` (an int) writes to
        and reads from the KV cache set up by `setup_kv_cache`.

        The CS224N starter's `encode(hidden_states, attention_mask)` is the same method given floating
        point input: the (B, T, D) output of `embed` goes through the transformer layers only, with
        the same causal + padding masks, and the final LayerNorm is left to the caller (the
        starter's `forward` applies `final_layer_norm` itself).
        """
        starter = input_ids.is_floating_point()  # the starter's encode(hidden_states, attention_mask)
        if starter and (position_ids is not None or cache_start is not None):
            raise ValueError("encode(hidden_states, attention_mask): position_ids and cache_start go with token ids")
        B, T = input_ids.shape[:2]
        start = 0 if cache_start is None else cache_start
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None]  # (1, T)
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's "
                             f"{self.config.max_position_embeddings} positions; truncate the input")
        # One mask per distinct pattern, of the type of its path (modules.attention_patterns.choose_path):
        # a boolean SDPA mask, a FlexAttention BlockMask or the sparse path's SparseLayout.
        cfg = self.config
        masks = {}
        for p in set(self.layer_patterns):
            path = choose_path(cfg.attention_backend, p, input_ids.device, T, start + T, cfg.attention_window,
                               cfg.attention_global_tokens,
                               dropout_active=self.training and cfg.attention_probs_dropout_prob > 0,
                               cached=cache_start is not None)
            masks[p] = build_attention_mask(attention_mask, T, start, input_ids.device, pattern=p,
                                            window=cfg.attention_window, path=path,
                                            global_tokens=cfg.attention_global_tokens)
        if starter:
            return self.run_layers(input_ids, masks, cache_start)
        return self.encode_with_masks(input_ids, position_ids, masks, cache_start)

    def encode_with_masks(self, input_ids: torch.Tensor, position_ids: torch.Tensor, masks: dict,
                          cache_start=None) -> torch.Tensor:
        """The layers under masks the caller built: `masks[pattern] = (mask, is_causal)` for every
        pattern of `layer_patterns` (generation builds them once for all its steps, see
        models/generation/decoder.py).  `cache_start`: None, an int or a LongTensor of slots
        (`KVCache.update`).  Token ids (B, T) -> final hidden states (B, T, D)."""
        h = self.embed(input_ids, position_ids)  # (B, T, D)
        return self.final_layer_norm(self.run_layers(h, masks, cache_start))

    def run_layers(self, h: torch.Tensor, masks: dict, cache_start=None) -> torch.Tensor:
        """Hidden states (B, T, D) through every transformer layer (no final LayerNorm)."""
        for layer, pattern in zip(self.gpt_layers, self.layer_patterns):
            mask, is_causal = masks[pattern]
            h = self.run_layer(layer, h, mask, is_causal, cache_start)
        return h

    def run_layer(self, layer: GPT2Layer, h: torch.Tensor, *layer_args) -> torch.Tensor:
        """One transformer layer; under `gradient_checkpointing` in training its activations are
        recomputed in the backward pass (same dropout masks: the RNG state is replayed)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, h, *layer_args, use_reentrant=False)
        return layer(h, *layer_args)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Returns {'last_hidden_state': (B, T, D), 'last_token': (B, D)}; `last_token` is the
        hidden state of each row's last non-pad position."""
        h = self.encode(input_ids, attention_mask, position_ids)
        B, T, _ = h.shape
        idx = last_token_index(attention_mask, B, T, h.device)
        return {"last_hidden_state": h, "last_token": h[torch.arange(B, device=h.device), idx]}

    def hidden_state_to_token(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary through the tied input embedding: (..., D) -> (..., V)."""
        return F.linear(hidden_state, self.word_embedding.weight)


class GPT2LMHeadModel(GPT2PreTrainedModel):
    """GPT-2 with its language-modelling head (tied to the input embedding)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.gpt = GPT2Model(config)

    @property
    def lm_head_weight(self) -> nn.Parameter:
        return self.gpt.word_embedding.weight  # tied: the same Parameter

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache_start: Optional[int] = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, V)."""
        return self.gpt.hidden_state_to_token(self.gpt.encode(input_ids, attention_mask, position_ids, cache_start))

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """KV-cached decoding (greedy, sampling, beam search) with transformers' argument names;
        see `models.generation.generate`."""
        from models.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)
