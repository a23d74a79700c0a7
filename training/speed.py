"""Training speed: TF32 matmuls, `torch.compile`, and model-FLOPs utilisation (MFU).

FLOPs per token follow Chowdhery et al. (2022), "PaLM", appendix B (the estimate nanoGPT's
`estimate_mfu` uses): a training step costs 6·N FLOPs per token for the N parameters of the
matmuls (forward 2·N, backward 4·N) plus 12·n_layer·T·d for attention scores and values
(T = sequence length, d = hidden size).  N excludes the position embedding (a lookup, no matmul)
but includes the token embedding, because GPT-2 ties it to the output layer, which is a matmul.
MFU = achieved model FLOPs/s ÷ the device's peak for the dtype the matmuls run in.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# Dense (no sparsity) peak FLOP/s by device-name fragment and matmul dtype, from the vendors' data sheets.
# "fp32" is plain IEEE fp32; "tf32" is fp32 matmuls on tensor cores (what TF32 mode gives).
PEAK_FLOPS = {
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},  # "NVIDIA H100 80GB HBM3" is SXM
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on tensor cores (TF32) where the GPU has them; no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile(model)` when `enabled`.  The compiled wrapper keeps the original module as
    `_orig_mod`; checkpoints are written from that (see `Trainer._module`), so their keys carry
    no `_orig_mod.` prefix and load into an uncompiled model."""
    if not enabled:
        return model
    return torch.compile(model)


def matmul_params(model: nn.Module) -> int:
    """Parameters taking part in matmuls: every (tied-once) parameter except position embeddings."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    return sum(p.numel() for n, p in params if not n.endswith("pos_embedding.weight"))


def flops_per_token(n_params: int, n_layer: int, seq_len: int, hidden: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N + 12·n_layer·T·d (PaLM, appendix B)."""
    return 6.0 * n_params + 12.0 * n_layer * seq_len * hidden


def matmul_dtype(device: torch.device, precision: str) -> str:
    """The dtype the matmuls run in for `--precision` on `device` ("tf32" for fp32 with TF32 on)."""
    if precision != "fp32":
        return precision
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def peak_flops(device: torch.device, precision: str, override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device for the matmul dtype: `override` (`--peak_flops`) if given, else
    the table entry for a known GPU, else None (CPU or an unknown GPU: no MFU is reported)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, table in PEAK_FLOPS.items():
        if fragment in name:
            return table.get(matmul_dtype(device, precision))
    return None


def mfu(tokens_per_s: float, tokens_flops: float, peak: Optional[float]) -> Optional[float]:
    """Model-FLOPs utilisation in [0, 1], or None without a peak."""
    return tokens_per_s * tokens_flops / peak if peak else None
