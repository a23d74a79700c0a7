"""Checkpoints written atomically (temp file + os.replace) and read with `torch.load(weights_only=True)`,
so loading never executes pickled code.  RNG states are stored as tensors and plain lists."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def atomic_write(path: str | Path, write) -> Path:
    """Create `path` through `write(tmp_path)` into a temporary file in the same directory, then
    `os.replace` it into place: readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return atomic_write(path, write)


def save_atomic(obj, path: str | Path) -> Path:
    """`torch.save` to `path` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: str | Path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    return torch.load(path, map_location=map_location, weights_only=True)


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
