"""The model side of one generation: KV cache, per-step masks and positions, fused q/k/v, the
output layer, and the static compiled decode step (gpt-fast's recipe, Chen et al. 2023 blog
"Accelerating Generative AI with PyTorch II: GPT, Fast").

`Decoder.prefill` runs the (left-padded) prompts once; `Decoder.step(tokens, t)` feeds the token
chosen at new-token index t - 1 (slot P + t - 1) and returns the logits of the next one.  What a
step needs is built once, in `__init__`:

* the attention mask of every step: one `build_attention_mask` call for all decode queries at
  once, (B|1, 1, n_steps, S); step t reads row t - 1 (a view in eager mode).  Without padding
  and with dense attention no mask exists at all (SDPA over the filled slots).  Sparse layers
  whose path (`modules.attention_patterns.choose_path`; one-token decoding under "auto" is SDPA)
  is FlexAttention or the sparse gather path get their BlockMask / SparseLayout per step;
* the position of every step (B|1, n_steps): `cumsum(mask) - 1` of the next slot;
* the KV cache of `batch_size` rows and S = P + max_new_tokens - 1 slots (the last new token is
  never fed back), and on `FUSE_QKV_DEVICES` the fused q/k/v projections
  (`GPT2PreTrainedModel.fuse_qkv`; skipped for LoRA-wrapped layers).

Only the last position goes through the output layer (`lm_logits`).  On a CPU, `generate()`
runs every plain linear layer and the output layer through the copies of
`modules.inference_weights` (`inference_copies`): oneDNN-packed weights when the decode forwards
have two or more rows, input-major copies at one row, 1.2-1.7x faster products than `F.linear`
(measured there), cached across calls and checked against the weights before each.  Without
them the output layer runs in slices of `HEAD_CHUNK` vocabulary rows: the same products bit for
bit, faster than one (12 x 768) @ (768 x 50,257) matmul, which the BLAS runs far below its speed
on the smaller slices.

`compile=True`: the step has fixed shapes (the cache is addressed by a slot tensor and read
whole under the step's mask), so `torch.compile` (mode "reduce-overhead" on CUDA: CUDA graphs)
builds it once per shape and every step of a generation replays it.  The shapes are those of the
call (batch rows, prompt length + max_new_tokens slots): another prompt length compiles again, and
after dynamo's recompile limit the step falls back to eager (not yet bucketed to fixed sizes as
gpt-fast does).  Nothing in a step reads a tensor back to the host.
"""
from __future__ import annotations

from typing import Optional

import torch

from modules import inference_weights
from modules.attention import build_attention_mask
from modules.attention_patterns import choose_path

HEAD_CHUNK = {"cpu": 1024}  # vocabulary rows per matmul of the output layer; devices not listed: one matmul
# Devices on which a generation fuses q/k/v.  Not CPUs: there the three (12 x 768) @ (768 x 768)
# products cost what the one (12 x 768) @ (768 x 2,304) costs, while copying the weights into the
# fused matrix takes ~54 ms per generate() call for gpt2 (about a token's time; measured 2026-12-01).
FUSE_QKV_DEVICES = ("cuda",)


def lm_logits(gpt, h: torch.Tensor) -> torch.Tensor:
    """The tied output layer on hidden states (N, D) -> float32 logits (N, V), equal to
    `gpt.hidden_state_to_token(h).float()`: within ~1e-6 through the copies that
    `modules.inference_weights.active` prepared (oneDNN-packed from two rows, input-major at one:
    another summation order), else bit for bit in slices of `HEAD_CHUNK` rows on a CPU.  Fast
    paths only for inference in fp32 (no grad, no autocast); inside torch.compile only the
    input-major copy is used and the slices are concatenated (no `out=`)."""
    weight = gpt.word_embedding.weight  # (V, D)
    chunk = HEAD_CHUNK.get(h.device.type)
    plain = (h.dtype == weight.dtype == torch.float32 and h.dim() == 2 and not torch.is_grad_enabled()
             and not torch.is_autocast_enabled(h.device.type))
    if not plain:
        return gpt.hidden_state_to_token(h).float()
    input_major = inference_weights.form(weight, "input_major")
    if input_major is not None and h.size(0) == 1:
        return h @ input_major
    if torch.compiler.is_compiling():
        if chunk is None or weight.size(0) <= chunk:
            return gpt.hidden_state_to_token(h).float()
        return torch.cat([torch.mm(h, w.t()) for w in weight.split(chunk)], dim=1)
    packed = inference_weights.form(weight, "packed")
    if packed is not None:
        return inference_weights.packed_linear(h, packed)
    if chunk is None or weight.size(0) <= chunk:
        return gpt.hidden_state_to_token(h).float()
    out = h.new_empty((h.size(0), weight.size(0)))
    for w, o in zip(weight.split(chunk), out.split(chunk, dim=1)):
        torch.mm(h, w.t(), out=o)
    return out


def inference_copies(models, rows: int, compiled: bool = False):
    """`modules.inference_weights.active` for the layers and tied output layers of `models`, whose
    decode forwards have `rows` rows (in a compiled step: `compiled`) (context manager)."""
    linears = [m for model in models for layer in model.gpt.gpt_layers for m in layer.linear_layers()]
    return inference_weights.active(linears, [model.gpt.word_embedding.weight for model in models], rows, compiled)


def step_masks(gpt, key_valid: Optional[torch.Tensor], num_queries: int, start: int, device: torch.device,
               patterns=None) -> dict:
    """The masks of a cached forward of `num_queries` tokens at slots start.. (one per pattern of
    `patterns`, default every layer's), each of the type of its path (`choose_path`); `key_valid`
    (B, start + num_queries) marks the slots that may be attended to (None: all)."""
    cfg, S = gpt.config, start + num_queries
    masks = {}
    for p in set(gpt.layer_patterns) if patterns is None else patterns:
        path = choose_path(cfg.attention_backend, p, device, num_queries, S, cfg.attention_window,
                           cfg.attention_global_tokens, dropout_active=False, cached=True)
        masks[p] = build_attention_mask(key_valid, num_queries, start, device, pattern=p, window=cfg.attention_window,
                                        path=path, global_tokens=cfg.attention_global_tokens)
    return masks


def _static_step(gpt, tokens, t_index, slot, positions, tables):
    """One decode step with fixed shapes: tokens (R, 1) at cache slot `slot` (1,), masks and
    positions picked from the tables by `t_index` (1,); -> logits (R, V).  Compiled once."""
    pos = positions.index_select(1, t_index)  # (R|1, 1)
    masks = {p: (table.index_select(2, t_index), False) for p, table in tables.items()}  # (R|1, 1, 1, S)
    h = gpt.encode_with_masks(tokens, pos, masks, cache_start=slot)
    return lm_logits(gpt, h[:, -1])


_compiled_steps: dict = {}


def compiled_step(device_type: str):
    """The compiled `_static_step` for a device type (CUDA: mode "reduce-overhead", CUDA graphs)."""
    if device_type not in _compiled_steps:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled_steps[device_type] = torch.compile(_static_step, mode=mode, fullgraph=True, dynamic=False)
    return _compiled_steps[device_type]


class Decoder:
    """Prefill and decode steps of one generate() call over `batch_size` cache rows.

    `mask` is the (B, P) left-padded attention mask, or None when no row is padded; with
    `batch_size` = B * k (beam search) the prefill fills the first B rows and `expand` copies
    them to the k beams."""

    def __init__(self, model, prompt_len: int, mask: Optional[torch.Tensor], batch_size: int,
                 max_new_tokens: int, compile: bool = False):
        self.model, self.gpt = model, model.gpt
        self.P, self.n_steps = prompt_len, max(max_new_tokens - 1, 0)
        self.slots = prompt_len + self.n_steps
        self.compile = compile
        device = self.gpt.word_embedding.weight.device
        self.device = device
        cfg = model.config
        # Under autocast keys and values come out in the autocast dtype: store them that way.
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        model.setup_kv_cache(batch_size, self.slots, dtype=dtype, static=compile)
        if device.type in FUSE_QKV_DEVICES:
            model.fuse_qkv()
        key_valid = None
        if mask is not None:
            key_valid = torch.ones((mask.size(0), self.slots), dtype=torch.long, device=device)
            key_valid[:, :prompt_len] = mask
            first = mask.sum(-1, keepdim=True)  # (B, 1): position of the first new token
        else:
            first = torch.full((1, 1), prompt_len, dtype=torch.long, device=device)
        self.positions = first + torch.arange(self.n_steps, device=device)  # (B|1, n_steps)
        # Patterns whose one-token path is not SDPA: a BlockMask / SparseLayout per step.
        self.per_step = {p for p in set(self.gpt.layer_patterns)
                         if choose_path(cfg.attention_backend, p, device, 1, self.slots, cfg.attention_window,
                                        cfg.attention_global_tokens, dropout_active=False, cached=True) != "sdpa"}
        self.key_valid = key_valid
        self.tables = {}  # pattern -> (B|1, 1, n_steps, S) bool
        # The compiled step reads every slot, so it always needs a mask table (the builder returns None
        # for one unpadded query: give it the all-valid key mask instead).
        table_keys = torch.ones((1, self.slots), dtype=torch.long, device=device) if compile and key_valid is None \
            else key_valid
        for p in set(self.gpt.layer_patterns) - self.per_step:
            if p == "dense" and key_valid is None and not compile:
                continue  # no mask: SDPA attends over the filled slots
            if self.n_steps:
                self.tables[p] = build_attention_mask(table_keys, self.n_steps, prompt_len, device, pattern=p,
                                                      window=cfg.attention_window,
                                                      global_tokens=cfg.attention_global_tokens)[0]

    def prefill(self, input_ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Prompts (B, P) into cache rows 0..B-1; logits of the first new token (B, V).  `mask` is
        the one given to __init__ (None without padding)."""
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        h = self.gpt.encode(input_ids, mask, positions, cache_start=0)
        return lm_logits(self.gpt, h[:, -1])

    def expand(self, index: torch.Tensor) -> None:
        """Row i of the cache, masks and positions becomes row index[i] (beam search: B -> B * k)."""
        self.model.reorder_kv_cache(index, self.P)
        if self.positions.size(0) > 1:
            self.positions = self.positions.index_select(0, index)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)
        self.tables = {p: t.index_select(0, index) if t.size(0) > 1 else t for p, t in self.tables.items()}

    def reorder(self, index: torch.Tensor, t: int) -> None:
        """Beam search after choosing new-token t: cache row i <- row index[i] over the filled slots."""
        self.model.reorder_kv_cache(index, min(self.P + t, self.slots))

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """tokens (R, 1), the new token t - 1 of each row, at slot P + t - 1 -> logits (R, V)."""
        slot = self.P + t - 1
        if self.compile:
            t_index = torch.full((1,), t - 1, dtype=torch.long, device=self.device)
            logits = compiled_step(self.device.type)(self.gpt, tokens, t_index, t_index + self.P, self.positions,
                                                     self.tables)
            return logits.clone() if self.device.type == "cuda" else logits
        masks = {p: (table[:, :, t - 1:t, :slot + 1], False) for p, table in self.tables.items()}
        if self.per_step:
            valid = None if self.key_valid is None else self.key_valid[:, :slot + 1]
            masks.update(step_masks(self.gpt, valid, 1, slot, self.device, self.per_step))
        masks.setdefault("dense", (None, False))
        h = self.gpt.encode_with_masks(tokens, self.positions[:, t - 1:t], masks, cache_start=slot)  # (R, 1, D)
        return lm_logits(self.gpt, h[:, -1])

    def close(self) -> None:
        self.model.clear_kv_cache()
        self.model.unfuse_qkv()
