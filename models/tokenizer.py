"""Finding the GPT-2 BPE tokenizer (Radford et al., 2019; byte-level BPE, 50,257 tokens).

Resolution order: an explicit directory (`--tokenizer DIR`), then the environment variable
`GPT2_TOKENIZER_DIR`, then the model's checkpoint directory, then the hub's `gpt2` (through the
Hugging Face cache, where transformers and the CS224N starter keep it as `models--gpt2`; the
`models--openai-community--gpt2` spelling is found too, offline with HF_HUB_OFFLINE=1).  A directory
qualifies when it holds `vocab.json` and `merges.txt`.
"""
from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Optional

TOKENIZER_ENV = "GPT2_TOKENIZER_DIR"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _has_tokenizer_files(directory: Path) -> bool:
    return all((directory / f).is_file() for f in TOKENIZER_FILES)


def resolve_tokenizer_dir(explicit: Optional[str] = None, model_dir: Optional[str] = None) -> str:
    """The directory (or hub name) the tokenizer will be read from; see the module docstring."""
    if explicit:
        if not _has_tokenizer_files(Path(explicit)):
            raise FileNotFoundError(f"tokenizer directory {explicit}: expected vocab.json and merges.txt in that directory")
        return str(explicit)
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        if not _has_tokenizer_files(Path(env)):
            raise FileNotFoundError(f"{TOKENIZER_ENV}={env}: expected vocab.json and merges.txt in that directory")
        return env
    if model_dir and Path(model_dir).is_dir() and _has_tokenizer_files(Path(model_dir)):
        return str(model_dir)
    return "gpt2"


@lru_cache(maxsize=4)
def _load(source: str):
    from transformers import GPT2TokenizerFast

    from models.hf_io import hub_snapshot

    try:  # a hub name: the cache under either of its names (models--gpt2 or models--openai-community--gpt2)
        directory = source if Path(source).is_dir() else hub_snapshot(
            source, [*TOKENIZER_FILES, "tokenizer_config.json"], has=_has_tokenizer_files)
        tok = GPT2TokenizerFast.from_pretrained(str(directory))
    except Exception as exc:
        raise OSError(
            f"could not load the GPT-2 tokenizer from {source!r} ({type(exc).__name__}: {exc}).\n"
            f"Offline, point at a directory holding vocab.json and merges.txt with --tokenizer DIR "
            f"or the environment variable {TOKENIZER_ENV}=DIR (this repository's CI uses ../shared/data/gpt2-tokenizer)."
        ) from exc
    tok.pad_token = tok.eos_token  # GPT-2 has no pad token; padding is masked out anyway
    return tok


def load_tokenizer(explicit: Optional[str] = None, model_dir: Optional[str] = None):
    """The GPT-2 tokenizer (a `transformers.GPT2TokenizerFast`, shared and cached: do not mutate
    it; pass `padding_side=` per call instead), with pad = EOS."""
    return _load(resolve_tokenizer_dir(explicit, model_dir))


def write_tokenizer_files(directory: str | Path, tokenizer=None, model_max_length: int = 1024) -> list[str]:
    """Make `directory` carry its tokenizer: `vocab.json` and `merges.txt` copied byte for byte, and a
    `tokenizer_config.json` (GPT2Tokenizer, pad = EOS as everywhere here, the model's context as
    `model_max_length`), so that transformers' AutoTokenizer and `pipeline`, and our own loader, read
    the directory alone.  `tokenizer`: one from `load_tokenizer`, a directory, or None (the
    resolution order of this module).  Returns the names written."""
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(str(tokenizer) if tokenizer else None)
    source, directory = Path(tokenizer.name_or_path), Path(directory)
    if not _has_tokenizer_files(source):
        raise FileNotFoundError(f"tokenizer {tokenizer.name_or_path}: expected vocab.json and merges.txt in that "
                                f"directory to copy them next to the weights")
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, directory / name)
    eos = tokenizer.eos_token
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": int(model_max_length), "add_prefix_space": False,
              "bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [*TOKENIZER_FILES, "tokenizer_config.json"]
