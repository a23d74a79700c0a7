"""Teacher and student for distillation: freezing, per-layer hidden states, layer-copy initialisation,
and `Distiller`, the combined loss plugged into the shared trainer's `TrainTask.loss`.

The trainer optimises the parameters of the module it is given: here a `StudentWithAligner` (the
student GPT-2 plus the width projections).  The teacher and the Wasserstein critics are kept OUT of
that module tree: the teacher is frozen (eval mode, requires_grad False, forward under no_grad),
and the critics have their own optimizer (our AdamW).  `Distiller` is a trainer `Callback`
(training/task.py): its loss stashes the detached hidden-state samples of the micro-batch, and
`on_micro_batch_end` (after the student's backward) updates the critics `n_critic` times on them,
the alternation of WGAN training; `state_dict()` holds the critics, their optimizer and random
generator, which the trainer saves inside the run's last.pt, so `--resume` continues them exactly.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from training.efficient import as_frozen
from training.task import Callback
from distillation.losses import HiddenStateAligner, LayerwiseWasserstein, hidden_mse_loss, kd_kl_loss, masked_tokens


@contextlib.contextmanager
def capture_layer_outputs(model: nn.Module):
    """Within the block, every forward of `model` (a GPT2Model or GPT2LMHeadModel) appends the output
    of each transformer layer (B, T, D), in order, to the yielded list (before the final LayerNorm)."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out))
               for layer in model.backbone.gpt_layers]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def forward_with_hiddens(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final hidden states (B, T, D) after the last LayerNorm, [output of each layer (B, T, D)])."""
    with capture_layer_outputs(model) as layers:
        final = model.backbone.encode(input_ids, attention_mask)
    return final, list(layers)


def every_kth_layers(teacher_layers: int, k: int) -> list[int]:
    """0-based teacher layers k-1, 2k-1, ...: the layers a student initialised 'every k-th' copies."""
    if not 1 <= k <= teacher_layers:
        raise ValueError(f"--init_every_k must be in 1..{teacher_layers} (the teacher's layers), got {k}")
    return list(range(k - 1, teacher_layers, k))


@torch.no_grad()
def init_student_from_teacher(student: nn.Module, teacher: nn.Module, layers: Sequence[int]) -> None:
    """Copy the teacher's token and position embeddings (the LM head is tied to the former), final
    LayerNorm and transformer layers `layers` (0-based, one per student layer) into the student.
    The widths (hidden, intermediate, heads) must match; the student may have fewer positions."""
    s, t = student.backbone, teacher.backbone
    sc, tc = s.config, t.config
    mismatched = [f"{f}: student {getattr(sc, f)}, teacher {getattr(tc, f)}"
                  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")
                  if getattr(sc, f) != getattr(tc, f)]
    if mismatched:
        raise ValueError("cannot initialise the student from teacher layers, the shapes differ ("
                         + "; ".join(mismatched) + "); give the student the teacher's width or drop --init_every_k")
    if len(layers) != sc.num_hidden_layers:
        raise ValueError(f"the student has {sc.num_hidden_layers} layers but {len(layers)} teacher layers "
                         f"{list(layers)} were selected; set the student's layer count to {len(layers)}")
    if sc.max_position_embeddings > tc.max_position_embeddings:
        raise ValueError(f"the student has {sc.max_position_embeddings} positions, the teacher only "
                         f"{tc.max_position_embeddings}")
    s.word_embedding.weight.copy_(t.word_embedding.weight)
    s.pos_embedding.weight.copy_(t.pos_embedding.weight[: sc.max_position_embeddings])
    s.final_layer_norm.load_state_dict(t.final_layer_norm.state_dict())
    for i, j in enumerate(layers):
        s.gpt_layers[i].load_state_dict(t.gpt_layers[j].state_dict())


def student_config(teacher_config, layers: Optional[int] = None, hidden: Optional[int] = None,
                   heads: Optional[int] = None, init_every_k: Optional[int] = None):
    """The architecture of a student made from the teacher's: `layers` (default: one per copied
    teacher layer with `init_every_k`, else half the teacher's), `hidden` width and `heads`
    (default: the teacher's); a ConfigError names the field that does not fit."""
    from common.errors import ConfigError
    from config import GPT2Config

    cfg = teacher_config
    hidden = hidden or cfg.hidden_size
    if layers is None:
        layers = len(every_kth_layers(cfg.num_hidden_layers, init_every_k)) if init_every_k \
            else max(1, cfg.num_hidden_layers // 2)
    overrides = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads or cfg.num_attention_heads,
                     intermediate_size=4 * hidden if hidden != cfg.hidden_size else cfg.intermediate_size)
    try:
        return GPT2Config(**{**cfg.to_dict(), **overrides, "name": "student"})
    except ValueError as exc:
        raise ConfigError("student_hidden" if "hidden_size" in str(exc) else "student_layers", str(exc)) from None


class StudentWithAligner(nn.Module):
    """What the trainer optimises: the student and the projections of its hidden states.
    `forward` is the student's (logits), so evaluation code can treat it as the student."""

    def __init__(self, student: nn.Module, aligner: HiddenStateAligner):
        super().__init__()
        self.student = student
        self.aligner = aligner

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)


class Distiller(Callback):
    """The weighted distillation loss of one batch:

        hard_weight * task loss + kl_weight * KL_T + mse_weight * MSE + wd_weight * W1

    `logits_fn(model, final_hidden, batch) -> (logits, mask)` says which logits are compared (all
    next-token logits of an LM batch, or the two answer logits of a cloze classifier) and over which
    positions; hidden-state losses always use the batch's `attention_mask`."""

    def __init__(self, teacher: Optional[nn.Module], *, kl_weight: float = 0.0, mse_weight: float = 0.0,
                 wd_weight: float = 0.0, hard_weight: float = 1.0, temperature: float = 1.0,
                 critic_hidden: int = 128, critic_lr: float = 1e-4, n_critic: int = 1, gp_weight: float = 10.0,
                 layer_map: Optional[Sequence[int]] = None, seed: int = 0):
        for name, w in (("kl_weight", kl_weight), ("mse_weight", mse_weight), ("wd_weight", wd_weight),
                        ("hard_weight", hard_weight)):
            if w < 0:
                raise ValueError(f"--{name} must be >= 0, got {w}")
        if teacher is None and (kl_weight or mse_weight or wd_weight):
            raise ValueError("--kl_weight/--mse_weight/--wd_weight need a teacher (--teacher)")
        if n_critic < 1:
            raise ValueError(f"--n_critic must be >= 1, got {n_critic}")
        self.teacher = as_frozen(teacher) if teacher is not None else None
        self.kl_weight, self.mse_weight, self.wd_weight, self.hard_weight = kl_weight, mse_weight, wd_weight, hard_weight
        self.temperature, self.n_critic = temperature, n_critic
        self.layer_map = list(layer_map) if layer_map is not None else None
        self.critics: Optional[LayerwiseWasserstein] = None
        self.critic_opt = None
        self._critic_cfg = dict(hidden=critic_hidden, gp_weight=gp_weight, lr=critic_lr)
        self.generator = torch.Generator().manual_seed(seed)  # critic init and GP interpolation (CPU draws)
        self._stash: Optional[tuple[list, list]] = None  # (real, fake) token samples for the critic update

    @property
    def uses_hiddens(self) -> bool:
        return bool(self.mse_weight or self.wd_weight)

    def make_aligner(self, student: nn.Module) -> HiddenStateAligner:
        from distillation.losses import evenly_spaced_layer_map

        ls, lt = student.config.num_hidden_layers, self.teacher.config.num_hidden_layers if self.teacher else 1
        if self.layer_map is None and self.teacher is not None:
            self.layer_map = evenly_spaced_layer_map(ls, lt)
        layer_map = self.layer_map or []
        width = self.teacher.config.hidden_size if self.teacher is not None else student.config.hidden_size
        return HiddenStateAligner(student.config.hidden_size, width, layer_map if self.uses_hiddens else [])

    def _ensure_critics(self, dim: int, device: torch.device) -> None:
        if self.critics is not None:
            return
        from optimizer import AdamW

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
            self.critics = LayerwiseWasserstein(dim, len(self.layer_map), self._critic_cfg["hidden"],
                                                self._critic_cfg["gp_weight"]).to(device)
        # Adam's betas as in WGAN-GP (Gulrajani et al., 2017, Algorithm 1: beta1 = 0, beta2 = 0.9).
        self.critic_opt = AdamW(self.critics.parameters(), lr=self._critic_cfg["lr"], betas=(0.0, 0.9))

    def loss(self, model: StudentWithAligner, batch: dict, logits_fn, task_loss_fn=None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (differentiable w.r.t. the student and projections only) and its parts (detached)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        student = model.student
        if self.uses_hiddens:
            s_final, s_layers = forward_with_hiddens(student, ids, mask)
        else:
            s_final, s_layers = student.backbone.encode(ids, mask), []
        parts: dict[str, torch.Tensor] = {}
        if self.hard_weight or self.kl_weight:  # (hidden-state losses alone need no logits)
            s_logits, logit_mask = logits_fn(student, s_final, batch)
        if self.hard_weight:
            parts["hard"] = task_loss_fn(s_logits, batch)
        if self.teacher is not None and (self.kl_weight or self.uses_hiddens):
            with torch.no_grad():
                if self.uses_hiddens:
                    t_final, t_layers = forward_with_hiddens(self.teacher, ids, mask)
                else:
                    t_final, t_layers = self.teacher.backbone.encode(ids, mask), []
                t_logits = logits_fn(self.teacher, t_final, batch)[0] if self.kl_weight else None
            if self.kl_weight:
                parts["kl"] = kd_kl_loss(s_logits, t_logits, self.temperature, logit_mask)
            if self.uses_hiddens:
                fake, real = model.aligner(s_layers, t_layers)
                if self.mse_weight:
                    parts["mse"] = hidden_mse_loss(fake, real, mask)
                if self.wd_weight:
                    fake_tok = [masked_tokens(f, mask) for f in fake]  # each (N, D_t)
                    real_tok = [masked_tokens(r, mask) for r in real]
                    self._ensure_critics(real_tok[0].size(-1), real_tok[0].device)
                    parts["wd"] = self.critics.estimate(real_tok, fake_tok)
                    if model.training:  # the critics learn from this micro-batch after its backward
                        self._stash = ([r.detach() for r in real_tok], [f.detach() for f in fake_tok])
        weights = {"hard": self.hard_weight, "kl": self.kl_weight, "mse": self.mse_weight, "wd": self.wd_weight}
        if not parts:
            raise ValueError("every loss weight is 0: nothing to train")
        total = sum(weights[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}

    def on_micro_batch_end(self, trainer, batch: dict) -> None:
        if self._stash is not None:
            real, fake = self._stash
            self._stash = None
            self.critic_step(real, fake)

    def critic_step(self, real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
        """`n_critic` updates of the critics on detached token samples; returns the last critic loss
        (a device tensor: no host sync)."""
        self._ensure_critics(real[0].size(-1), real[0].device)
        self.critics.train()
        value = torch.zeros(())
        device_type = real[0].device.type
        with torch.enable_grad(), torch.autocast(device_type=device_type, enabled=False):  # GP's double backward in fp32
            for _ in range(self.n_critic):
                loss = self.critics.critic_loss(real, fake, self.generator if device_type == "cpu" else None)
                self.critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.critic_opt.step()
                value = loss.detach()
        self.critic_opt.zero_grad(set_to_none=True)
        return value

    # ---- the critics' state, saved inside the trainer's checkpoint ---------------------------
    def state_dict(self) -> dict:
        if self.critics is None:
            return {}
        return {"critics": self.critics.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "generator": self.generator.get_state(), "layer_map": self.layer_map}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.layer_map = state["layer_map"]
        weight = state["critics"]["critics.0.net.0.weight"]
        self._ensure_critics(weight.shape[1], self.device)
        self.critics.load_state_dict(state["critics"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.generator.set_state(state["generator"])

    @property
    def device(self) -> torch.device:
        ref = self.teacher if self.teacher is not None else None
        return next(ref.parameters()).device if ref is not None else torch.device("cpu")
