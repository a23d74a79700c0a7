"""Parameter- and memory-efficient fine-tuning: LoRA through `peft`, layer freezing, gradient
checkpointing, and the accounting (trainable parameters, peak memory) every run prints.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") replaces a frozen
linear layer y = x W^T + b by y = x W^T + b + (alpha / r) * dropout(x) A^T B^T with A (r, in) random and
B (out, r) zero, so a freshly adapted model computes exactly what the base model does.  The adapter
layers are `peft`'s own (`LoraModel`, the engine behind `inject_adapter_in_model`), injected in
place into OUR modules: the model keeps its class and methods (`generate`, `lm_head_weight`,
`hidden_state_to_token`), and the output embedding stays the very Parameter of the input embedding
(LoRA never targets it, nor copies it).  Task heads (e.g. `classifier_head`) train alongside through
peft's `modules_to_save`.  `merge_lora` folds the adapters into the base weights with peft's
`merge_and_unload` for inference and generation.

Layer freezing (`freeze_parameters`) is one mechanism for every mode, including the classifier's
`last-linear-layer` (= `all-but-head`).  Gradient checkpointing (Chen et al., 2016, "Training Deep
Nets with Sublinear Memory Cost") recomputes each transformer layer in the backward pass instead of
storing its activations (`GPT2Model.gradient_checkpointing`).

ReFT (`peft reft`: LoReFT interventions on hidden states, Wu et al., 2024) lives in training/reft.py
and goes through the same `prepare_model`, `model_state` / `load_model_state` and accounting.

Everything is reachable from the command line of every training script: the flags live in
`training/cli.py`, become an `EfficiencyConfig` (training/config.py) and reach `prepare_model`
through the shared `Trainer`.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

# ---- LoRA targets -----------------------------------------------------------------------------
# Module-name suffixes of the linear layers inside each GPT2Layer (the CS224N names).
LORA_MODULES = {
    "query": "self_attention.query",
    "key": "self_attention.key",
    "value": "self_attention.value",
    "attention_dense": "attention_dense",  # attention output projection
    "interm_dense": "interm_dense",  # MLP up-projection
    "out_dense": "out_dense",  # MLP down-projection
}
LORA_TARGET_GROUPS = {
    "qv": ["query", "value"],  # the LoRA paper's choice
    "qkv": ["query", "key", "value"],
    "attn": ["query", "key", "value", "attention_dense"],
    "mlp": ["interm_dense", "out_dense"],
    "all": list(LORA_MODULES),  # every linear layer of every transformer block
}
ADAPTER_FORMAT = "lora-adapter"
FREEZE_MODES = ("none", "embeddings", "first-half", "first-n", "all-but-head")


def resolve_lora_targets(spec: str | Sequence[str]) -> list[str]:
    """`--lora_targets` -> module-name suffixes for peft's `target_modules`.

    `spec` is a comma-separated list (or a list) of groups (qv, qkv, attn, mlp, all) and single layers
    (query, key, value, attention_dense, interm_dense, out_dense); the union, in a fixed order.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for item in (s.strip() for s in items):
        if item in LORA_TARGET_GROUPS:
            chosen.update(LORA_TARGET_GROUPS[item])
        elif item in LORA_MODULES:
            chosen.add(item)
        elif item in LORA_MODULES.values():
            chosen.add(next(k for k, v in LORA_MODULES.items() if v == item))
        else:
            raise ValueError(f"lora_targets: unknown target {item!r}; use groups {sorted(LORA_TARGET_GROUPS)} "
                             f"or layers {list(LORA_MODULES)}, comma-separated")
    if not chosen:
        raise ValueError("lora_targets: no target given")
    return [LORA_MODULES[k] for k in LORA_MODULES if k in chosen]


@dataclass
class LoraSettings:
    """The LoRA hyper-parameters; stored in every adapter checkpoint."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: resolve_lora_targets("attn"))
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


def _backbone(model: nn.Module):
    """The GPT2Model inside `model` (the model itself, `.gpt`, or any submodule)."""
    from models.gpt2 import GPT2Model

    for module in model.modules():
        if isinstance(module, GPT2Model):
            return module
    raise TypeError(f"{type(model).__name__} contains no GPT2Model")


def lora_settings(model: nn.Module) -> Optional[LoraSettings]:
    """The settings of the LoRA adapters applied to `model` by `apply_lora`, or None."""
    entry = model.__dict__.get("_lora")
    return entry[0] if entry else None


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.05,
               targets: str | Sequence[str] = "attn", modules_to_save: Optional[Iterable[str]] = None) -> nn.Module:
    """Inject peft LoRA adapters into `model` in place and return it.

    Every parameter of the base model is frozen; the adapters (lora_A random, lora_B zero) and the
    modules named in `modules_to_save` (e.g. `classifier_head`, wrapped by peft's ModulesToSaveWrapper,
    which trains a copy and keeps the original) are trainable.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    if lora_settings(model) is not None or any(n.endswith(".lora_A") for n, _ in model.named_modules()):
        raise ValueError("the model already has LoRA adapters")
    if r < 1:
        raise ValueError(f"lora_r must be >= 1, got {r}")
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
    settings = LoraSettings(r=int(r), alpha=float(alpha), dropout=float(dropout),
                            targets=resolve_lora_targets(targets), modules_to_save=list(modules_to_save or []))
    names = {n for n, _ in model.named_modules()}
    for head in settings.modules_to_save:
        if head not in names:
            raise ValueError(f"modules_to_save: {type(model).__name__} has no module {head!r}")
    backbone = _backbone(model)
    embedding = backbone.word_embedding.weight
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), modules_to_save=settings.modules_to_save or None,
                        bias="none")
    training = model.training
    tuner = LoraModel(model, config, adapter_name="default")  # what peft.inject_adapter_in_model does
    model.train(training)  # the new modules (LoRA dropout) start in training mode; follow the model's mode
    if backbone.word_embedding.weight is not embedding:
        raise AssertionError("LoRA replaced the (tied) word embedding")
    # Keep the tuner (for merge_and_unload) without registering it as a submodule (it holds `model`).
    model.__dict__["_lora"] = (settings, tuner)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (W <- W + alpha/r * B A) with peft's `merge_and_unload`;
    afterwards the model holds plain nn.Linear layers again (and the trained head in place of the
    original one).  Returns the same model object."""
    entry = model.__dict__.pop("_lora", None)
    if entry is None:
        raise ValueError("merge_lora: the model has no LoRA adapters (apply_lora was not called on it)")
    _, tuner = entry
    embedding = _backbone(model).word_embedding.weight
    merged = tuner.merge_and_unload(safe_merge=True)
    if merged is not model or _backbone(model).word_embedding.weight is not embedding:
        raise AssertionError("merge_and_unload did not merge in place or replaced the tied embedding")
    return model


# ---- adapter checkpoints ----------------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict:
    """An adapter-only checkpoint: {'format', 'lora': hyper-parameters, 'tensors': adapters + heads}."""
    from peft import get_peft_model_state_dict

    settings = lora_settings(model)
    if settings is None:
        raise ValueError("adapter_state: the model has no LoRA adapters")
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}
    return {"format": ADAPTER_FORMAT, "lora": settings.to_dict(), "tensors": tensors}


def load_adapter_state(model: nn.Module, state: dict) -> nn.Module:
    """Load an `adapter_state` checkpoint on top of the base `model`: applies LoRA with the stored
    hyper-parameters first when the model has none yet, then copies the adapters and heads in."""
    from peft import set_peft_model_state_dict

    if state.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"not a LoRA adapter checkpoint (format {state.get('format')!r})")
    saved = LoraSettings(**state["lora"])
    current = lora_settings(model)
    if current is None:
        apply_lora(model, saved.r, saved.alpha, saved.dropout, saved.targets, saved.modules_to_save)
    elif current != saved:
        raise ValueError(f"adapter checkpoint made with LoRA {saved.to_dict()}, the model has {current.to_dict()}")
    expected = set(adapter_state(model)["tensors"])
    given = set(state["tensors"])
    if expected != given:
        raise ValueError(f"adapter checkpoint does not match the model: missing {sorted(expected - given)[:5]}, "
                         f"unexpected {sorted(given - expected)[:5]}")
    result = set_peft_model_state_dict(model, state["tensors"], adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"adapter checkpoint keys not in the model: {result.unexpected_keys[:5]}")
    return model


def model_state(model: nn.Module) -> dict:
    """What a checkpoint stores of the model: adapters + heads + LoRA settings for a LoRA model,
    interventions + heads + ReFT settings for a ReFT model (training/reft.py), the full state dict
    otherwise."""
    from training.reft import reft_settings, reft_state

    if reft_settings(model) is not None:
        return reft_state(model)
    return adapter_state(model) if lora_settings(model) is not None else model.state_dict()


def load_model_state(model: nn.Module, state: dict) -> None:
    """Inverse of `model_state`."""
    from training.reft import REFT_FORMAT, load_reft_state

    if state.get("format") == REFT_FORMAT:
        load_reft_state(model, state)
    elif state.get("format") == ADAPTER_FORMAT:
        load_adapter_state(model, state)
    else:
        model.load_state_dict(state)


PEFT_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model


def save_peft_adapter(state: dict, directory, base_model: str = "") -> Path:
    """An `adapter_state` checkpoint in peft's own format: `adapter_config.json` (a LoraConfig) and
    `adapter_model.safetensors` (the tensors under PeftModel's names), which
    `peft.PeftModel.from_pretrained(model, directory)` restores on the model the adapters were
    trained on (the same class, with the base weights; `base_model` is recorded as
    base_model_name_or_path).  Written in place: the caller writes into a temporary export directory
    that is renamed whole (`models.hf_export.save_hf_checkpoint`'s `write_extra`)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if state.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"not a LoRA adapter checkpoint (format {state.get('format')!r})")
    lora = LoraSettings(**state["lora"])
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                        modules_to_save=lora.modules_to_save or None, bias="none", base_model_name_or_path=base_model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state["tensors"].items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


# ---- freezing ---------------------------------------------------------------------------------
def freeze_parameters(model: nn.Module, mode: str, n_layers: Optional[int] = None,
           head: Optional[Iterable[str]] = None) -> list[str]:
    """Set `requires_grad=False` on a part of the model; returns the names of the frozen parameters.

    none: nothing; embeddings: token and position embeddings (for an LM, the tied output layer too);
    first-half: the embeddings and the first num_hidden_layers // 2 transformer layers; first-n: the
    embeddings and the first `n_layers` layers; all-but-head: everything outside the head modules
    (`head`, default `model.head_modules`) -- the classifier's `last-linear-layer` mode.
    Freezing only ever turns gradients off, and it freezes LoRA adapters inside frozen layers too.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {mode!r}")
    if mode == "none":
        return []
    if mode == "all-but-head":
        heads = list(head if head is not None else getattr(model, "head_modules", ()))
        if not heads:
            raise ValueError(f"freeze all-but-head: {type(model).__name__} has no separate head (an LM's output "
                             f"layer is its tied input embedding); use embeddings, first-half or first-n")
        names = {n for n, _ in model.named_modules()}
        for h in heads:
            if h not in names:
                raise ValueError(f"freeze all-but-head: {type(model).__name__} has no module {h!r}")
        modules = [model]
        skip = tuple(f"{h}." for h in heads)
    else:
        backbone = _backbone(model)
        n_total = len(backbone.gpt_layers)
        if mode == "first-half":
            n_layers = n_total // 2
        elif mode == "first-n":
            if n_layers is None or not 1 <= n_layers <= n_total:
                raise ValueError(f"freeze first-n needs freeze_layers N with 1 <= N <= {n_total}, got {n_layers}")
        else:
            n_layers = 0
        modules = [backbone.word_embedding, backbone.pos_embedding, *backbone.gpt_layers[:n_layers]]
        skip = ()
    frozen = []
    prefix = {id(m): n for n, m in model.named_modules()}
    for module in modules:
        for name, p in module.named_parameters():
            full = f"{prefix[id(module)]}.{name}".lstrip(".")
            if skip and full.startswith(skip):
                continue
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(full)
    return frozen


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """Recompute every transformer layer in the backward pass (training mode only)."""
    from models.gpt2 import GPT2Model

    found = False
    for module in model.modules():
        if isinstance(module, GPT2Model):
            module.gradient_checkpointing = enabled
            found = True
    if not found:
        raise TypeError(f"grad_checkpointing: {type(model).__name__} contains no GPT2Model")


# ---- accounting -------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new CUDA peak (the CPU's peak RSS is the process's and cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated on a GPU, the process's peak RSS on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


def efficiency_report(model: nn.Module, device: torch.device | str) -> dict:
    """Trainable and total parameters (tied tensors once), their share, and peak memory so far."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    peak, kind = peak_memory(device)
    settings = lora_settings(model)
    from training.reft import reft_settings

    reft = reft_settings(model)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_pct": 100.0 * trainable / max(total, 1), "peak_memory_bytes": peak,
            "peak_memory_kind": kind, "lora": settings.to_dict() if settings else None,
            "reft": reft.to_dict() if reft else None,
            "grad_checkpointing": any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())}


def format_report(report: dict) -> str:
    what = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "peak RSS"}[report["peak_memory_kind"]]
    return (f"trainable parameters {report['trainable_params']:,} of {report['total_params']:,} "
            f"({report['trainable_pct']:.3f}%); {what} {report['peak_memory_bytes'] / 2**30:.2f} GiB")


def as_frozen(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients, in place: a teacher or a reference model."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` as it is now (e.g. the initial model a KL term stays close to)."""
    import copy

    return as_frozen(copy.deepcopy(model))


# ---- applying a configuration ------------------------------------------------------------------
def prepare_model(model: nn.Module, cfg, head: Optional[Iterable[str]] = None) -> dict:
    """Apply an `EfficiencyConfig` (peft, freeze, grad_checkpointing) to `model`, in place and once;
    returns the settings applied.  `head` (default: `model.head_modules`) names the task head modules
    that train alongside LoRA adapters and that freeze all-but-head keeps trainable."""
    from common.errors import ConfigError

    done = model.__dict__.get("_efficiency_prepared")
    if done is not None:
        return done
    heads = list(head if head is not None else getattr(model, "head_modules", ()))
    applied = {"peft": cfg.peft, "freeze": cfg.freeze, "grad_checkpointing": bool(cfg.grad_checkpointing),
               "merge_lora": bool(cfg.merge_lora), "qat": getattr(cfg, "qat", "none")}
    if cfg.peft != "none" and getattr(_backbone(model), "quantization", None) is not None:
        raise ConfigError("peft", f"{cfg.peft} on a quantized model (a quantize.py output) is not supported: its "
                          f"weights are integer buffers; fine-tune the fp32 model (with --qat to prepare it for "
                          f"quantizing), or load a ReFT run onto the quantized base for prediction")
    if applied["qat"] != "none":  # before LoRA: the adapters wrap the fake-quantized layers
        from models.quant.qat import prepare_qat, qat_spec

        try:
            prepare_qat(_backbone(model), qat_spec(cfg.qat, cfg.qat_group_size))
        except ValueError as exc:
            raise ConfigError("qat_group_size" if "group" in str(exc) else "qat", str(exc)) from None
        applied["qat_group_size"] = cfg.qat_group_size if cfg.qat == "int4" else None
    if cfg.peft == "lora":
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, modules_to_save=heads)
        applied["lora"] = lora_settings(model).to_dict()
    elif cfg.peft == "reft":
        _apply_reft(model, cfg, heads, applied)
    frozen = freeze_parameters(model, cfg.freeze, cfg.freeze_layers, head=heads)
    applied["frozen_tensors"] = len(frozen)
    if cfg.peft == "lora" and not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n):
        raise ConfigError("freeze", f"{cfg.freeze} froze every LoRA adapter (lora_targets {cfg.lora_targets}); "
                          f"freeze fewer layers or adapt other ones")
    if cfg.peft == "reft" and not any(p.requires_grad for n, p in model.named_parameters() if ".reft." in n):
        raise ConfigError("freeze", f"{cfg.freeze} froze every ReFT intervention (reft_layers {cfg.reft_layers}); "
                          f"freeze fewer layers or intervene at later ones")
    if applied["grad_checkpointing"]:
        set_grad_checkpointing(model, True)
    model.__dict__["_efficiency_prepared"] = applied
    return applied


def _apply_reft(model: nn.Module, cfg, heads: list[str], applied: dict) -> None:
    """`peft reft`: LoReFT interventions (training/reft.py); a bad layer list names `reft_layers`."""
    from common.errors import ConfigError
    from training.reft import apply_reft, reft_settings

    try:
        apply_reft(model, cfg.reft_rank, cfg.reft_layers, cfg.reft_positions, modules_to_save=heads)
    except ValueError as exc:
        field = next((f for f in ("reft_layers", "reft_rank", "reft_positions") if f in str(exc)), "peft")
        raise ConfigError(field, str(exc).removeprefix(f"{field} ")) from None
    applied["reft"] = reft_settings(model).to_dict()
