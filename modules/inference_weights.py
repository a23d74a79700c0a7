"""Inference copies of weights for no-grad CPU forwards: oneDNN-packed and input-major copies of
the linear layers and of the tied output layer, cached across calls and checked against the
weights before every use.

Why.  A decode step multiplies a few rows by every weight matrix.  MKL's sgemm behind `F.linear`
repacks the weight on every call and, on this AMD EPYC (AVX-512) core, runs the (12 x 768) @
(768 x 3,072) product at ~7 GB/s of weights; oneDNN's matmul on a weight reordered once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing uses)
streams 1.5-1.7x faster on one thread: gpt2's 48 layer products per step take 35.7, not 60.6 ms, at 12
rows, 33.0 vs 57.0 at 2, 88 vs 131 at 48, 392 vs 511 ms for a 240-token prefill, and its output
layer 16.9 instead of 26.7 ms (sliced) at 12 rows.  At one row (batch-1 decoding) on one
thread the packed layout does not help (24.3-30.2 vs 27.1 ms), but `x @ W.T` on an input-major
(in, out) copy does: 22.7 vs 27.1 ms for the layers, 7.6 vs 12.4 ms for the output layer, near
the core's streaming limit (a `sum` over the same weights: 20.1 ms).  On two threads oneDNN's
packed product uses both and MKL's one-row product does not: 15.6 vs 27.3 ms at one row (the
input-major copy 25.7), 17.9 vs 38.8 at 12 rows.  gpt2 shapes, weights streamed from memory
(bench/RESULTS.md "Generation engine").  Either way the results are the same dot products in
another summation order: within ~1e-6 of `F.linear` (tested to 1e-5).

How.  `active(linears, heads, rows)` (used by `models.generation.generate`) prepares, for this
thread and until it exits, a copy of every plain fp32 `nn.Linear` in `linears` and of every head
weight in `heads`: packed when the decode forwards have `rows >= 2` or torch runs on more than one
thread, else input-major.  `linear(module, x)` then runs a prepared module through its copy when
gradients and autocast are off and x is fp32 (a packed copy not inside torch.compile, whose
inductor cannot lower the packed op; an input-major copy also there); anything else (training,
LoRA- or quantization-wrapped layers, which are not plain `nn.Linear`, a module with forward
hooks, CUDA) calls `module(x)` unchanged.  `form(weight, kind)` gives a head's prepared copy.

Cache and staleness (checked when `active` is entered: weights changed inside it, e.g. by an
`on_token` callback, are not seen until the next call). Building gpt2's copies costs ~230 ms
packed, ~280 ms input-major (a few decode steps), so they are kept across calls, weakly keyed by
the weight tensor (freed with it; `clear()` frees them all). Before each use a copy is checked:
the weight's identity (storage address, shape, dtype, version counter: an optimizer step or
`load_state_dict` bumps it) and its content, a fingerprint `W @ v` for a fixed random v (one
read of the weights: 40-54 ms per call for gpt2). The fingerprint is what catches edits through
`.data` (peft's LoRA merge, `weight.data[i] = ...`), which bump no version counter; it misses
only changes too small to move a row's dot product with v by one float32 rounding step. The
cache holds at most `BUDGET_BYTES` (2 GiB), dropping the least recently used copies beyond it:
gpt2 keeps both kinds (~0.5 GB each), gpt2-medium (1.4 GB) one; a call that alone needs more
(gpt2-large, gpt2-xl) runs without copies rather than double the model's memory; copies of a
weight that is no longer eligible (the model was cast or moved) are dropped when it is next
passed. A lock guards the cache while a call prepares (two models may generate in two threads; one
model's KV cache is its own, so one model is not shared between threads). If this torch build lacks
the oneDNN ops, or they disagree with `F.linear` on a probe, nothing is packed.
"""
from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

DEVICES = ("cpu",)  # devices whose forwards use prepared copies
BUDGET_BYTES = 2 * 2 ** 30  # most bytes of copies kept (and that one `active` call may need)
_cache = WeakTensorKeyDictionary()  # weight -> {kind: [identity, fingerprint, copy, last use]}
_uses = itertools.count()
_lock = threading.Lock()  # guards _cache while a call prepares its copies (threads may generate at once)
_probes: dict = {}  # device type -> whether the packed path works here
_vectors: dict = {}  # (in_features, device) -> the fingerprint vector
_state = threading.local()  # .copies: {id(head weight): {kind: copy}}, .modules: {module: (kind, copy)}


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through `packed`, the packed copy of weight (from `form`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packing_works(device: torch.device) -> bool:
    """Whether oneDNN-packed linears exist on `device` and agree with `F.linear` (probed once)."""
    if device.type not in DEVICES:
        return False
    if device.type not in _probes:
        ok = False
        try:
            if torch.backends.mkldnn.is_available():
                g = torch.Generator().manual_seed(0)
                w, b, x = (torch.randn(s, generator=g) for s in ((64, 32), (64,), (5, 32)))
                with torch.no_grad():
                    ok = torch.allclose(packed_linear(x, _pack(w), b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        except (RuntimeError, AttributeError, NotImplementedError, TypeError):
            ok = False
        _probes[device.type] = ok
    return _probes[device.type]


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    key = (weight.size(1), weight.device)
    if key not in _vectors:
        _vectors[key] = torch.randn(weight.size(1), generator=torch.Generator().manual_seed(0)).to(weight.device)
    return torch.mv(weight.detach(), _vectors[key])


def _identity(weight: torch.Tensor) -> tuple:
    # Inference-mode tensors have no version counter (the fingerprint still checks their content).
    version = None if weight.is_inference() else weight._version
    return weight.data_ptr(), version, tuple(weight.shape), tuple(weight.stride()), weight.dtype


_BUILD = {"packed": _pack, "input_major": lambda w: w.detach().t().contiguous()}


def _cached(weight: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    """The cached `kind` copy of `weight` if its identity and fingerprint still match, else None
    (a stale copy is dropped at once)."""
    entries = _cache.get(weight)
    entry = None if entries is None else entries.get(kind)
    if entry is None:
        return None
    if entry[0] != _identity(weight) or not torch.equal(entry[1], _fingerprint(weight)):
        del entries[kind]
        return None
    entry[3] = next(_uses)
    return entry[2]


def _build(weight: torch.Tensor, kind: str) -> torch.Tensor:
    entry = [_identity(weight), _fingerprint(weight), _BUILD[kind](weight), next(_uses)]
    _cache.setdefault(weight, {})[kind] = entry
    return entry[2]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _make_room(keep: set, room: int) -> None:
    """Drop the least recently used copies whose ids are not in `keep` until the cache holds at most
    BUDGET_BYTES - `room` (the bytes about to be added)."""
    entries = sorted(((e[3], weight, kind, _nbytes(e[2])) for weight, kinds in _cache.items()
                      for kind, e in kinds.items() if id(e[2]) not in keep), key=lambda x: x[0])
    total = sum(_nbytes(e[2]) for kinds in _cache.values() for e in kinds.values())
    for _, weight, kind, size in entries:
        if total + room <= BUDGET_BYTES:
            break
        del _cache[weight][kind]
        total -= size


def _eligible(weight: torch.Tensor) -> bool:
    return (weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type in DEVICES
            and weight.is_contiguous())


@contextmanager
def active(linears: Iterable[nn.Module], heads: Iterable[torch.Tensor], rows: int, compiled: bool = False):
    """Prepare copies for this thread until exit, of the plain fp32 `nn.Linear` modules among
    `linears` and of the (V, D) `heads`: packed when the decode forwards have `rows >= 2` or torch
    runs on several threads, else input-major; input-major also for one-row forwards in a compiled
    step (`compiled`), which cannot use packed ones.  Nested calls add to the outer one's copies."""
    linears, heads = list(linears), list(heads)
    with _lock:
        for w in [m.weight for m in linears if isinstance(m, nn.Linear)] + heads:
            if not _eligible(w):
                _cache.pop(w, None)  # e.g. the model was cast or moved since: its old copies are useless
    linears = [m for m in linears if type(m) is nn.Linear and _eligible(m.weight)]
    heads = [w for w in heads if _eligible(w)]
    # One row on one thread: input-major copies beat the packed ones; with more threads oneDNN's
    # packed product uses them all and MKL's one-row product does not (measured; module docstring).
    kind = "packed" if rows >= 2 or (torch.get_num_threads() > 1 and not compiled) else "input_major"
    if kind == "packed" and not all(packing_works(t.device) for t in [m.weight for m in linears] + heads):
        linears, kind = [], "input_major"  # the heads' input-major copies still serve one-row logits
    if sum(_nbytes(t) for t in [m.weight for m in linears] + heads) > BUDGET_BYTES:
        linears, heads = [], []
    outer_copies, outer_modules = getattr(_state, "copies", None), getattr(_state, "modules", None)
    copies = {key: dict(kinds) for key, kinds in (outer_copies or {}).items()}
    modules = dict(outer_modules or {})
    # An outer call's copy (more rows: a target sharing layers with its draft) stays.
    linears = [m for m in linears if m not in modules]
    wanted = {id(w): w for w in heads + [m.weight for m in linears]}
    with _lock, torch.no_grad():
        found = {key: _cached(w, kind) for key, w in wanted.items()}  # stale copies are gone from here on
        keep = ({id(c) for kinds in copies.values() for c in kinds.values()} | {id(c) for _, c in modules.values()}
                | {id(c) for c in found.values() if c is not None})
        _make_room(keep, sum(_nbytes(w) for key, w in wanted.items() if found[key] is None))  # before building
        for key, w in wanted.items():
            if found[key] is None:
                found[key] = _build(w, kind)
        for w in heads:
            copies.setdefault(id(w), {})[kind] = found[id(w)]
        for m in linears:
            modules[m] = (kind, found[id(m.weight)])
        del found
    _state.copies, _state.modules = copies, modules
    try:
        yield
    finally:
        _state.copies, _state.modules = outer_copies, outer_modules


def form(weight: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    """The prepared `kind` ("packed" or "input_major") copy of a head weight, None outside `active`."""
    copies = getattr(_state, "copies", None)
    return None if copies is None else copies.get(id(weight), {}).get(kind)


def _global_hooks() -> bool:
    """Whether hooks on every module's forward are registered (`register_module_forward_hook`)."""
    m = nn.modules.module
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, through the copy `active` prepared for it when the call is plain fp32
    inference (a packed copy not inside torch.compile)."""
    if torch.is_grad_enabled():
        return module(x)
    modules = getattr(_state, "modules", None)
    prepared = None if not modules else modules.get(module)
    if (prepared is None or x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)
            or module._forward_hooks or module._forward_pre_hooks or _global_hooks()):  # hooks see the call
        return module(x)
    kind, copy = prepared
    if kind == "input_major":  # also inside torch.compile: the copy is a graph input, read at every call
        flat = x.reshape(-1, x.size(-1))
        out = torch.mm(flat, copy) if module.bias is None else torch.addmm(module.bias, flat, copy)
        return out.view(*x.shape[:-1], copy.size(1))
    if torch.compiler.is_compiling():  # inductor cannot lower the packed op
        return module(x)
    return packed_linear(x, copy, module.bias)


def clear(weights: Optional[Iterable[torch.Tensor]] = None) -> None:
    """Free the cached copies of `weights` (default: all of them); they are also freed with their
    weights.  A training loop that generates between steps frees its model's copies this way, since
    the next step makes them stale."""
    if weights is None:
        _cache.clear()
        return
    for w in weights:
        _cache.pop(w, None)
