"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner.

Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson, Kakade, "SOAP: Improving and Stabilizing
Shampoo using Adam", arXiv:2409.11321, 2024 (ICLR 2025): Algorithm 3 (the update) and Algorithm 4
(the eigenbasis refresh by one power-iteration step and a QR decomposition), with the details of the
authors' implementation (github.com/nikhilvyas/SOAP), which `pytorch-optimizer`'s SOAP ports and
tests/test_second_order_optimizers.py matches.

For a preconditioned weight W (m, n) with gradient G at the tensor's step t (lr = learning rate):

    first step only:  L = (1 - bs) G G^T,  R = (1 - bs) G^T G,  Q_L, Q_R = eigenvectors of L, R
                      (eigenvalues descending); W does not move (the authors' choice: Adam's
                      moments start in a basis that has seen a gradient)
    every later step, t = 1, 2, ...:
      W     <- W - lr * weight_decay * W               # decoupled, on the pre-update W (as our AdamW)
      G'    =  Q_L^T G Q_R                             # the gradient in the eigenbasis
      M     <- b1 * M + (1 - b1) * G                   # first moment, kept in the original basis
      V     <- b2 * V + (1 - b2) * G' * G'             # second moment, in the eigenbasis
      N     =  Q_L (Q_L^T M Q_R / (sqrt(V) + eps)) Q_R^T
      W     <- W - alpha_t * N,   alpha_t = lr * sqrt(1 - b2**t) / (1 - b1**t)   (lr if not correct_bias)
      L     <- bs * L + (1 - bs) G G^T,   R <- bs * R + (1 - bs) G^T G
      if t % precondition_frequency == 0:   (Algorithm 4, for Q in (Q_L, Q_R) with its factor F)
          P = F Q;  order = argsort(diag(Q^T P), descending);  V's matching axis <- V[order]
          Q <- the Q of QR(P[:, order])

bs = shampoo_beta (betas[1] when None). Which tensors are preconditioned, and the exact AdamW step
that all others take, is optim/common.py's rule. The one documented difference from the authors'
code: there weight decay multiplies W after the Adam step, here before it (optimizer.AdamW's and
torch.optim.AdamW's order), so a fallback tensor's step is AdamW's; the test checks the per-step
updates are otherwise equal. State (per tensor, in the parameter's dtype, so a state_dict round trip
is bit-exact): step, exp_avg (m, n), exp_avg_sq (m, n), GG = [L (m, m), R (n, n)], Q = [Q_L, Q_R].
"""

from typing import Callable, Iterable, Optional, Tuple

import torch
from torch.optim import Optimizer

from optimizer import _step_size
from optim.common import adam_fallback_step, buckets, check_group, linalg_dtype, shampoo_beta, sort_params

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "GG", "Q")


class SOAP(Optimizer):
    """Adam in Shampoo's eigenbasis (see the module docstring for the exact update).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (>= 0).
        betas: (b1, b2) of Adam's first and second moments, each in [0, 1).
        eps: added to sqrt(V) in the denominator (>= 0).
        weight_decay: decoupled weight decay; W <- W * (1 - lr * weight_decay) before the step.
        shampoo_beta: decay of the Kronecker factors L, R in [0, 1); None uses betas[1].
        precondition_frequency: steps between eigenbasis refreshes (integer >= 1).
        max_precond_dim: a 2-D tensor with a dimension above this falls back to AdamW (>= 1).
        precondition: False makes every tensor of the group take AdamW steps (e.g. embeddings).
        correct_bias: fold Adam's bias corrections into the step size (False: alpha = lr).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        betas: Tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        shampoo_beta: Optional[float] = None,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        precondition: bool = True,
        correct_bias: bool = True,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, shampoo_beta=shampoo_beta,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        precondition=precondition, correct_bias=correct_bias)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_group(group, "SOAP", sum_allowed=False)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Take one optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_group(group, "SOAP", sum_allowed=False)
            fallback, new, preconditioned = sort_params(self, group, STATE_KEYS)
            adam_fallback_step(self, fallback, group)
            for p in new:
                self._init_preconditioner(p, group)
            for p in preconditioned:
                self.state[p]["step"] += 1
            for (_, _, step), ps in buckets(preconditioned, self.state).items():
                self._rotated_adam_step(ps, step, group)
        return loss

    def _init_preconditioner(self, p: torch.Tensor, group: dict) -> None:
        m, n = p.shape
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)  # (m, n)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)  # (m, n)
        state["GG"] = [p.new_zeros(m, m), p.new_zeros(n, n)]  # L (m, m), R (n, n)
        _accumulate_factors([state["GG"]], [p.grad], shampoo_beta(group))
        state["Q"] = [_eigenbasis(f) for f in state["GG"]]

    def _rotated_adam_step(self, ps: list, step: int, group: dict) -> None:
        states = [self.state[p] for p in ps]
        grads = [p.grad for p in ps]
        ms = [s["exp_avg"] for s in states]
        vs = [s["exp_avg_sq"] for s in states]
        beta1, beta2 = group["betas"]
        decay = 1.0 - group["lr"] * group["weight_decay"]
        if decay != 1.0:
            torch._foreach_mul_(ps, decay)
        grads_rot = [_rotate(g, s["Q"]) for g, s in zip(grads, states)]  # (m, n) in the eigenbasis
        torch._foreach_lerp_(ms, grads, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads_rot, grads_rot, value=1.0 - beta2)
        ms_rot = [_rotate(m, s["Q"]) for m, s in zip(ms, states)]
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_div_(ms_rot, denoms)
        updates = [_rotate_back(u, s["Q"]) for u, s in zip(ms_rot, states)]  # back to (m, n) of W
        torch._foreach_add_(ps, updates, alpha=-_step_size(group, step))

        _accumulate_factors([s["GG"] for s in states], grads, shampoo_beta(group))
        if step % group["precondition_frequency"] == 0:
            for s in states:
                _refresh_eigenbasis(s)


def _rotate(x: torch.Tensor, q: list) -> torch.Tensor:
    """Q_L^T X Q_R: (m, n) -> (m, n) coordinates in the eigenbasis."""
    return q[0].mT @ x @ q[1]


def _rotate_back(x: torch.Tensor, q: list) -> torch.Tensor:
    """Q_L X Q_R^T: eigenbasis coordinates (m, n) -> the parameter's basis (m, n)."""
    return q[0] @ x @ q[1].mT


def _accumulate_factors(factors: list, grads: list, beta: float) -> None:
    """L <- beta L + (1 - beta) G G^T and R <- beta R + (1 - beta) G^T G for every tensor, one foreach."""
    flat = [f for pair in factors for f in pair]
    outers = [o for g in grads for o in (g @ g.mT, g.mT @ g)]  # (m, m), (n, n)
    torch._foreach_lerp_(flat, outers, 1.0 - beta)


def _eigenbasis(factor: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric factor as columns, eigenvalues descending: (d, d) -> (d, d).
    (The order is the authors' convention; it does not change the update, since Adam treats every
    coordinate alike and V is permuted with Q at each refresh.)"""
    _, vectors = torch.linalg.eigh(factor.to(linalg_dtype(factor)))
    return vectors.flip(1).to(factor.dtype)


def _refresh_eigenbasis(state: dict) -> None:
    """Algorithm 4: one power-iteration step from the current basis, re-sorted, orthonormalised by QR;
    the second moment's axes are permuted with the basis so each entry keeps its eigenvector."""
    v = state["exp_avg_sq"]  # (m, n)
    for axis, (factor, q) in enumerate(zip(state["GG"], state["Q"])):
        power = factor @ q  # (d, d)
        estimated = (q * power).sum(dim=0)  # diag(Q^T F Q): the eigenvalue estimates
        order = torch.argsort(estimated, descending=True)
        v = v.index_select(axis, order)
        q_new, _ = torch.linalg.qr(power.index_select(1, order).to(linalg_dtype(power)))
        q.copy_(q_new)
    state["exp_avg_sq"].copy_(v)
