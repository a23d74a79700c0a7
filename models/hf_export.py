"""Exports: a trained model as a complete Hugging Face directory that transformers' real clients
(AutoModelForCausalLM, AutoTokenizer, pipeline) load without us.

`save_hf_checkpoint` writes config.json (our GPT2Config in HF's names, `models/hf_io.py` map for the
weights), model.safetensors, generation_config.json and the tokenizer files, atomically; it refuses
to replace a directory that holds anything but a previous export.  Sparse attention patterns
(`modules/attention_patterns.py`) have no transformers counterpart: the pattern is recorded in
config.json (our loader restores it) and `dense_in_transformers_warning` says that transformers runs
such a model dense.  A LoRA run's adapter goes next to the weights in peft's own format, in
`ADAPTER_DIR` (written by `training/efficient.py`).
"""
from __future__ import annotations

import contextlib

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from config import SPARSE_ATTENTION_KEY, GPT2Config
from models.hf_io import hf_state_dict

# What an export directory holds (save_hf_checkpoint), and the sub-directory of a LoRA run's adapter in
# peft's own format (training/efficient.py save_peft_adapter).
ADAPTER_DIR = "lora_adapter"
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
                "tokenizer_config.json", ADAPTER_DIR)


def export_target_problem(directory: str | Path) -> Optional[str]:
    """Why writing an export to `directory` would be unsafe (None if it is not): saving replaces the
    directory, so it must be new, empty, or a previous export (only EXPORT_FILES inside, and
    sub-directories that are previous exports themselves, as a classifier run's DIR/sst)."""
    directory = Path(directory)
    if not directory.exists():
        return None
    if not directory.is_dir():
        return f"{directory} is a file, not a directory"
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in EXPORT_FILES
                     and not (p.is_dir() and not p.is_symlink() and export_target_problem(p) is None))
    if foreign:
        return (f"{directory} already holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                f"writing an export there would delete; choose a new or empty directory (or a previous export)")
    return None


def sparse_attention_summary(config: GPT2Config) -> Optional[str]:
    """A description of the model's sparse attention, or None when every layer is dense."""
    from modules.attention_patterns import layer_patterns

    sparse = [i for i, p in enumerate(layer_patterns(config)) if p != "dense"]
    if not sparse:
        return None
    return (f"{config.attention} attention (window {config.attention_window}) in layer(s) "
            f"{', '.join(map(str, sparse))}")


def dense_in_transformers_warning(config: GPT2Config) -> Optional[str]:
    summary = sparse_attention_summary(config)
    if summary is None:
        return None
    return (f"this model uses {summary}; transformers has no such attention and will run every layer DENSE, "
            f"so its outputs differ from ours.  config.json records the pattern under "
            f"'{SPARSE_ATTENTION_KEY}', and our loader (from_pretrained, --init_checkpoint) restores it")


def generation_defaults(config: GPT2Config, extra: Optional[dict] = None) -> dict:
    """generation_config.json: GPT-2's special tokens (as the hub's gpt2 has them, plus pad = EOS as
    everywhere here) and any decoding settings given in `extra` (transformers' names)."""
    return {"bos_token_id": config.eos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id, **(extra or {})}


def save_hf_checkpoint(backbone: torch.nn.Module, directory: str | Path, tokenizer=None,
                       generation: Optional[dict] = None,
                       write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a complete Hugging Face directory atomically (into a temp dir, then renamed):
    config.json, model.safetensors, generation_config.json, and the tokenizer (vocab.json,
    merges.txt, tokenizer_config.json; `tokenizer` as `models.tokenizer.write_tokenizer_files`
    takes it), so that AutoModelForCausalLM, AutoTokenizer and `pipeline` load the directory alone.

    `write_extra(tmp_dir)` adds files before the rename (a LoRA run's adapter, ADAPTER_DIR).
    `directory` must be new, empty or a previous export (it is replaced).  A model with sparse
    attention is saved with its pattern in config.json and a warning: transformers runs it dense."""
    import warnings

    from safetensors.torch import save_file

    from models.tokenizer import write_tokenizer_files

    if getattr(backbone, "quantization", None) is not None:  # quantize.py's packed integer format
        from models.quant.io import save_quantized

        return save_quantized(backbone, directory, tokenizer)
    directory = Path(directory)
    problem = export_target_problem(directory)
    if problem:
        raise ValueError(problem)
    note = dense_in_transformers_warning(backbone.config)
    if note:
        warnings.warn(f"saving {directory}: {note}", UserWarning, stacklevel=3)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(backbone.config.to_hf_dict(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_defaults(backbone.config, generation), indent=2) + "\n")
        write_tokenizer_files(tmp, tokenizer, backbone.config.max_position_embeddings)
        save_file(hf_state_dict(backbone), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if write_extra is not None:
            write_extra(tmp)
    return directory


@contextlib.contextmanager
def atomic_directory(directory: str | Path):
    """Yield a temporary directory beside `directory`; when the block succeeds it takes `directory`'s
    place (readers see the old directory or the whole new one); on failure it is removed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp", dir=directory.parent))
    try:
        yield tmp
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
