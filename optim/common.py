"""What SOAP and Shampoo share: which tensors they precondition and the Adam fallback.

The rule (one place, used by both optimizers): a parameter is preconditioned when

    its group has precondition=True  and  p.dim() == 2  and  max(p.shape) <= max_precond_dim

Every other parameter (biases, LayerNorm gains, tensors with a dimension above max_precond_dim such
as GPT-2's tied 50257 x D token embedding, tensors of 3 or more dims, and every tensor of a group
with precondition=False) takes exactly the step of `optimizer.AdamW` with the group's lr, betas, eps,
weight_decay and correct_bias: the same update functions run on it, so it is bit-identical to AdamW.
The trainer's `training.optimizers.param_groups` puts a model's nn.Embedding weights in groups of
their own with precondition=precondition_embeddings (default False: embeddings take Adam steps).
"""

from collections import defaultdict
import torch

from optimizer import _check_hyperparameters, _foreach_update

ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def is_preconditioned(p: torch.Tensor, group: dict) -> bool:
    """The module docstring's rule: 2-D, every dimension <= max_precond_dim, group precondition=True."""
    return group["precondition"] and p.dim() == 2 and max(p.shape) <= group["max_precond_dim"]


def check_group(group: dict, name: str, sum_allowed: bool) -> None:
    """Raise ValueError naming the field for an invalid hyper-parameter of a SOAP/Shampoo group;
    `sum_allowed`: shampoo_beta = 1 (sum the factors, no decay) is valid."""
    _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    for field in ("precondition_frequency", "max_precond_dim"):
        value = group[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {field} must be an integer >= 1, got {value!r}")
    beta = group["shampoo_beta"]
    if beta is not None and not (0.0 <= beta < 1.0 or (sum_allowed and beta == 1.0)):
        interval = "[0, 1]" if sum_allowed else "[0, 1)"
        raise ValueError(f"{name}: shampoo_beta must be None (use betas[1]) or in {interval}, got {beta!r}")
    if not isinstance(group["precondition"], bool):
        raise TypeError(f"{name}: precondition must be a bool, got {group['precondition']!r}")


def shampoo_beta(group: dict) -> float:
    """The decay of the Kronecker factors: shampoo_beta, or betas[1] when it is None."""
    return group["betas"][1] if group["shampoo_beta"] is None else group["shampoo_beta"]


def sort_params(optimizer: torch.optim.Optimizer, group: dict, preconditioned_keys: tuple[str, ...]):
    """Split a group's parameters with gradients into (fallback, new, preconditioned).

    `fallback` take the Adam step, `new` are preconditioned tensors seen for the first time (their
    state is empty), `preconditioned` already have the state `preconditioned_keys`. Raises when a
    parameter's state does not match the rule, e.g. a resumed run changed max_precond_dim.
    """
    name = type(optimizer).__name__
    fallback, new, preconditioned = [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        state = optimizer.state[p]
        wanted = is_preconditioned(p, group)
        if wanted and _is_sharded(p):
            raise TypeError(
                f"{name} preconditions whole matrices and cannot step sharded (FSDP / DTensor) parameters; "
                "train without fsdp (DDP, which replicates the parameters, works)")
        if not state:
            (new if wanted else fallback).append(p)
            continue
        has = set(preconditioned_keys) <= set(state) if wanted else set(state) == set(ADAM_STATE)
        if not has:
            kind = "preconditioned" if wanted else "Adam-fallback"
            raise ValueError(
                f"{name}: the state of a parameter of shape {tuple(p.shape)} has keys {sorted(state)}, "
                f"but the group's precondition / max_precond_dim make it {kind}; resume with the "
                "precondition and max_precond_dim the run started with")
        (preconditioned if wanted else fallback).append(p)
    return fallback, new, preconditioned


def _is_sharded(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def adam_fallback_step(optimizer: torch.optim.Optimizer, params: list, group: dict) -> None:
    """optimizer.AdamW's step (state keys step, exp_avg, exp_avg_sq) for the fallback tensors."""
    if not params:
        return
    for p in params:
        state = optimizer.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
    states = [optimizer.state[p] for p in params]
    _foreach_update(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [s["step"] for s in states], group)


def buckets(params: list, states: dict) -> dict:
    """Parameters grouped by (device, dtype, step): one foreach call and one step size per bucket."""
    out = defaultdict(list)
    for p in params:
        out[(p.device, p.dtype, states[p]["step"])].append(p)
    return out


def linalg_dtype(t: torch.Tensor) -> torch.dtype:
    """eigh and qr have no half-precision kernels: bf16/fp16 factors are decomposed in fp32."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def count_preconditioned(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(preconditioned, fallback) parameter counts under the rule, for logs and tests."""
    pre = fall = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_preconditioned(p, group):
                pre += 1
            else:
                fall += 1
    return pre, fall
