"""Reading and writing GPT-2 checkpoints in Hugging Face's format.

One explicit name map (`name_map(n_layer)`: `TOP_NAME_MAP` plus `LAYER_NAME_MAP` for every layer)
relates every Hugging Face tensor to ours.  HF's GPT-2
stores its projections as `Conv1D` with weights laid out (in, out); ours are `nn.Linear`
(out, in), so those are transposed, and HF's fused `c_attn` is split into our separate
query/key/value projections.  Every key and every shape is checked; nothing is loaded by
assigning `.data`, and no pickled code is ever executed (safetensors first, `.bin` only
through `torch.load(weights_only=True)`; both the zip and the older non-zip `.bin` layout).
Every floating-point tensor is checked for NaN and infinity as it is read: a file with
overwritten bytes is a `WeightsFileError` naming the file and the tensor, never a model that
trains on NaNs.  Hub names are looked up in the Hugging Face cache under both of their spellings
(`gpt2` and `openai-community/gpt2`).  Writing a complete export (weights, config, tokenizer,
generation config): `models/hf_export.py`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from config import GPT2Config

# HF key (under "h.{i}." for per-layer entries) -> (our keys (under "gpt_layers.{i}."), kind)
#   copy:   same layout
#   conv1d: HF (in, out) -> ours (out, in): transpose
#   split3: HF fused q|k|v along the last dim -> our three tensors (after the transpose for weights)
LAYER_NAME_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "ln_1.weight": (("attention_layer_norm.weight",), "copy"),
    "ln_1.bias": (("attention_layer_norm.bias",), "copy"),
    "attn.c_attn.weight": (("self_attention.query.weight", "self_attention.key.weight",
                            "self_attention.value.weight"), "split3_conv1d"),
    "attn.c_attn.bias": (("self_attention.query.bias", "self_attention.key.bias",
                          "self_attention.value.bias"), "split3"),
    "attn.c_proj.weight": (("attention_dense.weight",), "conv1d"),
    "attn.c_proj.bias": (("attention_dense.bias",), "copy"),
    "ln_2.weight": (("out_layer_norm.weight",), "copy"),
    "ln_2.bias": (("out_layer_norm.bias",), "copy"),
    "mlp.c_fc.weight": (("interm_dense.weight",), "conv1d"),
    "mlp.c_fc.bias": (("interm_dense.bias",), "copy"),
    "mlp.c_proj.weight": (("out_dense.weight",), "conv1d"),
    "mlp.c_proj.bias": (("out_dense.bias",), "copy"),
}
TOP_NAME_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "wte.weight": (("word_embedding.weight",), "copy"),
    "wpe.weight": (("pos_embedding.weight",), "copy"),
    "ln_f.weight": (("final_layer_norm.weight",), "copy"),
    "ln_f.bias": (("final_layer_norm.bias",), "copy"),
}
# Non-parameter tensors some older checkpoints carry (the causal-mask buffers); we build masks ourselves.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# The four OpenAI sizes live on the hub under two names: the short legacy id (what the CS224N
# starter and transformers users ask for, cached as models--gpt2) and the organisation's id (cached
# as models--openai-community--gpt2).  Either name finds a cache filled under either one.
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
CHECKPOINT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                       "pytorch_model.bin.index.json", "vocab.json", "merges.txt"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

def name_map(num_layers: int) -> dict[str, tuple[tuple[str, ...], str]]:
    """Every HF backbone key (without the `transformer.` prefix) -> our GPT2Model keys."""
    out = dict(TOP_NAME_MAP)
    for i in range(num_layers):
        for hf_key, (ours, kind) in LAYER_NAME_MAP.items():
            out[f"h.{i}.{hf_key}"] = (tuple(f"gpt_layers.{i}.{o}" for o in ours), kind)
    return out


def hf_to_ours(hf: torch.Tensor, kind: str) -> list[torch.Tensor]:
    if kind == "copy":
        return [hf]
    if kind == "conv1d":
        return [hf.t()]
    if kind == "split3":
        return list(hf.chunk(3, dim=-1))
    if kind == "split3_conv1d":
        return [w.t() for w in hf.chunk(3, dim=-1)]
    raise ValueError(kind)


def ours_to_hf(ours: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "copy":
        return ours[0]
    if kind == "conv1d":
        return ours[0].t()
    if kind == "split3":
        return torch.cat(ours, dim=-1)
    if kind == "split3_conv1d":
        return torch.cat([w.t() for w in ours], dim=-1)
    raise ValueError(kind)


# ---- finding a checkpoint ------------------------------------------------------------------
def resolve_checkpoint_dir(name_or_dir: str, allow_network: bool = True) -> Path:
    """A local directory as is; otherwise a hub repository through the Hugging Face cache
    (and, if `allow_network`, the hub itself)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name_or_dir}: expected a checkpoint directory (config.json + weights), got a file")
    if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {name_or_dir} does not exist")
    try:
        return hub_snapshot(name_or_dir, CHECKPOINT_PATTERNS, allow_network=allow_network, has=_has_checkpoint)
    except Exception as exc:  # network down, repo missing, ...
        repo = HUB_ALIASES.get(name_or_dir, name_or_dir)
        raise OSError(
            f"could not load GPT-2 checkpoint {name_or_dir!r}: it is not a local directory and neither the "
            f"Hugging Face cache (under {' or '.join(hub_names(name_or_dir))}) nor the hub could provide it "
            f"({type(exc).__name__}: {exc}).\n"
            f"Work offline by pointing at a local directory that holds config.json and "
            f"model.safetensors (or pytorch_model.bin), e.g. one made on a connected machine with "
            f"`huggingface-cli download {repo} --local-dir DIR`, then pass DIR instead of the name "
            f"(--model_size DIR in the scripts); or use --model_size tiny for a random smoke-test model."
        ) from exc


def _has_checkpoint(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any((directory / f).is_file() for f in WEIGHT_FILES)


def hub_names(name: str) -> list[str]:
    """Every hub id of the same repository: `gpt2` <-> `openai-community/gpt2` (and the other
    sizes), the given spelling first; any other name is only itself."""
    for short, full in HUB_ALIASES.items():
        if name in (short, full):
            return [name, full if name == short else short]
    return [name]


def hub_snapshot(name: str, patterns: list[str], allow_network: bool = True,
                 has: Callable[[Path], bool] = lambda d: True) -> Path:
    """Files of a hub repository through the Hugging Face cache: the cache first, under every name
    of the repository (`hub_names`), then the network unless `allow_network` is False or
    HF_HUB_OFFLINE is set.  `has(directory)` says whether a cached snapshot holds what is needed (a
    cache may hold only a tokenizer, or only a config)."""
    from huggingface_hub import constants, snapshot_download

    names, problems = hub_names(name), []
    for repo in names:  # offline machines that have the files cached never touch the network
        try:
            directory = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
        except Exception as exc:
            problems.append(f"{repo}: {type(exc).__name__}")
            continue
        if has(directory):
            return directory
        problems.append(f"{repo}: the cached snapshot {directory} lacks the files needed")
    if not allow_network or constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"not in the Hugging Face cache ({'; '.join(problems)})"
                                + ("; HF_HUB_OFFLINE is set, so the hub was not asked" if allow_network else ""))
    directory = Path(snapshot_download(names[0], allow_patterns=patterns))
    if not has(directory):
        raise FileNotFoundError(f"the hub's {names[0]} holds none of the files needed ({patterns})")
    return directory


class WeightsFileError(ValueError):
    """A weights file that cannot be read, holds non-finite values or does not fit the model; the
    message names the file (and the tensor) and what to do."""


def _checked(get: Callable[[], torch.Tensor], key: str, file: Path) -> Callable[[], torch.Tensor]:
    """`get`, reading tensor `key` of `file`, with read errors and NaN/inf reported by name."""
    def load() -> torch.Tensor:
        try:
            tensor = get()
        except Exception as exc:  # noqa: BLE001  (safetensors and torch raise their own types)
            raise WeightsFileError(f"{file}: tensor {key} cannot be read ({type(exc).__name__}: {exc}); the file is "
                                   f"truncated or corrupted: download or export it again") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsFileError(f"{file}: tensor {key} holds NaN or infinite values; the file is corrupted "
                                   f"(download or export it again) or comes from a diverged run")
        return tensor
    return load


def _load_bin(file: Path) -> dict:
    """A `pytorch_model.bin` state dict, memory-mapped when it is in torch's zip layout (the older
    non-zip layout cannot be mapped and is read whole)."""
    import zipfile

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as exc:  # noqa: BLE001
        refused = "weights_only" in str(exc) or "Weights only" in str(exc)
        what = "holds pickled objects other than tensors (refused: loading would run code)" if refused else \
            "cannot be read (truncated or corrupted; download or export it again)"
        raise WeightsFileError(f"{file}: {what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise WeightsFileError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def _tensor_sources(directory: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, loader) for every tensor in the checkpoint; tensors are read lazily, one at a time, and
    each loader raises WeightsFileError (naming file and tensor) for unreadable or non-finite data."""
    st_index, st_single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    bin_index, bin_single = directory / "pytorch_model.bin.index.json", directory / "pytorch_model.bin"
    if st_single.exists() or st_index.exists():
        from safetensors import safe_open

        files = ([st_single] if st_single.exists() else
                 sorted({directory / f for f in json.loads(st_index.read_text())["weight_map"].values()}))
        for f in files:
            try:
                handle_cm = safe_open(str(f), framework="pt")
            except Exception as exc:  # noqa: BLE001  (SafetensorError, OSError)
                raise WeightsFileError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
                                       f"truncated or corrupted: download or export it again") from None
            with handle_cm as handle:
                for key in handle.keys():
                    yield key, _checked(lambda h=handle, k=key: h.get_tensor(k), key, f)
        return
    if bin_single.exists() or bin_index.exists():
        files = ([bin_single] if bin_single.exists() else
                 sorted({directory / f for f in json.loads(bin_index.read_text())["weight_map"].values()}))
        for f in files:
            for key, tensor in _load_bin(f).items():
                yield key, _checked(lambda t=tensor: t, key, f)
        return
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin (nor a sharded index) found")


def read_hf_config(directory: Path) -> GPT2Config:
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: a GPT-2 checkpoint directory needs its config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from exc
    return GPT2Config.from_hf_dict(hf, name=directory.name)


def load_state_into(backbone: torch.nn.Module, directory: Path) -> None:
    """Copy every tensor of an HF checkpoint into `backbone` (a GPT2Model), checking keys and shapes."""
    mapping = name_map(backbone.config.num_hidden_layers)
    params = dict(backbone.named_parameters())
    loaded: set[str] = set()
    unexpected, mismatched, head = [], [], None
    for raw_key, get in _tensor_sources(directory):
        key = raw_key.removeprefix("transformer.")
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":  # tied to wte in GPT-2; checked once wte is loaded
            head = get()
            continue
        if key not in mapping:
            unexpected.append(raw_key)
            continue
        ours, kind = mapping[key]
        pieces = hf_to_ours(get(), kind)
        for our_key, tensor in zip(ours, pieces):
            target = params[our_key]
            if tuple(tensor.shape) != tuple(target.shape):
                mismatched.append(f"{raw_key} -> {our_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                continue
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(our_key)
        loaded.add(key)
    missing = sorted(k for ks, _ in mapping.values() for k in ks if k not in loaded)
    wte = params["word_embedding.weight"].detach()
    head_differs = (head is not None and "wte.weight" in loaded
                    and not torch.equal(head.to(device=wte.device, dtype=wte.dtype), wte))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:10]))
    if head_differs:
        problems.append("lm_head.weight differs from wte.weight, but GPT-2 ties them")
    if problems:
        raise WeightsFileError(f"checkpoint {directory} does not fit GPT-2 "
                         f"({backbone.config.num_hidden_layers} layers, width {backbone.config.hidden_size}): "
                         + " | ".join(problems))


STARTER_SHAPE_NAMES = {"hidden_size": "d", "num_hidden_layers": "l", "num_attention_heads": "num_heads"}


def load_hf_checkpoint(cls, name_or_dir: str, expected: Optional[dict] = None, **config_overrides):
    """`cls` built from the checkpoint's config.json (+ `config_overrides`) with its weights.
    `expected`: GPT2Config fields (the shape) the caller asserts; a mismatch is a ValueError."""
    directory = resolve_checkpoint_dir(name_or_dir)
    config = read_hf_config(directory)
    wrong = {k: v for k, v in (expected or {}).items() if getattr(config, k) != v}
    if wrong:
        given = ", ".join(f"{STARTER_SHAPE_NAMES.get(k, k)}={v}" for k, v in wrong.items())
        found = ", ".join(f"{STARTER_SHAPE_NAMES.get(k, k)}={getattr(config, k)}" for k in wrong)
        raise ValueError(f"from_pretrained(model={name_or_dir!r}, {given}): the checkpoint {directory} has {found} "
                         f"(its config.json); pass the sizes of that checkpoint, or leave d/l/num_heads out "
                         f"(they are read from config.json)")
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown config field {key!r}")
        setattr(config, key, value)
    if (directory / "quantization.json").is_file():  # written by quantize.py: packed integer weights
        from models.quant.io import load_quantized

        return load_quantized(cls, config, directory)
    model = cls(config)
    load_state_into(model.backbone, directory)
    return model


def hf_state_dict(backbone: torch.nn.Module, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Our backbone's weights under HF's names and layouts (no lm_head: it is tied)."""
    ours = dict(backbone.named_parameters())
    out = {}
    for hf_key, (our_keys, kind) in name_map(backbone.config.num_hidden_layers).items():
        out[prefix + hf_key] = ours_to_hf([ours[k].detach() for k in our_keys], kind).contiguous().cpu()
    return out
