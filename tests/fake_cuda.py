"""A fake CUDA device for tests on a machine without a GPU (tests/test_cuda_placement.py explains
why each piece is needed on torch 2.13's CPU build): the CUDA device guard, the FakeTensorMode
fixture, host-read record/replay, models built for real and moved onto a fake device."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from config import GPT2Config

CUDA = torch.device("cuda", 0)
META = torch.device("meta")
CPU = torch.device("cpu")
_SCALAR = torch.ops.aten._local_scalar_dense.default  # every host read (.item(), bool(), int(), tolist())


@contextlib.contextmanager
def cuda_device_guard():
    """Register the CPU's no-op device guard for CUDA while the block runs (see the module docstring);
    nothing happens where a CUDA guard exists (a CUDA build)."""
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    registry = ctypes.addressof(ctypes.c_void_p.in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE"))
    width = ctypes.sizeof(ctypes.c_void_p)  # std::atomic<const DeviceGuardImplInterface*>, indexed by DeviceType
    cpu_guard = ctypes.c_void_p.from_address(registry + width * 0)  # DeviceType::CPU
    cuda_guard = ctypes.c_void_p.from_address(registry + width * 1)  # DeviceType::CUDA
    added = cuda_guard.value is None
    if added:
        cuda_guard.value = cpu_guard.value
    try:
        yield
    finally:
        if added:
            cuda_guard.value = None


@pytest.fixture()
def fake():
    """A FakeTensorMode in which tensors may claim the "cuda" device.  Real (CPU) tensors may enter
    it: they become fake CPU tensors, so one meeting a CUDA tensor still raises."""
    with cuda_device_guard(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


class Replay(TorchDispatchMode):
    """Answer the host reads of a fake run with the values the same call read on the CPU."""

    def __init__(self, values: list):
        super().__init__()
        self.values = list(values)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR:
            if not self.values:
                raise AssertionError("the fake-device run reads more values back to the host than the CPU run")
            return self.values.pop(0)
        return func(*args, **(kwargs or {}))


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.values = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _SCALAR:
            self.values.append(out)
        return out


def host_reads(fn) -> list:
    """Run `fn()` for real and return the values it read back to the host, in order."""
    rec = _Record()
    with rec:
        fn()
    return rec.values


def small_config(**overrides) -> GPT2Config:
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                pad_token_id=95, eos_token_id=95)
    return GPT2Config(**{**base, **overrides})


def batch(device, padding: str = "right"):
    """(input_ids, attention_mask) (2, 8): row 1 holds 5 real tokens, padded on `padding`'s side."""
    ids = torch.randint(0, 95, (2, 8), device=device)
    mask = torch.ones(2, 8, dtype=torch.long, device=device)
    if padding == "right":
        mask[1, 5:] = 0
    else:
        mask[1, :3] = 0
    return ids, mask


def tensors_of(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj) if torch.is_tensor(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def devices(obj) -> set[torch.device]:
    return {t.device for t in tensors_of(obj)}


def placed(build, device: torch.device):
    """`build()` for real on the CPU, then moved onto the fake `device` (see the module docstring)."""
    with unfaked():
        module = build()
    return module.to(device)


@contextlib.contextmanager
def unfaked():
    """Real tensors again inside a fake block (every dispatch mode off)."""
    with _disable_current_modes():
        yield
