"""Weight-only quantized layers for our GPT-2 and the functions that put them into a model.

`QuantizedLinear` replaces an `nn.Linear`: it stores the integers of `models/quant/primitives.py`
(int8 as int8, int4 packed two per byte) and float32 group scales as buffers, keeps the bias as a
float Parameter, and dequantizes its weight on the fly in every forward, in the activation's
dtype (the full-precision weight of one layer exists only during that layer's matmul).
`QuantizedEmbedding` does the same for the tied token-embedding / output matrix (V, D): one
quantized tensor serves both uses, so quantizing it changes the input embeddings *and* the output
layer (its rows are the output channels of the head, so per-row groups are per-output-channel
groups of the head).  Its `weight` property dequantizes the whole matrix for the head, which is how
`GPT2Model.hidden_state_to_token` reads it.

The linear layers of every GPT-2 block are `LINEAR_LAYERS`; `linear_layers(model)` finds them, the
byte counters measure what the stored weights cost.  The integers a layer holds come from
round-to-nearest (`quantize_linears`) or from GPTQ (`models/quant/gptq.py`); both end in
`QuantizedLinear.from_integers`.  A quantized model records what was done in
`model.backbone.quantization` (the dict `models/quant/io.py` writes as `quantization.json`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.quant.primitives import QuantSpec, dequantize, pack_int4, quantize, unpack_int4

# Every linear layer of a GPT2Layer, as sub-module names of the layer.
LINEAR_LAYERS = ("self_attention.query", "self_attention.key", "self_attention.value",
                 "attention_dense", "interm_dense", "out_dense")


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(q) if bits == 4 else q.to(torch.int8)


def _unpack(stored: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(stored) if bits == 4 else stored


def _register_storage(module: nn.Module, rows: int, cols: int, spec: QuantSpec, device) -> None:
    """The buffers of a quantized (rows, cols) matrix: `qweight` (rows, cols) int8 or (rows, cols // 2)
    uint8 for 4 bits, and `scales` (rows, groups) float32."""
    groups = spec.groups(cols)
    shape, dtype = ((rows, cols // 2), torch.uint8) if spec.bits == 4 else ((rows, cols), torch.int8)
    module.register_buffer("qweight", torch.zeros(shape, dtype=dtype, device=device))
    module.register_buffer("scales", torch.ones(rows, groups, dtype=torch.float32, device=device))


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W = dequantize(integers, scales); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        _register_storage(self, out_features, in_features, spec, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_integers(cls, q: torch.Tensor, scales: torch.Tensor, spec: QuantSpec,
                      bias: Optional[torch.Tensor]) -> "QuantizedLinear":
        """A layer holding integers q (N, K) int8 and scales (N, G), with `bias` (N,) or None."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, spec, bias=bias is not None, device=q.device)
        if tuple(scales.shape) != tuple(layer.scales.shape):
            raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit a ({out_features}, {in_features}) "
                             f"weight with group_size {spec.group_size}: expected {tuple(layer.scales.shape)}")
        with torch.no_grad():
            layer.qweight.copy_(_pack(q, spec.bits))
            layer.scales.copy_(scales)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantizedLinear":
        """Round-to-nearest quantization of an `nn.Linear` (or `quant.qat.FakeQuantLinear`)."""
        q, scales = quantize(linear.weight, spec)
        return cls.from_integers(q, scales, spec, linear.bias)

    def integers(self) -> torch.Tensor:
        """The stored integers, unpacked: (N, K) int8."""
        return _unpack(self.qweight, self.spec.bits)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) in `dtype`."""
        return dequantize(self.integers(), self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size or self.in_features}, bias={self.bias is not None}")


class QuantizedEmbedding(nn.Module):
    """The tied (V, D) token embedding and output matrix, stored quantized row by row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.spec = num_embeddings, embedding_dim, spec
        _register_storage(self, num_embeddings, embedding_dim, spec, device)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> "QuantizedEmbedding":
        q, scales = quantize(embedding.weight, spec)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, spec, device=q.device)
        with torch.no_grad():
            layer.qweight.copy_(_pack(q, spec.bits))
            layer.scales.copy_(scales)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized matrix (V, D), in the scales' dtype (what the output layer multiplies by)."""
        return dequantize(_unpack(self.qweight, self.spec.bits), self.scales, self.scales.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (...) -> embeddings (..., D); only the looked-up rows are dequantized."""
        rows = input_ids.reshape(-1)
        q = _unpack(self.qweight[rows], self.spec.bits)  # (M, D)
        return dequantize(q, self.scales[rows], self.scales.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size or self.embedding_dim}")


# ---- finding and replacing layers ------------------------------------------------------------
def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every block's linear layers, by name under the backbone (`gpt_layers.{i}.{LINEAR_LAYERS}`)."""
    backbone = model.backbone
    return {f"gpt_layers.{i}.{name}": layer.get_submodule(name)
            for i, layer in enumerate(backbone.gpt_layers) for name in LINEAR_LAYERS}


def check_groups(model: nn.Module, spec: QuantSpec, embedding: bool = False) -> None:
    """Raise (naming `group_size`) before any work if `spec` cannot quantize some layer of `model`."""
    for name, layer in linear_layers(model).items():
        try:
            spec.groups(layer.in_features)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if embedding:
        spec.groups(model.backbone.config.hidden_size)


def quantize_linears(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Round-to-nearest quantization of every linear layer of `model`, in place; returns `model`."""
    check_groups(model, spec)
    backbone = model.backbone
    for name, layer in linear_layers(model).items():
        backbone.set_submodule(name, QuantizedLinear.from_linear(layer, spec))
    record(model, "rtn", spec)
    return model


def quantize_embedding(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Round-to-nearest quantization of the tied embedding / output matrix, in place (see the
    module docstring for what that means); GPTQ-quantized models use this too."""
    backbone = model.backbone
    spec.groups(backbone.config.hidden_size)
    backbone.word_embedding = QuantizedEmbedding.from_embedding(backbone.word_embedding, spec)
    info = getattr(backbone, "quantization", None) or {}
    backbone.quantization = {**info, "embedding": spec.to_dict()}
    return model


def record(model: nn.Module, algorithm: str, spec: QuantSpec, **details) -> None:
    """Write what was done into `model.backbone.quantization` (models/quant/io.py saves it)."""
    backbone = model.backbone
    info = getattr(backbone, "quantization", None) or {"embedding": None}
    backbone.quantization = {**info, "algorithm": algorithm, **spec.to_dict(), **details}


def is_quantized(model: nn.Module) -> bool:
    return getattr(model.backbone, "quantization", None) is not None


# ---- what the weights cost -------------------------------------------------------------------
def _weight_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes stored, bytes as float32) of one layer's weight (scales included, bias excluded)."""
    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        rows, cols = module.scales.shape[0], (module.in_features if isinstance(module, QuantizedLinear)
                                              else module.embedding_dim)
        return module.qweight.nbytes + module.scales.nbytes, rows * cols * 4
    return module.weight.nbytes, module.weight.numel() * 4


def linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(stored bytes, float32 bytes) of the weights of all block linear layers (scales included,
    biases excluded: they stay in full precision and are the same in every row of the table)."""
    pairs = [_weight_bytes(m) for m in linear_layers(model).values()]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model stores (parameters and buffers, the tied matrix once)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.nbytes for t in tensors.values())
