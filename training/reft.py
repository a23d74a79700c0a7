"""ReFT: low-rank linear subspace interventions on our GPT-2's hidden states (LoReFT).

Wu, Arora, Wang, Geiger, Jurafsky, Manning, Potts, 2024, "ReFT: Representation Finetuning for
Language Models" (arXiv:2404.03592).  The base model stays frozen; at chosen layers and positions
the hidden state h (the residual stream after a GPT2Layer, pyreft's "block_output") is edited in an
r-dimensional subspace:

    Phi(h) = h + R^T (W h + b - R h)        R (r, D) with orthonormal rows, W (r, D), b (r,)

Choices (docs/efficient_finetuning.md, "ReFT"):

* Orthonormal R by PARAMETRIZATION (`torch.nn.utils.parametrize` with `OrthonormalRows`, a QR map),
  not by re-orthonormalising after each step: R is orthonormal at every forward (inside a gradient
  accumulation window, in evaluation, after loading any checkpoint) for every optimiser, the
  optimiser's state stays that of the tensor it updates, and no script has to install a callback.
  Not torch's `parametrizations.orthogonal`: its Householder map (the one for r < D) reads a sign
  off the diagonal with `.int()`, so one step of weight decay or of SOAP/Shampoo (dense updates)
  turns -1 into -0.99999 -> 0 and zeroes R (measured), and its trivialization keeps a D x D buffer.
  The QR map is scale-invariant, so weight decay on the raw tensor never changes R.
* Identity at initialisation: W = R, b = 0 (pyreft starts W at nn.Linear's random init), so a
  freshly applied model computes exactly what the base model does, as a fresh LoRA does.
* One intervention per chosen layer, shared by all its chosen positions (pyreft's share_weights).
* Positions (pyreft's syntax): `fN` the first N real tokens, `lN` the last N, `fN+lM` both, `all`.
  "Real" comes from each row's attention mask, so right-padded batches (classification) and
  left-padded prompts (generation) select the same tokens.  The mask reaches the hooks through a
  forward pre-hook on the GPT2Model / GPT2LMHeadModel forward; the generation engine calls
  `GPT2Model.encode` with a KV cache directly, and there the prompt's real tokens come from the
  position ids it passes (cumsum(mask) - 1 of a left-padded prompt, checked).
* KV cache: the prompt's positions are intervened at prefill only; tokens fed after it (cached
  continuations) are not prompt tokens and are intervened only with `all`.  With `all` a cached
  generation equals a full recomputation; with `fN` too; with `lN` the intervened tokens are the
  prompt's last N (the tests prove all three).
* Gradient checkpointing: a recomputed layer finds the positions its forward used by the identity
  of its input tensor.
"""
from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

REFT_FORMAT = "reft-adapter"
_POSITIONS = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


@dataclass(frozen=True)
class Positions:
    first: int = 0
    last: int = 0
    all: bool = False


def parse_positions(spec: str) -> Positions:
    """`all`, `fN`, `lN` or `fN+lM` (N, M >= 1) -> Positions."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return Positions(all=True)
    m = _POSITIONS.match(spec)
    if not spec or m is None or (m.group(1) is None and m.group(2) is None) or ("+" in spec) != \
            (m.group(1) is not None and m.group(2) is not None):
        raise ValueError(f"reft_positions {spec!r}: use all, fN (first N tokens), lN (last N) or fN+lM")
    first, last = int(m.group(1) or 0), int(m.group(2) or 0)
    if (m.group(1) is not None and first < 1) or (m.group(2) is not None and last < 1):
        raise ValueError(f"reft_positions {spec!r}: counts must be >= 1")
    return Positions(first, last)


def resolve_layers(spec: str, num_layers: Optional[int]) -> list[int]:
    """`all`, `even`, `odd` or indices such as `0,2,5` (the sparse-layer syntax) -> layer indices."""
    from modules.attention_patterns import parse_sparse_layers

    try:
        return parse_sparse_layers(spec, num_layers)
    except ValueError as exc:
        raise ValueError(str(exc).replace("sparse_layers", "reft_layers")) from None


def select_positions(valid: Optional[torch.Tensor], length: int, where: Positions, device: torch.device) -> torch.Tensor:
    """(B|1, T) bool: the positions to intervene.  `valid` (B, T) marks real tokens (None: all real);
    a token's rank among its row's real tokens decides first / last, whatever the padding side."""
    if valid is None:
        valid = torch.ones((1, length), dtype=torch.bool, device=device)
    if where.all:
        return valid
    rank = valid.long().cumsum(-1) - 1  # (B, T): 0 for the first real token
    count = valid.sum(-1, keepdim=True)  # (B, 1)
    return valid & ((rank < where.first) | (rank >= count - where.last))


class OrthonormalRows(nn.Module):
    """Parametrization X (r, D), r <= D -> the Q factor of X^T transposed: orthonormal rows,
    signs fixed by R's diagonal so that an orthonormal X maps to itself; invariant to X's scale."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        wide = X if X.dtype in (torch.float32, torch.float64) else X.float()  # QR in fp32 for bf16 / fp16
        Q, R = torch.linalg.qr(wide.mT)  # (D, r), (r, r)
        return (Q * torch.sign(torch.diagonal(R)).unsqueeze(0)).mT.to(X.dtype)  # (r, D)

    def right_inverse(self, R: torch.Tensor) -> torch.Tensor:
        return R


class LoReFT(nn.Module):
    """Phi(h) = h + R^T ((W - R) h + b) on the last dimension; R = `rotation.weight` (r, D) with
    orthonormal rows, (W, b) = `source`.  Starts as the identity (W = R, b = 0)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        if not 1 <= rank <= hidden_size:
            raise ValueError(f"reft_rank must be in [1, hidden size {hidden_size}], got {rank}")
        self.rotation = nn.Linear(hidden_size, rank, bias=False)
        nn.init.orthogonal_(self.rotation.weight)
        parametrize.register_parametrization(self.rotation, "weight", OrthonormalRows())
        self.source = nn.Linear(hidden_size, rank)
        with torch.no_grad():
            self.source.weight.copy_(self.rotation.weight)
            self.source.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.rotation.weight  # (r, D)
        edit = F.linear(h, self.source.weight - R, self.source.bias)  # (..., r) = W h + b - R h
        return h + edit @ R.to(edit.dtype)  # (..., D)


@dataclass
class ReftSettings:
    """The ReFT hyper-parameters; stored in every adapter checkpoint."""

    rank: int = 4
    layers: str = "all"
    positions: str = "f1+l1"
    modules_to_save: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Hooks:
    """The hooks of one backbone: the attention mask of the call in progress (a stack, filled by
    forward pre-hooks of the model classes), the position ids of the last embedding, and the
    interventions applied as forward hooks of the chosen layers."""

    def __init__(self, backbone: nn.Module, where: Positions):
        self.backbone, self.where = backbone, where
        self.masks: list[Optional[torch.Tensor]] = []
        self.positions: Optional[torch.Tensor] = None
        self.saved: dict[int, tuple] = {}  # id(layer input) -> (weakref, selection), under checkpointing
        self.handles: list = []

    def enter(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        mask = bound.arguments.get("attention_mask")
        self.masks.append(None if mask is None else mask.bool())

    def leave(self, module, args, kwargs, output):
        self.masks.pop()

    def embedded(self, module, args):
        self.positions = args[0]

    def valid(self, B: int, T: int, cache_start) -> Optional[torch.Tensor]:
        """(B, T) real-token mask of a pass that starts a sequence, or None (every token real)."""
        if self.masks:
            mask = self.masks[-1]
            return None if mask is None else mask[:, -T:]
        if cache_start is not None:  # the generation engine's prefill: a left-padded prompt
            pos = self.positions.expand(B, T)
            valid = torch.arange(T, device=pos.device) >= T - 1 - pos[:, -1:]  # (B, T)
            if not torch.equal((valid.long().cumsum(-1) - 1).clamp(min=0), pos):
                raise ValueError("ReFT: a cached forward whose position ids are not those of a left-padded prompt "
                                 "(cumsum(mask) - 1); the intervention positions cannot be found")
            return valid
        if self.where.all:
            return None
        raise ValueError("reft_positions first/last need each row's attention mask, which the interventions see "
                         "only through forward(): call model(ids, mask) or model.gpt(ids, mask) rather than "
                         "GPT2Model.encode, or use reft_positions all")

    def selection(self, h: torch.Tensor, cache_start) -> Optional[torch.Tensor]:
        backbone = self.backbone
        checkpointing = backbone.gradient_checkpointing and backbone.training and torch.is_grad_enabled()
        if checkpointing:
            hit = self.saved.get(id(h))
            if hit is not None and hit[0]() is h:  # a recomputation: the positions of its forward
                return hit[1]
        B, T = h.shape[:2]
        continuation = cache_start is not None and not (isinstance(cache_start, int) and cache_start == 0)
        if continuation:  # tokens after a cached prompt: not prompt positions
            sel = torch.ones((1, T), dtype=torch.bool, device=h.device) if self.where.all else None
        else:
            sel = select_positions(self.valid(B, T, cache_start), T, self.where, h.device)
        if checkpointing:
            key = id(h)
            self.saved[key] = (weakref.ref(h, lambda _, k=key: self.saved.pop(k, None)), sel)
        return sel

    def intervene(self, layer, args, kwargs, output):
        cache_start = args[3] if len(args) > 3 else kwargs.get("cache_start")
        sel = self.selection(args[0], cache_start)
        if sel is None:
            return None
        return torch.where(sel.unsqueeze(-1), layer.reft(output).to(output.dtype), output)  # (B, T, D)


def reft_settings(model: nn.Module) -> Optional[ReftSettings]:
    """The settings of the interventions applied to `model` by `apply_reft`, or None."""
    entry = model.__dict__.get("_reft")
    return entry[0] if entry else None


def interventions(model: nn.Module) -> dict[str, LoReFT]:
    """Module name -> intervention."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoReFT)}


def apply_reft(model: nn.Module, rank: int = 4, layers: str = "all", positions: str = "f1+l1",
               modules_to_save: Optional[Iterable[str]] = None) -> nn.Module:
    """Freeze `model` and add a LoReFT intervention (trainable) after each chosen GPT2Layer, in
    place; the modules named in `modules_to_save` (task heads) stay trainable.  Returns `model`."""
    from models.gpt2 import GPT2Model, GPT2PreTrainedModel
    from training.efficient import _backbone

    if reft_settings(model) is not None or interventions(model):
        raise ValueError("the model already has ReFT interventions")
    if model.__dict__.get("_lora"):
        raise ValueError("peft: the model has LoRA adapters; ReFT and LoRA are alternatives")
    where = parse_positions(positions)
    backbone = _backbone(model)
    if not isinstance(backbone, GPT2Model):
        raise TypeError(f"{type(model).__name__} contains no GPT2Model")
    chosen = resolve_layers(layers, len(backbone.gpt_layers))
    settings = ReftSettings(int(rank), str(layers), str(positions), list(modules_to_save or []))
    names = {n for n, _ in model.named_modules()}
    for head in settings.modules_to_save:
        if head not in names:
            raise ValueError(f"modules_to_save: {type(model).__name__} has no module {head!r}")
    model.requires_grad_(False)
    ref = backbone.word_embedding.weight
    hooks = _Hooks(backbone, where)
    for i in chosen:
        layer = backbone.gpt_layers[i]
        layer.add_module("reft", LoReFT(backbone.config.hidden_size, settings.rank).to(ref.device, ref.dtype))
        hooks.handles.append(layer.register_forward_hook(hooks.intervene, with_kwargs=True))
    for module in model.modules():
        if isinstance(module, GPT2PreTrainedModel) and module.backbone is backbone:
            hooks.handles.append(module.register_forward_pre_hook(hooks.enter, with_kwargs=True))
            hooks.handles.append(module.register_forward_hook(hooks.leave, with_kwargs=True, always_call=True))
    hooks.handles.append(backbone.pos_embedding.register_forward_pre_hook(hooks.embedded))
    for head in settings.modules_to_save:
        model.get_submodule(head).requires_grad_(True)
    model.__dict__["_reft"] = (settings, hooks)
    return model


# ---- adapter checkpoints ----------------------------------------------------------------------
def reft_state(model: nn.Module) -> dict:
    """An adapter-only checkpoint: {'format', 'reft': hyper-parameters, 'tensors': interventions + heads}."""
    settings = reft_settings(model)
    if settings is None:
        raise ValueError("reft_state: the model has no ReFT interventions")
    keep = tuple(f"{h}." for h in settings.modules_to_save)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if ".reft." in f".{k}" or k.startswith(keep)}
    return {"format": REFT_FORMAT, "reft": settings.to_dict(), "tensors": tensors}


def load_reft_state(model: nn.Module, state: dict) -> nn.Module:
    """Load a `reft_state` checkpoint on top of the base `model`: applies ReFT with the stored
    settings first when the model has none yet, then copies the interventions and heads in."""
    if state.get("format") != REFT_FORMAT:
        raise ValueError(f"not a ReFT adapter checkpoint (format {state.get('format')!r})")
    saved = ReftSettings(**state["reft"])
    current = reft_settings(model)
    if current is None:
        apply_reft(model, saved.rank, saved.layers, saved.positions, saved.modules_to_save)
    elif current != saved:
        raise ValueError(f"adapter checkpoint made with ReFT {saved.to_dict()}, the model has {current.to_dict()}")
    expected, given = set(reft_state(model)["tensors"]), set(state["tensors"])
    if expected != given:
        raise ValueError(f"adapter checkpoint does not match the model: missing {sorted(expected - given)[:5]}, "
                         f"unexpected {sorted(given - expected)[:5]}")
    model.load_state_dict(state["tensors"], strict=False)
    return model


def reft_state_for(model: nn.Module, state: dict) -> dict:
    """A ReFT checkpoint of a wrapper (a classifier: `gpt.` interventions + head) trimmed to what
    `model` has: a classifier's interventions load into an LM or a bare GPT2Model, without the head."""
    names = {n for n, _ in model.named_modules()}
    tensors = dict(state["tensors"])
    if any(k.startswith("gpt.") for k in tensors) and "gpt" not in names:
        tensors = {k[len("gpt."):]: v for k, v in tensors.items() if k.startswith("gpt.")}
    settings = dict(state["reft"])
    settings["modules_to_save"] = [m for m in settings.get("modules_to_save", []) if m in names]
    heads = tuple(f"{m}." for m in settings["modules_to_save"])
    tensors = {k: v for k, v in tensors.items() if ".reft." in f".{k}" or k.startswith(heads)}
    return {**state, "reft": settings, "tensors": tensors}


def orthonormality_error(model: nn.Module) -> float:
    """max |R R^T - I| over the model's interventions."""
    worst = 0.0
    for m in interventions(model).values():
        R = m.rotation.weight.detach().double()
        worst = max(worst, (R @ R.T - torch.eye(R.size(0), dtype=R.dtype, device=R.device)).abs().max().item())
    return worst


def trainable_sizes(hidden_size: int, rank: int, layers: Sequence[int]) -> int:
    """Trainable parameters of the interventions: (R: r x D) + (W: r x D) + (b: r) per layer."""
    return len(layers) * (2 * rank * hidden_size + rank)
