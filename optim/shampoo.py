"""Shampoo: Kronecker-factored preconditioning L^{-1/4} G R^{-1/4}, grafted onto Adam's step size.

Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018,
Algorithm 1 (the matrix case). Grafting (the direction from Shampoo, the per-tensor step norm from
another optimizer) is from Agarwal, Anil, Hazan, Koren, Zhang, "Disentangling Adaptive Gradient
Methods from Learning Rates", arXiv:2002.11803, 2020, as used by Anil et al., "Scalable Second
Order Optimization for Deep Learning", arXiv:2002.09018, 2020, and Meta's Distributed Shampoo.
Here the grafting is onto Adam (grafting="adam", the default: the step norm is that of our AdamW's
step) or none (grafting="none": the paper's raw step, used by the tests against `pytorch-optimizer`'s
Shampoo). SGD grafting is not offered (see docs/optimizers.md).

For a preconditioned weight W (m, n) with gradient G at the tensor's step t = 1, 2, ...:

    W  <- W - lr * weight_decay * W                    # decoupled, on the pre-update W (as our AdamW)
    M  <- b1 * M + (1 - b1) * G                        # momentum (M = G when b1 = 0, the paper)
    V  <- b2 * V + (1 - b2) * G * G                    # Adam's second moment (grafting="adam" only)
    L  <- bs * L + (1 - bs) G G^T,  R <- bs * R + (1 - bs) G^T G
                                                       # bs = 1: L <- L + G G^T (the paper's sum)
    if (t - 1) % precondition_frequency == 0:          # t = 1, 1 + f, 1 + 2f, ...: refresh the roots
        L^-1/4 = (L + matrix_eps I)^{-1/4},  R^-1/4 = (R + matrix_eps I)^{-1/4}   (by eigh, in >= fp32)
    S  =  L^-1/4 M R^-1/4                              # Shampoo's direction
    grafting="adam": A = alpha_t * M / (sqrt(V) + eps),  alpha_t = lr * sqrt(1 - b2**t) / (1 - b1**t)
                     W <- W - S * ||A||_F / ||S||_F     # AdamW's step length, Shampoo's direction
    grafting="none": W <- W - lr * S / (1 - b1**t)      # (lr * S without correct_bias)

bs = shampoo_beta (betas[1] when None). The paper's L_0 = eps I with summed factors equals
shampoo_beta=1 here with matrix_eps = eps. Which tensors are preconditioned, and the exact AdamW step
the others take, is optim/common.py's rule. State (per tensor, in the parameter's dtype, so a
state_dict round trip is bit-exact): step, exp_avg (m, n), exp_avg_sq (m, n; grafting="adam"),
GG = [L (m, m), R (n, n)], roots = [L^-1/4 (m, m), R^-1/4 (n, n)].
"""

from typing import Callable, Iterable, Optional, Tuple

import torch
from torch.optim import Optimizer

from optimizer import _step_size
from optim.common import adam_fallback_step, buckets, check_group, linalg_dtype, shampoo_beta, sort_params

GRAFTINGS = ("adam", "none")


class Shampoo(Optimizer):
    """Shampoo with Adam grafting (see the module docstring for the exact update).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (>= 0); with grafting="adam" it is AdamW's learning rate.
        betas: (b1, b2): momentum and Adam's second-moment decay (grafting and fallback), in [0, 1).
        eps: Adam's epsilon, added to sqrt(V) (>= 0).
        weight_decay: decoupled weight decay; W <- W * (1 - lr * weight_decay) before the step.
        shampoo_beta: decay of the factors L, R in [0, 1]; 1 sums them (the paper); None: betas[1].
        matrix_eps: added to the factors' eigenvalues before the inverse fourth root (> 0).
        precondition_frequency: steps between inverse-root refreshes (integer >= 1).
        max_precond_dim: a 2-D tensor with a dimension above this falls back to AdamW (>= 1).
        precondition: False makes every tensor of the group take AdamW steps (e.g. embeddings).
        grafting: "adam" (step norm of AdamW's step) or "none" (the paper's step, lr * S).
        correct_bias: Adam's bias corrections (grafting="adam") or M's (grafting="none").
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        shampoo_beta: Optional[float] = None,
        matrix_eps: float = 1e-6,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        precondition: bool = True,
        grafting: str = "adam",
        correct_bias: bool = True,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, shampoo_beta=shampoo_beta,
                        matrix_eps=matrix_eps, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim, precondition=precondition, grafting=grafting,
                        correct_bias=correct_bias)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check(group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Take one optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check(group)
            keys = ("step", "exp_avg", "GG", "roots") + (("exp_avg_sq",) if group["grafting"] == "adam" else ())
            fallback, new, preconditioned = sort_params(self, group, keys)
            adam_fallback_step(self, fallback, group)
            for p in new:
                self._init_state(p, group)
            for p in new + preconditioned:
                self.state[p]["step"] += 1
            for (_, _, step), ps in buckets(new + preconditioned, self.state).items():
                self._shampoo_step(ps, step, group)
        return loss

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        m, n = p.shape
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)  # (m, n)
        if group["grafting"] == "adam":
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)  # (m, n)
        state["GG"] = [p.new_zeros(m, m), p.new_zeros(n, n)]  # L, R
        state["roots"] = [p.new_zeros(m, m), p.new_zeros(n, n)]  # L^-1/4, R^-1/4, set at step 1

    def _shampoo_step(self, ps: list, step: int, group: dict) -> None:
        states = [self.state[p] for p in ps]
        grads = [p.grad for p in ps]
        ms = [s["exp_avg"] for s in states]
        beta1, beta2 = group["betas"]
        decay = 1.0 - group["lr"] * group["weight_decay"]
        if decay != 1.0:
            torch._foreach_mul_(ps, decay)
        torch._foreach_lerp_(ms, grads, 1.0 - beta1)

        factors = [f for s in states for f in s["GG"]]
        outers = [o for g in grads for o in (g @ g.mT, g.mT @ g)]  # (m, m), (n, n)
        beta = shampoo_beta(group)
        if beta == 1.0:
            torch._foreach_add_(factors, outers)
        else:
            torch._foreach_lerp_(factors, outers, 1.0 - beta)
        if (step - 1) % group["precondition_frequency"] == 0:
            for s in states:
                for factor, root in zip(s["GG"], s["roots"]):
                    root.copy_(_inverse_fourth_root(factor, group["matrix_eps"]))

        directions = [s["roots"][0] @ m @ s["roots"][1] for m, s in zip(ms, states)]  # S: (m, n)
        if group["grafting"] == "none":
            alpha = group["lr"]
            if group["correct_bias"]:
                alpha /= 1.0 - beta1**step
            torch._foreach_add_(ps, directions, alpha=-alpha)
            return

        vs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_add_(denoms, group["eps"])
        adam_steps = torch._foreach_div(ms, denoms)  # AdamW's direction, before alpha_t
        adam_norms = torch._foreach_norm(adam_steps)
        shampoo_norms = torch._foreach_norm(directions)
        alpha = _step_size(group, step)
        for d, a, s in zip(directions, adam_norms, shampoo_norms):
            d.mul_(a / s.clamp_min(torch.finfo(s.dtype).tiny))  # ||S|| = 0 only when M = 0
        torch._foreach_add_(ps, directions, alpha=-alpha)


def _check(group: dict) -> None:
    check_group(group, "Shampoo", sum_allowed=True)
    if group["grafting"] not in GRAFTINGS:
        raise ValueError(f"Shampoo: grafting must be one of {GRAFTINGS}, got {group['grafting']!r}")
    if not group["matrix_eps"] > 0.0:
        raise ValueError(f"Shampoo: matrix_eps must be > 0, got {group['matrix_eps']!r}")


def _inverse_fourth_root(factor: torch.Tensor, eps: float) -> torch.Tensor:
    """(F + eps I)^{-1/4} of a symmetric PSD factor by eigh (tiny negative eigenvalues clamped to 0):
    (d, d) -> (d, d)."""
    values, vectors = torch.linalg.eigh(factor.to(linalg_dtype(factor)))
    scales = values.clamp_min(0.0).add_(eps).pow_(-0.25)
    return ((vectors * scales) @ vectors.mT).to(factor.dtype)
