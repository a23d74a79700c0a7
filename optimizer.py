"""AdamW: Adam with decoupled weight decay, as specified in the CS224N "Build GPT-2" handout.

Adam is from Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (the
"efficient" bias correction of Section 2, which folds both corrections into the step size).
Decoupled weight decay is from Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
ICLR 2019.

For a parameter p with gradient g at step t (t starts at 1), lr = learning rate:

    p     <- p - lr * weight_decay * p          # decoupled decay, on the pre-update p
    m     <- b1 * m + (1 - b1) * g
    v     <- b2 * v + (1 - b2) * g * g
    alpha <- lr * sqrt(1 - b2**t) / (1 - b1**t)  if correct_bias else lr
    p     <- p - alpha * m / (sqrt(v) + eps)

The decay is applied first, to the parameter value before the Adam update, the same order as
`torch.optim.AdamW` (which multiplies p by 1 - lr * weight_decay, then takes the Adam step).
With eps = 0 both optimizers compute the same update; for eps > 0 they differ only in where eps
sits (torch adds it to sqrt(v_hat), the handout to sqrt(v)).

The default path updates every parameter of a group with a few `torch._foreach_*` kernels per
(device, dtype, step) bucket; `foreach=False` runs the same operations one tensor at a time and
gives bit-identical results. The step count is a Python int in each parameter's state, so no
step needs a host-device sync.
"""

import math
from collections import defaultdict
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch.optim import Optimizer


class AdamW(Optimizer):
    """Adam with decoupled weight decay (see the module docstring for the exact update).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (>= 0).
        betas: decay rates (b1, b2) of the first and second moment estimates, each in [0, 1).
        eps: added to sqrt(v) in the denominator (>= 0).
        weight_decay: decoupled weight decay coefficient (>= 0); p <- p * (1 - lr * weight_decay).
        correct_bias: fold Adam's bias corrections into the step size (False: alpha = lr).
        foreach: use the vectorised `torch._foreach_*` path. None picks it when all the
            group's parameters are on one device type; False loops over parameters.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        foreach: Optional[bool] = None,
    ):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("correct_bias", True)
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Take one optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "AdamW does not support sparse gradients; use torch.optim.SparseAdam"
                    )
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue

            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in params}) == 1
            update = _foreach_update if foreach else _single_tensor_update
            update(params, grads, exp_avgs, exp_avg_sqs, steps, group)

        return loss


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (each must be in [0, 1))")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")


def _step_size(group: dict, step: int) -> float:
    """alpha_t = lr * sqrt(1 - b2^t) / (1 - b1^t) with bias correction, else lr."""
    lr = group["lr"]
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _single_tensor_update(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    beta1, beta2 = group["betas"]
    decay = 1.0 - group["lr"] * group["weight_decay"]
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if decay != 1.0:
            p.mul_(decay)
        m.lerp_(g, 1.0 - beta1)  # m = b1 * m + (1 - b1) * g
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = v.sqrt().add_(group["eps"])
        p.addcdiv_(m, denom, value=-_step_size(group, step))


def _foreach_update(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    # foreach kernels need one device and dtype per call; the step size is a scalar per call,
    # so parameters that skipped steps (grad None) land in their own bucket.
    buckets = defaultdict(lambda: ([], [], [], []))
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        bucket = buckets[(p.device, p.dtype, step)]
        for lst, t in zip(bucket, (p, g, m, v)):
            lst.append(t)

    beta1, beta2 = group["betas"]
    decay = 1.0 - group["lr"] * group["weight_decay"]
    for (_, _, step), (ps, gs, ms, vs) in buckets.items():
        if decay != 1.0:
            torch._foreach_mul_(ps, decay)
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(ps, ms, denoms, value=-_step_size(group, step))
