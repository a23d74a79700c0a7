"""Trainer checkpoints: written atomically with a checksum, read with `weights_only=True` (loading
never executes pickled code) and verified, plus the ONE loader every script uses to turn a run's
checkpoint back into a model.

* `save_atomic(obj, path)`: temp file + `os.replace`; the dict gets a `checksum` entry, a SHA-256
  over every tensor's dtype, shape and bytes and every other value, so flipped or overwritten bytes
  are caught on `load` even where torch's reader accepts them.  A truncated, empty or corrupted file
  is a `CheckpointError` naming the file and what to do, never torch's internal error.
* `check_signature(saved, now, resume_dir)`: `--resume` refuses settings that differ from the run's
  (naming each flag) and data files whose SHA-256 changed (naming each file).
* `rng_state` / `set_rng_state`: Python, NumPy, torch (CPU and CUDA) and the data-order generator.
* `load_model(cls, spec, checkpoint)`: a model from a preset / hub name / HF directory, optionally
  with the weights of a trainer checkpoint (a `best.pt`/`last.pt` file or a run directory): full
  state dicts, LoRA and ReFT adapter checkpoints (applied with their saved settings), a classifier's
  or a distillation run's backbone; a mismatch is explained, naming the checkpoint and the model.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from common.errors import CheckpointError, UserError
from common.io import atomic_write, atomic_write_text  # noqa: F401  (re-exported: older imports)

CHECKSUM_KEY = "checksum"
DATA_KEY = "data "  # signature entries "data --flag" -> SHA-256 of the file (training/runner.py)


def _digest(obj, h) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def checksum(obj: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in obj.items() if k != CHECKSUM_KEY}, h)
    return h.hexdigest()


def save_atomic(obj: dict, path: str | Path) -> Path:
    """`torch.save` to `path` atomically, with a checksum entry."""
    payload = {**obj, CHECKSUM_KEY: checksum(obj)}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint written by `save_atomic`, verified; a foreign checkpoint (no checksum) is checked
    for non-finite floating-point values instead."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted write?); delete it, and resume from the "
                              f"run's other checkpoint or start the run again")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch's reader: truncated zip, bad pickle, a pickled object
        kind = "holds objects other than tensors and plain values, refused (weights_only)" \
            if "weights_only" in str(exc) or "Weights only" in str(exc) else "cannot be read (truncated or corrupted)"
        raise CheckpointError(f"{path}: {kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
                              f"delete it and resume from another checkpoint, or retrain") from None
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        if obj[CHECKSUM_KEY] != checksum(obj):
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted; delete it and resume from "
                                  f"another checkpoint, or retrain")
        obj = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    else:
        check_finite(obj, path)
    return obj


def check_finite(obj, path, where: str = "") -> None:
    """CheckpointError if any floating-point tensor inside `obj` holds NaN or infinity."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise CheckpointError(f"{path}: tensor {where or '(top level)'} holds NaN or infinite values; the file "
                                  f"is corrupted or comes from a diverged run")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, path, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, path, f"{where}[{i}]")


def check_signature(saved: dict, now: dict, resume_dir) -> None:
    """UserError unless a resumed run shares the settings and the data of the run it continues.  A
    run started before data fingerprints were recorded has none to compare; one started before a
    shared flag existed resumes with that flag at its default."""
    changed = [f"{k[len(DATA_KEY):]}: {saved[k]} when the run started, now {now[k]}"
               for k in sorted(now) if k.startswith(DATA_KEY) and k in saved and saved[k] != now[k]]
    if changed:
        raise UserError(f"--resume {resume_dir}: the training data changed since the run started "
                        f"({'; '.join(changed)}); restore the files the run was started with, or start a new run")
    from training.cli import shared_defaults

    defaults = shared_defaults()
    diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
            if saved.get(k) != now.get(k) and not k.startswith(DATA_KEY)
            and not (k not in saved and k in defaults and now[k] == defaults[k])}  # a flag added since, at its default
    if diff:
        lines = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UserError(f"--resume {resume_dir}: the run was started with other settings ({lines}); resume with the "
                        f"same ones (only output paths, decoding and progress flags may change)")


def rng_state(data_generator: torch.Generator) -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the one loader ---------------------------------------------------------------------------
def checkpoint_file(path: str | Path) -> Path:
    """A run directory -> its best.pt (else last.pt); a file stays itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a directory without best.pt or last.pt; pass a run directory of a finished "
                              f"run, or the checkpoint file itself")
    return path


def _rekey(state: dict, model: torch.nn.Module) -> dict:
    """A full state dict saved from another wrapper re-keyed to `model`: a classifier's backbone
    (`gpt.*`) or a distillation run's student (`student.gpt.*`) loads into a GPT2LMHeadModel
    (`gpt.*`) or a GPT2Model (no prefix); the wrapper's own parts (head, projections) are left out."""
    if set(state) == set(model.state_dict()):
        return state
    inner = state
    for prefix in ("student.gpt.", "gpt."):
        if any(k.startswith(prefix) for k in state):
            inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    want = "gpt." if hasattr(model, "gpt") else ""
    return {want + k: v for k, v in inner.items()}


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Load the model weights of a trainer checkpoint (file or run directory) into `model`."""
    from training.efficient import ADAPTER_FORMAT, load_adapter_state
    from training.reft import REFT_FORMAT, load_reft_state, reft_state_for

    path = checkpoint_file(checkpoint)
    obj = load(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no model state inside (found {type(state).__name__})")
    try:
        if state.get("format") == ADAPTER_FORMAT:
            load_adapter_state(model, _adapter_for(model, state))
            return model
        if state.get("format") == REFT_FORMAT:
            load_reft_state(model, reft_state_for(model, state))
            return model
        model.load_state_dict(_rekey(state, model))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise CheckpointError(f"{path}: its weights do not fit the model {type(model).__name__} "
                              f"({getattr(getattr(model, 'config', None), 'name', '?')}): {first}; load it with "
                              f"the model (--model_size / --model) the run was trained with") from None
    return model


def _adapter_for(model: torch.nn.Module, state: dict) -> dict:
    """An adapter checkpoint of a wrapper (a classifier's backbone adapters + head) trimmed to what
    `model` has: a LoRA classifier's adapters load into an LM for generation, without the head."""
    names = {n for n, _ in model.named_modules()}
    tensors = dict(state["tensors"])
    if any(k.startswith("gpt.") for k in tensors) and "gpt" not in names:
        tensors = {k[len("gpt."):]: v for k, v in tensors.items() if k.startswith("gpt.")}
    lora = dict(state["lora"])
    lora["modules_to_save"] = [m for m in lora.get("modules_to_save", []) if m in names]
    tensors = {k: v for k, v in tensors.items() if "lora_" in k or any(k.startswith(m + ".") for m in
                                                                       lora["modules_to_save"])}
    return {**state, "lora": lora, "tensors": tensors}


def load_model(cls, spec: str, checkpoint: Optional[str | Path] = None, random_init: bool = False,
               **config_overrides):
    """`cls.from_name_or_path(spec)` (+ the weights of a trainer checkpoint), in eval mode; an unusable
    weights file is a CheckpointError naming it."""
    from models.hf_io import WeightsFileError

    try:
        model = cls.from_name_or_path(spec, random_init=random_init, **config_overrides)
    except WeightsFileError as exc:
        raise CheckpointError(str(exc)) from None
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()
