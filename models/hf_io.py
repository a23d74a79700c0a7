"""Reading and writing GPT-2 checkpoints in Hugging Face's format.

One explicit name map (`NAME_MAP`) relates every Hugging Face tensor to ours.  HF's GPT-2
stores its projections as `Conv1D` with weights laid out (in, out); ours are `nn.Linear`
(out, in), so those are transposed, and HF's fused `c_attn` is split into our separate
query/key/value projections.  Every key and every shape is checked; nothing is loaded by
assigning `.data`, and no pickled code is ever executed (safetensors first, `.bin` only
through `torch.load(weights_only=True)`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

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

HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


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
    repo = HUB_ALIASES.get(name_or_dir, name_or_dir)
    try:
        return hub_snapshot(repo, allow_network=allow_network, patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                   "pytorch_model*.bin", "pytorch_model.bin.index.json", "vocab.json", "merges.txt"])
    except Exception as exc:  # network down, repo missing, ...
        raise OSError(
            f"could not load GPT-2 checkpoint {name_or_dir!r}: it is not a local directory and the "
            f"Hugging Face hub could not provide it ({type(exc).__name__}: {exc}).\n"
            f"Work offline by pointing at a local directory that holds config.json and "
            f"model.safetensors (or pytorch_model.bin), e.g. one made on a connected machine with "
            f"`huggingface-cli download {repo} --local-dir DIR`, then pass DIR instead of the name "
            f"(--model_size DIR in the scripts); or use --model_size tiny for a random smoke-test model."
        ) from exc


def hub_snapshot(repo: str, patterns: list[str], allow_network: bool = True) -> Path:
    """Files of a hub repository through the Hugging Face cache (the cache first, then the network)."""
    from huggingface_hub import snapshot_download

    try:  # offline machines that have the files cached never touch the network
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if not allow_network:
            raise
        return Path(snapshot_download(repo, allow_patterns=patterns))


def _tensor_sources(directory: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, loader) for every tensor in the checkpoint; tensors are read lazily, one at a time."""
    st_index, st_single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    bin_index, bin_single = directory / "pytorch_model.bin.index.json", directory / "pytorch_model.bin"
    if st_single.exists() or st_index.exists():
        from safetensors import safe_open

        files = ([st_single] if st_single.exists() else
                 sorted({directory / f for f in json.loads(st_index.read_text())["weight_map"].values()}))
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    yield key, (lambda h=handle, k=key: h.get_tensor(k))
        return
    if bin_single.exists() or bin_index.exists():
        files = ([bin_single] if bin_single.exists() else
                 sorted({directory / f for f in json.loads(bin_index.read_text())["weight_map"].values()}))
        for f in files:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            for key, tensor in state.items():
                yield key, (lambda t=tensor: t)
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
        raise ValueError(f"checkpoint {directory} does not fit GPT-2 "
                         f"({backbone.config.num_hidden_layers} layers, width {backbone.config.hidden_size}): "
                         + " | ".join(problems))


def load_hf_checkpoint(cls, name_or_dir: str, **config_overrides):
    directory = resolve_checkpoint_dir(name_or_dir)
    config = read_hf_config(directory)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown config field {key!r}")
        setattr(config, key, value)
    if (directory / "quantization.json").is_file():  # written by quantize.py: packed integer weights
        from quant.io import load_quantized

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


def save_hf_checkpoint(backbone: torch.nn.Module, directory: str | Path) -> Path:
    """Write config.json + model.safetensors atomically (into a temp dir, then renamed).
    A quantized model is written in its own format instead (quant/io.py)."""
    from safetensors.torch import save_file

    if getattr(backbone, "quantization", None) is not None:
        from quant.io import save_quantized

        return save_quantized(backbone, directory)

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(backbone.config.to_hf_dict(), indent=2) + "\n")
        save_file(hf_state_dict(backbone), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
