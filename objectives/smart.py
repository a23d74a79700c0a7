"""SMART (Jiang et al., 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
Models through Principled Regularized Optimization") for the classifier and the paraphrase detector.

    loss     = L_task(f(x; theta), y) + lambda_s R_s(theta) + mu D_Breg(theta, theta~)
    R_s      = max_{||x~ - x||_inf <= eps} l_s(f(x~; theta), f(x; theta))     smoothness-inducing adversarial
    D_Breg   = l_s(f(x; theta), f(x; theta~))                                  momentum Bregman proximal point
    theta~  <- beta theta~ + (1 - beta) theta   after every optimiser step     (the EMA copy)
    l_s(P, Q) = KL(P || Q) + KL(Q || P) = sum_c (p_c - q_c)(log p_c - log q_c)   over the predicted classes

x are the INPUT (word) embeddings, perturbed through a forward hook on the backbone's `word_embedding`
(the model code is untouched; padding positions stay unperturbed).  The maximisation is the paper's
Algorithm 1: x~ = x + N(0, sigma^2) (projected into the ball), then `smart_steps` steps of projected
gradient ascent x~ <- Proj_eps(x~ + eta g / ||g||_inf) with g the gradient of l_s(f(x~), f(x)) (the
clean prediction fixed) and the infinity norm taken per example.  The regulariser is then l_s between
the perturbed and the clean prediction, with gradients through both (the paper's g_theta).

Every pass of one step (clean, ascent, perturbed, the EMA copy's) runs with the SAME dropout masks:
the random state is captured before the clean pass and replayed for the others.  So R_s measures the
perturbation alone (eps = 0 gives exactly 0, also in training mode) and D_Breg the parameter distance
alone (0 at the first step, when the EMA copy equals the model).

The EMA copy (`Smart`, a trainer callback) is made when the fit starts, after LoRA / freezing, and
only its trainable tensors are saved inside last.pt (the frozen ones equal the model's), so --resume
continues it exactly.  `smart_loss` and `bregman_loss` are logged to metrics.jsonl.  Under torchrun
both terms run with DistributedDataParallel (each rank perturbs its own examples; the EMA copy follows
the synchronised weights); FSDP is refused (`refuse_fsdp`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from training.efficient import _backbone, frozen_copy
from training.task import Callback

LogitsFn = Callable[[nn.Module, dict], torch.Tensor]  # (model, batch on the device) -> (B, C) class logits


@dataclass
class SmartConfig:
    smart_lambda: float = 0.0  # lambda_s, weight of the adversarial regulariser (0: off)
    smart_eps: float = 1e-5  # eps, infinity-norm radius of the embedding perturbation
    smart_steps: int = 1  # T, projected gradient-ascent steps (0: the random start only)
    smart_step_size: float = 1e-3  # eta, ascent step on the normalised gradient
    smart_noise: float = 1e-5  # sigma, standard deviation of the random start
    bregman_mu: float = 0.0  # mu, weight of the Bregman proximal point term (0: off)
    bregman_beta: float = 0.99  # beta, momentum of the EMA copy

    @property
    def enabled(self) -> bool:
        return self.smart_lambda > 0 or self.bregman_mu > 0

    def validate(self) -> "SmartConfig":
        from training.config import check_number, check_unused

        check_unused(self, ("smart_eps", "smart_steps", "smart_step_size", "smart_noise"), self.smart_lambda > 0,
                     "unless smart_lambda > 0")
        check_unused(self, ("bregman_beta",), self.bregman_mu > 0, "unless bregman_mu > 0")

        for name in ("smart_lambda", "bregman_mu", "smart_eps", "smart_noise", "smart_step_size"):
            check_number(name, getattr(self, name), low=0.0)
        check_number("smart_steps", self.smart_steps, low=0, integer=True)
        check_number("bregman_beta", self.bregman_beta, low=0.0, high=1.0, high_open=True)
        return self


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """(B,) KL(P || Q) + KL(Q || P) of the class distributions softmax(p_logits), softmax(q_logits), (B, C)."""
    log_p, log_q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


class RandomState:
    """The random state at one moment (CPU and the batch's CUDA device), replayed on demand: passes run
    under `replay()` draw the same dropout masks as the pass that followed the capture."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # the caller's random stream continues unchanged
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@contextlib.contextmanager
def perturbed_embeddings(model: nn.Module, delta: torch.Tensor):
    """Within the block, the backbone's word embeddings come out as embedding(ids) + delta (B, T, D)."""
    embedding = _backbone(model).word_embedding

    def add(module, inputs, output):
        if output.shape != delta.shape:
            raise ValueError(f"SMART perturbation of shape {tuple(delta.shape)} for embeddings {tuple(output.shape)}")
        return output + delta.to(output.dtype)

    handle = embedding.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


class Smart(Callback):
    """The SMART terms of a task loss and the EMA copy they need (see the module docstring)."""

    def __init__(self, cfg: SmartConfig, logits_fn: LogitsFn):
        self.cfg, self.logits_fn = cfg.validate(), logits_fn
        self.ema: Optional[nn.Module] = None
        self._pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, EMA tensor, model tensor)
        self._saved: Optional[dict] = None

    # ---- the loss terms -----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(clean logits (B, C) for the task loss, lambda_s R_s + mu D_Breg, logs of both terms)."""
        state = RandomState(batch["input_ids"].device)
        logits = self.logits_fn(model, batch)
        penalty, logs = logits.new_zeros((), dtype=torch.float32), {}
        if self.cfg.smart_lambda > 0:
            adversarial = self.adversarial_loss(model, batch, logits, state)
            penalty = penalty + self.cfg.smart_lambda * adversarial
            logs["smart_loss"] = adversarial.detach()
        if self.cfg.bregman_mu > 0:
            bregman = self.bregman_loss(model, batch, logits, state)
            penalty = penalty + self.cfg.bregman_mu * bregman
            logs["bregman_loss"] = bregman.detach()
        return logits, penalty, logs

    def adversarial_loss(self, model: nn.Module, batch: dict, logits: torch.Tensor,
                         state: RandomState) -> torch.Tensor:
        """R_s: l_s(f(x~), f(x)) at the perturbation found by projected gradient ascent (mean over the batch)."""
        cfg, ids = self.cfg, batch["input_ids"]
        real = batch["attention_mask"][..., None].float()  # (B, T, 1): padding is not perturbed
        hidden = _backbone(model).config.hidden_size
        delta = torch.randn(*ids.shape, hidden, device=ids.device) * cfg.smart_noise  # (B, T, D)
        delta = delta.clamp(-cfg.smart_eps, cfg.smart_eps) * real
        target = logits.detach()
        for _ in range(cfg.smart_steps):
            delta.requires_grad_(True)
            with state.replay(), perturbed_embeddings(model, delta):
                divergence = symmetric_kl(self.logits_fn(model, batch), target).sum()
            (grad,) = torch.autograd.grad(divergence, delta)  # (B, T, D); parameters' .grad untouched
            scale = grad.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)  # per-example infinity norm
            delta = (delta.detach() + cfg.smart_step_size * grad / scale).clamp(-cfg.smart_eps, cfg.smart_eps) * real
        with state.replay(), perturbed_embeddings(model, delta.detach()):
            perturbed = self.logits_fn(model, batch)
        return symmetric_kl(perturbed, logits).mean()

    def bregman_loss(self, model: nn.Module, batch: dict, logits: torch.Tensor, state: RandomState) -> torch.Tensor:
        """D_Breg: l_s(f(x; theta), f(x; theta~)) against the EMA copy (no gradient into the copy)."""
        if self.ema is None:
            raise RuntimeError("the EMA copy of bregman_mu is made when the fit starts")
        self.ema.train(model.training)  # the same dropout masks as the clean pass (replayed)
        with torch.no_grad(), state.replay():
            ema_logits = self.logits_fn(self.ema, batch)
        return symmetric_kl(logits, ema_logits).mean()

    # ---- the EMA copy (Callback) ---------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        from training import distributed as dist

        refuse_fsdp(self.cfg, dist.is_fsdp(trainer.engine))
        if self.cfg.bregman_mu <= 0:
            return
        self.ema = frozen_copy(trainer.model)
        ema = dict(self.ema.named_parameters())
        self._pairs = [(name, ema[name], p) for name, p in trainer.model.named_parameters() if p.requires_grad]
        if self._saved is not None:  # --resume: the EMA of the interrupted run
            if set(self._saved) != {name for name, _, _ in self._pairs}:
                raise ValueError("the checkpoint's EMA copy does not match the model's trainable parameters")
            with torch.no_grad():
                for name, e, _ in self._pairs:
                    e.copy_(self._saved[name])
            self._saved = None

    @torch.no_grad()
    def on_step_end(self, trainer, step: int) -> None:
        beta = self.cfg.bregman_beta
        for _, e, p in self._pairs:
            e.mul_(beta).add_(p.detach(), alpha=1.0 - beta)

    def state_dict(self) -> dict:
        return {"ema": {name: e.detach().cpu().clone() for name, e, _ in self._pairs}} if self._pairs else {}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state.get("ema") if state else None


def refuse_fsdp(cfg: SmartConfig, fsdp: bool) -> None:
    """ConfigError when a SMART term is on under FSDP: the Bregman term's EMA copy is a whole unsharded
    model, and the ascent's autograd.grad to the embeddings runs FSDP's backward hooks, which reshard
    the parameters in the middle of the step (DistributedDataParallel runs both terms)."""
    if fsdp and cfg.smart_lambda > 0:
        raise ConfigError("smart_lambda", "the adversarial ascent's gradient pass reshards FSDP's parameters "
                          "mid-step; train with DistributedDataParallel (drop fsdp) or without SMART")
    if fsdp and cfg.bregman_mu > 0:
        raise ConfigError("bregman_mu", "keeps an EMA copy of the whole model, which FSDP does not shard; "
                          "train with DistributedDataParallel (drop fsdp) or without the Bregman term")


def smart_objective(cfg: SmartConfig, logits_fn: LogitsFn) -> Optional[Smart]:
    """A `Smart` callback when `cfg` turns a term on, else None (the task's loss stays as it was)."""
    return Smart(cfg, logits_fn) if cfg.validate().enabled else None
