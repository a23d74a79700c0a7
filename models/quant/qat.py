"""Quantization-aware training (QAT): fake-quantized linear layers with a straight-through estimator.

During training every block linear layer keeps its full-precision ("latent") weight W, but its
forward pass uses fake_quantize(W) = dequantize(quantize(W)) -- exactly the weight the quantized
model will hold (the same round-to-nearest quantizer, `models/quant/primitives.py`) -- so the loss sees
the quantization error and training learns weights that survive it.  Rounding has zero gradient
almost everywhere; the straight-through estimator (Bengio et al., 2013, "Estimating or
Propagating Gradients Through Stochastic Neurons") passes dL/dfake_quantize(W) to W unchanged.
No weight is ever clipped by the absmax scales, so no gradient is masked either.  The recipe is
that of Jacob et al. (2018), "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", restricted to weights.

`FakeQuantLinear` subclasses `nn.Linear` and takes over the very `weight` / `bias` Parameters, so a
QAT model checkpoints, saves (`save_pretrained`) and loads like any other, and peft's LoRA still
recognises its layers.  `convert_qat` turns a QAT model into the real quantized model
(`QuantizedLinear`), whose logits equal the fake-quantized model's; so does running
`quantize.py --methods int8|int4` with the same group size on a QAT run's saved model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.quant.modules import QuantizedLinear, check_groups, linear_layers, record
from models.quant.primitives import QuantSpec, fake_quantize

QAT_BITS = {"int8": 8, "int4": 4}


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: dequantize(quantize(W)); backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return fake_quantize(weight, spec)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class FakeQuantLinear(nn.Linear):
    """An `nn.Linear` whose forward uses the fake-quantized weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 device=None, dtype=None):
        spec.groups(in_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = spec

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "FakeQuantLinear":
        """A fake-quantized layer holding the very same Parameters as `linear` (optimisers that
        already hold them keep working)."""
        layer = cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _FakeQuantSTE.apply(self.weight, self.spec), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fake_quant_bits={self.spec.bits}, group_size={self.spec.group_size}"


def qat_spec(mode: str, group_size: int | None = None) -> QuantSpec:
    """The spec of a QAT mode: `int8` is per output channel (group_size None), `int4` group-wise."""
    if mode not in QAT_BITS:
        raise ValueError(f"qat must be one of {sorted(QAT_BITS)}, got {mode!r}")
    if mode == "int4" and group_size is None:
        raise ValueError("qat int4 needs a qat_group_size (e.g. 128; 64 for the tiny model)")
    return QuantSpec(QAT_BITS[mode], group_size if mode == "int4" else None)


def prepare_qat(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Fake-quantize every block linear layer of `model` in place.  Call it before the model is
    wrapped for DDP/FSDP or compiled; an optimiser built earlier keeps working (the Parameters are
    the same objects)."""
    check_groups(model, spec)
    backbone = model.backbone
    for name, layer in linear_layers(model).items():
        if type(layer) is not nn.Linear:
            raise TypeError(f"prepare_qat expects plain nn.Linear layers, found {type(layer).__name__} at {name} "
                            f"(apply QAT before LoRA, and only to a model that is not quantized yet)")
        backbone.set_submodule(name, FakeQuantLinear.from_linear(layer, spec))
    return model


def qat_spec_of(model: nn.Module) -> QuantSpec | None:
    """The spec a QAT model was prepared with, or None if it has no fake-quantized layer."""
    specs = {layer.spec for layer in linear_layers(model).values() if isinstance(layer, FakeQuantLinear)}
    if len(specs) > 1:
        raise ValueError(f"model mixes several QAT specs: {specs}")
    return next(iter(specs), None)


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every `FakeQuantLinear` by the `QuantizedLinear` holding the same quantized weight."""
    spec = qat_spec_of(model)
    if spec is None:
        raise ValueError("convert_qat: the model has no fake-quantized layer (call prepare_qat first)")
    backbone = model.backbone
    for name, layer in linear_layers(model).items():
        backbone.set_submodule(name, QuantizedLinear.from_linear(layer, spec))
    record(model, "qat", spec)
    return model
