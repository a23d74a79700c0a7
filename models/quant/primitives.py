"""Symmetric round-to-nearest (RTN) weight quantization and 4-bit packing: the one quantizer that
int8, int4, GPTQ (`models/quant/gptq.py`) and quantization-aware training (`models/quant/qat.py`) all share.

A weight matrix W (N, K) -- `nn.Linear` layout, N output channels, K input features -- is cut
along K into groups of `group_size` columns (`group_size = K`: one group per row, "per output
channel").  Each group g of each row n gets one scale

    s[n, g] = max_k |W[n, k]| / (2^(b-1) - 1/2)          (k in group g)

and its weights become the integers q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1), i.e.
[-128, 127] for b = 8 and [-8, 7] for b = 4; the dequantized weight is s * q.  Dividing by
2^(b-1) - 1/2 (127.5, 7.5) rather than 2^(b-1) - 1 uses the one extra negative level: W / s lies in
[-(2^(b-1) - 1/2), 2^(b-1) - 1/2], rounding moves it by at most 1/2, and only +(2^(b-1) - 1/2)
itself is clamped, again by 1/2.  So every weight obeys the analytic bound

    |W - s q| <= s / 2 = max|W_group| / (2^b - 1)

(torchao's symmetric `choose_qparams_affine` uses the same scale, which the tests check against).
There are no zero points.  4-bit integers are stored two per byte (`pack_int4`): column 2j in the
low nibble, column 2j+1 in the high nibble, each as the unsigned q + 8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_BITS = (4, 8)


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of signed `bits`-bit integers."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized: `bits` (8 or 4) and `group_size` (columns sharing a
    scale; None = the whole row, one scale per output channel)."""

    bits: int
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        qrange(self.bits)
        if self.group_size is not None and self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (or None for one group per row), got {self.group_size}")

    def groups(self, in_features: int) -> int:
        """Number of groups per row; raises if `group_size` does not divide `in_features`."""
        g = self.group_size or in_features
        if in_features % g:
            raise ValueError(f"group_size {g} does not divide the layer's in_features {in_features}; "
                             f"choose a group_size that divides every quantized layer's input width")
        if self.bits == 4 and in_features % 2:
            raise ValueError(f"4-bit packing needs an even in_features, got {in_features}")
        return in_features // g

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


def group_scales(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Scales (N, K // group) of a weight (N, K), in float32 (float64 for a float64 weight)."""
    n, k = weight.shape
    groups = spec.groups(k)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    amax = weight.detach().to(dtype).reshape(n, groups, k // groups).abs().amax(dim=-1)  # (N, G)
    # An all-zero group would get scale 0 (and 0 / 0 below): any positive scale represents it exactly.
    return (amax / (2 ** (spec.bits - 1) - 0.5)).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_with_scales(weight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integers (N, K) int8 of `weight` (N, K) under given group scales (N, G), rounding to nearest."""
    n, k = weight.shape
    qmin, qmax = qrange(spec.bits)
    w = weight.detach().to(scales.dtype).reshape(n, scales.shape[1], -1)  # (N, G, K/G)
    q = torch.round(w / scales[..., None]).clamp_(qmin, qmax)
    return q.reshape(n, k).to(torch.int8)


def quantize(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (q (N, K) int8, scales (N, G) float32) of a weight (N, K).
    A float64 weight gets float64 scales (GPTQ's reference tests run in float64)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    scales = group_scales(weight, spec)
    return quantize_with_scales(weight, scales, spec), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s * q: (N, K) in `dtype`, from integers (N, K) and group scales (N, G)."""
    n, k = q.shape
    w = q.to(dtype).reshape(n, scales.shape[1], -1) * scales.to(dtype)[..., None]  # (N, G, K/G)
    return w.reshape(n, k)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(W)) in W's dtype: the weight the quantized model will really use."""
    q, scales = quantize(weight, spec)
    return dequantize(q, scales, weight.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7], (N, K) with K even -> bytes (N, K // 2) uint8, two values per byte."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values outside the 4-bit range [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # [0, 15]
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: bytes (N, K // 2) uint8 -> integers (N, K) int8 in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)  # (N, K/2, 2) -> (N, K)
