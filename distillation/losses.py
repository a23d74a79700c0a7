"""Distillation losses: soft-label KL, hidden-state MSE, and a layer-wise Wasserstein-1 estimate.

* KL on temperature-softened logits (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a
  Neural Network"): T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over real (non-pad)
  positions.  The T^2 factor keeps the gradient scale independent of T.
* MSE between the student's hidden states, mapped to the teacher's width by a learned linear
  projection when the widths differ, and the teacher's hidden states at the mapped layers
  (student layer i <- teacher layer j, evenly spaced by default; as in TinyBERT, Jiao et al., 2020).
* A Wasserstein-1 estimate per mapped layer through a critic network D (Arjovsky et al., 2017),
  trained adversarially with the gradient penalty of WGAN-GP (Gulrajani et al., 2017):
      critic loss  = E[D(x_fake)] - E[D(x_real)] + lambda * E[(||grad_x D(x_hat)||_2 - 1)^2],
      x_hat = eps * x_real + (1 - eps) * x_fake,  eps ~ U[0, 1] per sample.
  Real samples are the teacher's per-token hidden vectors, fake ones the student's (projected);
  the student minimises the estimate W = E[D(x_real)] - E[D(x_fake)].

Every loss takes tensors; which model produced them is `distillation/models.py`'s business.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of `values` (B, T) over positions where `mask` (B, T) is 1 (all positions if None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), logits (B, T, V) or (B, V); mask (B, T) or (B,)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (same tokenizer/vocabulary needed)")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T) or (B,)
    return _masked_mean(kl, mask) * temperature ** 2


def evenly_spaced_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (0-based) matched with each student layer: student layer i (1-based) reads
    teacher layer floor(i * L_t / L_s), so the last student layer meets the last teacher layer.
    E.g. 2 student layers, 12 teacher layers -> [5, 11]."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"the student needs 1..{teacher_layers} layers (the teacher's count), got {student_layers}")
    return [(i * teacher_layers) // student_layers - 1 for i in range(1, student_layers + 1)]


def parse_layer_map(text: str, student_layers: int, teacher_layers: int) -> list[int]:
    """`--layer_map` value: comma-separated 0-based teacher layers, one per student layer, or
    'even' for `evenly_spaced_layer_map`."""
    if text == "even":
        return evenly_spaced_layer_map(student_layers, teacher_layers)
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--layer_map {text!r}: expected 'even' or comma-separated integers") from None
    if len(layers) != student_layers or not all(0 <= j < teacher_layers for j in layers):
        raise ValueError(f"--layer_map {text!r}: need {student_layers} teacher layers (one per student layer), "
                         f"each in 0..{teacher_layers - 1}")
    return layers


class HiddenStateAligner(nn.Module):
    """Maps the student's per-layer hidden states onto the teacher's: picks the student layers,
    projects each to the teacher's width (a learned Linear per layer when widths differ, identity
    otherwise), and picks the matching teacher layers by `layer_map`."""

    def __init__(self, student_dim: int, teacher_dim: int, layer_map: Sequence[int]):
        super().__init__()
        self.layer_map = list(layer_map)
        self.projections = nn.ModuleList(
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)
            for _ in self.layer_map)

    def forward(self, student_hiddens: Sequence[torch.Tensor], teacher_hiddens: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Lists of per-layer (B, T, D_s) and (B, T, D_t) -> (projected student, teacher) pairs."""
        if len(student_hiddens) != len(self.layer_map):
            raise ValueError(f"{len(student_hiddens)} student layers, layer map has {len(self.layer_map)}")
        fake = [proj(h) for proj, h in zip(self.projections, student_hiddens)]  # each (B, T, D_t)
        real = [teacher_hiddens[j] for j in self.layer_map]
        return fake, real


def hidden_mse_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over layers of the per-token squared error (mean over features), averaged over real tokens."""
    losses = [_masked_mean((s.float() - t.float()).pow(2).mean(-1), mask) for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def masked_tokens(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, T, D) -> (N, D): the hidden vectors of real tokens."""
    if mask is None:
        return hidden.reshape(-1, hidden.size(-1))
    return hidden[mask.bool()]


class Critic(nn.Module):
    """A small MLP critic D: R^D -> R (no normalisation layers: WGAN-GP penalises per-sample gradients)."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (N,)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad D(x_hat)||_2 - 1)^2], x_hat = eps*real + (1-eps)*fake, eps ~ U[0,1]
    drawn once per sample (row) of `real`/`fake` (N, D).  Differentiable w.r.t. the critic."""
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} samples differ in shape")
    eps = torch.rand(real.size(0), 1, device=real.device, dtype=real.dtype, generator=generator)  # (N, 1)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)  # (N, D)
    return (grad.norm(2, dim=1) - 1).pow(2).mean()


class LayerwiseWasserstein(nn.Module):
    """One critic per mapped layer; `critic_loss` trains them, `estimate` is the student's loss."""

    def __init__(self, dim: int, num_layers: int, hidden: int = 128, gp_weight: float = 10.0):
        super().__init__()
        self.critics = nn.ModuleList(Critic(dim, hidden) for _ in range(num_layers))
        self.gp_weight = gp_weight

    def critic_loss(self, real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor],
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sum over layers of E[D(fake)] - E[D(real)] + gp_weight * GP; inputs are (N, D) token
        samples, detached here so that only the critics receive gradients."""
        total = 0.0
        for critic, r, f in zip(self.critics, real, fake):
            r, f = r.detach().float(), f.detach().float()
            total = total + critic(f).mean() - critic(r).mean() + self.gp_weight * gradient_penalty(critic, r, f, generator)
        return total

    def estimate(self, real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over layers of W = E[D(real)] - E[D(fake)], differentiable w.r.t. `fake` only (the
        critics' parameters are not part of the graph, so the student's backward leaves them alone)."""
        flags = [p.requires_grad for p in self.parameters()]
        self.requires_grad_(False)
        try:
            values = [critic(r.detach().float()).mean() - critic(f.float()).mean()
                      for critic, r, f in zip(self.critics, real, fake)]
        finally:
            for p, flag in zip(self.parameters(), flags):
                p.requires_grad_(flag)
        return torch.stack(values).mean()
