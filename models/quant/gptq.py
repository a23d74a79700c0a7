"""GPTQ: post-training quantization with second-order error feedback (Frantar, Ashkboos, Hoefler and
Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For one linear layer with weight W (N, K) and calibration inputs x_1..x_n (K,), GPTQ looks for the
quantized Q minimising ||W X - Q X||^2 (X = the inputs as columns), whose Hessian in each row is
H = (2/n) sum_j x_j x_j^T (K, K), the same for every row.  It quantizes the columns of W one at a
time, left to right, with the quantizer of `models/quant/primitives.py`, and after each column i moves
that column's error onto the columns not yet quantized, optimally for the remaining least-squares
problem (the Optimal Brain Surgeon update of Frantar & Alistarh, 2022):

    err = (W[:, i] - Q[:, i]) / [H_i^-1]_ii,     W[:, i:] -= err [H_i^-1]_{i, i:}

where H_i^-1 is the inverse Hessian of the columns i.. (column i-1 eliminated from H_{i-1}^-1).
The paper's three implementation steps are all here: (1) one fixed column order for every row;
(2) "lazy batch" updates -- the error of a block of `block_size` columns is applied to the later
columns in one matrix product once the block is done; (3) the rows of every H_i^-1 needed are read
off one Cholesky factorisation: with H^-1 = U^T U (U upper triangular), [H_i^-1]_{i, i:} / [H_i^-1]_ii
= U[i, i:] / U[i, i].  Dampening (lambda = damp * mean(diag H) added to the diagonal) keeps the
factorisation stable; inputs that are always zero ("dead" columns) get H_ii = 1 and a zero weight.
A group's scale is computed when the algorithm reaches the group's first column, from that
group's weights as updated by the errors so far (for per-channel int8 that is the original row).
Column reordering by the Hessian diagonal ("act-order") is not done.

`gptq_quantize_model` applies this layer by layer to a GPT-2, the way the paper does: the
calibration text runs up to a block, the block's linear layers are quantized in the order the data
meets them (query/key/value, then attention_dense, interm_dense, out_dense; the inputs of each come
from the already-quantized layers before it), and the quantized block's outputs feed the next.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from models.quant.modules import QuantizedLinear, check_groups, record
from models.quant.primitives import QuantSpec, group_scales

# The linear layers of a GPT2Layer in the order the data reaches them; one group is quantized
# from inputs produced by the already-quantized groups before it.  The layers of a group read the
# same input (q/k/v: the attention LayerNorm's output), so they share one Hessian.
SEQUENTIAL_GROUPS = (("self_attention.query", "self_attention.key", "self_attention.value"),
                     ("attention_dense",), ("interm_dense",), ("out_dense",))


class HessianAccumulator:
    """H = (2/n) sum_j x_j x_j^T over every input row x_j (K,) a layer sees."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (..., K) -> (n, K)
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.sum * (2.0 / self.count)


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                         block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight (N, K) given its Hessian (K, K): (integers (N, K) int8, scales (N, G)).
    Runs in float32 (float64 for a float64 weight); see the module docstring."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be ({k}, {k}) for a weight of shape {(n, k)}, got {tuple(hessian.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    # U: upper Cholesky factor of H^-1 (H^-1 = U^T U).
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); "
                         f"raise damp or give more calibration tokens") from exc

    group = spec.group_size or k
    Q = torch.zeros(n, k, dtype=torch.int8, device=W.device)
    scales = torch.zeros(n, spec.groups(k), dtype=dtype, device=W.device)
    qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1 = W[:, b0:b1].clone()  # (N, B): updated column by column
        E = torch.zeros_like(W1)  # (N, B): the scaled errors of this block
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:  # a new group: its scale from its current (error-updated) weights
                g = _current_columns(W, W1, E, U, b0, b1, i, group)  # (N, group)
                scales[:, col // group] = group_scales(g, QuantSpec(spec.bits, None))[:, 0]
            s = scales[:, col // group]
            w = W1[:, i]
            q = torch.round(w / s).clamp_(qmin, qmax)
            Q[:, col] = q.to(torch.int8)
            err = (w - q * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # error feedback inside the block
            E[:, i] = err
        W[:, b1:] -= E @ U[b0:b1, b1:]  # lazy batch update of every later column
    return Q, scales.float() if dtype == torch.float32 else scales


def _current_columns(W, W1, E, U, b0: int, b1: int, i: int, group: int) -> torch.Tensor:
    """Columns b0+i .. b0+i+group-1 as the recursion sees them now: the block's part from W1, the
    part beyond the block from W with this block's pending (lazy) updates applied."""
    col = b0 + i
    inside = W1[:, i:i + group]
    if col + group <= b1:
        return inside
    outside = W[:, b1:col + group] - E[:, :i] @ U[b0:b0 + i, b1:col + group]
    return torch.cat([inside, outside], dim=1)


class _StopForward(Exception):
    pass


@torch.no_grad()
def _block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple]]:
    """Hidden states entering block 0 for each calibration batch, and each block's other forward
    arguments (attention mask, is_causal, ...), captured by forward pre-hooks."""
    layers = model.backbone.gpt_layers
    hidden, extra = [], [None] * len(layers)

    def hook(index: int):
        def pre(module, args):
            if index == 0:
                hidden.append(args[0])
            if extra[index] is None:
                extra[index] = args[1:]
            if index == len(layers) - 1 or all(e is not None for e in extra):
                raise _StopForward  # the rest of the network is not needed
        return pre

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            try:
                model(ids)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return hidden, extra


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                        block_size: int = 128, batch_size: int = 8,
                        progress: Optional[Callable[[str], None]] = None) -> nn.Module:
    """GPTQ of every block linear layer of `model` (a GPT2Model or GPT2LMHeadModel), in place, from
    calibration token blocks (num_blocks, T); returns `model`.  `progress(name)` is called per layer."""
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be a non-empty (num_blocks, T) tensor of token ids, "
                         f"got shape {tuple(calibration.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_groups(model, spec)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [b.to(device) for b in calibration.split(batch_size)]
    hidden, extra = _block_inputs(model, batches)
    for index, layer in enumerate(model.backbone.gpt_layers):
        for names in SEQUENTIAL_GROUPS:
            targets = {name: layer.get_submodule(name) for name in names}
            first = targets[names[0]]
            accumulator = HessianAccumulator(first.in_features, device)
            handle = first.register_forward_hook(lambda mod, args, out: accumulator.add(args[0]))
            try:
                for h in hidden:
                    layer(h, *extra[index])
            finally:
                handle.remove()
            hessian = accumulator.hessian()
            for name, linear in targets.items():
                q, scales = gptq_quantize_weight(linear.weight, hessian, spec, damp, block_size)
                layer.set_submodule(name, QuantizedLinear.from_integers(q, scales, spec, linear.bias))
                if progress is not None:
                    progress(f"gpt_layers.{index}.{name}")
        hidden = [layer(h, *extra[index]) for h in hidden]  # the quantized block's outputs feed the next
    model.train(was_training)
    record(model, "gptq", spec, gptq={"damp": damp, "block_size": block_size,
                                      "calibration_tokens": calibration.numel(),
                                      "calibration_block_length": calibration.shape[1]})
    return model
