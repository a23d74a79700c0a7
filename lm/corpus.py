"""Corpora for language modelling: finding data files, reading documents, packing token blocks.

Every file is read as UTF-8 (`common.io.read_text`: a byte-order mark dropped, invalid bytes a
`DataError` naming the line).  Documents come from plain text files (one file = one document), the Poetry Foundation CSV
(its `Poem` column, one poem = one document) or a `sonnets.txt`-style file (one sonnet = one
document, parsed by `evaluation.sonnets`).  For continued pretraining the documents are
tokenised, joined with `<|endoftext|>` (each document is followed by one) and cut into
fixed-length blocks, as in GPT-2's own training (Radford et al., 2019).
"""
from __future__ import annotations

import csv
import io
import random
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from common.errors import ConfigError, DataError
from common.io import read_text

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Corpora with a well-known home: `data/<name>` in the project (what setup.sh copies), else the
# shared read-only copy next to the project.
KNOWN_FILES = {
    "ptb/ptb.train.txt": "ptb/ptb.train.txt",
    "ptb/ptb.valid.txt": "ptb/ptb.valid.txt",
    "ptb/ptb.test.txt": "ptb/ptb.test.txt",
    "wikitext-2/test.txt": "wikitext-2/test.txt",
    "wikitext-2/valid.txt": "wikitext-2/valid.txt",
    "tinyshakespeare/input.txt": "tinyshakespeare/input.txt",
    "sonnets.txt": "cs224n/sonnets.txt",
    "poetry/PoetryFoundationData.csv": "poetry/PoetryFoundationData.csv",
}

FORMATS = ("auto", "text", "poetry_csv", "sonnets")


def find_data_file(relative: str) -> Path:
    """`data/<relative>` under the project root if it exists, else the shared copy
    (`../shared/data/...`); a clear error naming both places otherwise."""
    local = ROOT / "data" / relative
    if local.is_file():
        return local
    shared = SHARED_DATA / KNOWN_FILES.get(relative, relative)
    if shared.is_file():
        return shared
    raise FileNotFoundError(f"data file {relative!r} not found at {local} nor at {shared}; "
                            f"copy it into data/ (setup.sh --data-from DIR) or pass its path explicitly")


def normalize_newlines(text: str) -> str:
    """CRLF, the Poetry Foundation file's CR CR LF, and lone CR all become one LF."""
    return re.sub(r"\r+\n?", "\n", text)


def clean_poem(poem: str) -> str:
    """One poem as plain text: newlines normalised, trailing spaces and non-breaking spaces
    removed, leading/trailing blank lines dropped (inner indentation kept)."""
    lines = [line.replace("\xa0", " ").rstrip() for line in normalize_newlines(poem).split("\n")]
    return "\n".join(lines).strip("\n")


def read_poetry_csv(path: str | Path, column: str = "Poem") -> list[str]:
    """The non-blank poems of a Poetry Foundation CSV (Kaggle's layout: a `Poem` column whose
    cells hold embedded newlines)."""
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(read_text(path, "Poetry Foundation CSV", universal_newlines=False),
                                        newline=""))
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise DataError(f"{path}: no {column!r} column (columns: {reader.fieldnames}); "
                        f"is this the Poetry Foundation CSV?")
    try:
        poems = [clean_poem(row[column] or "") for row in reader]
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: {exc}") from None
    poems = [p for p in poems if p.strip()]
    if not poems:
        raise DataError(f"{path}: every {column!r} cell is blank")
    return poems


def detect_format(path: Path) -> str:
    if path.suffix.lower() == ".csv":
        return "poetry_csv"
    if path.name.startswith("sonnets") or path.name.startswith("TRUE_sonnets"):
        return "sonnets"
    return "text"


def read_documents(path: str | Path, fmt: str = "auto") -> list[str]:
    """Documents of one corpus file; `fmt` is one of FORMATS (`auto` picks by file name:
    `*.csv` -> poetry_csv, `sonnets*` -> sonnets, anything else -> one plain-text document)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such corpus file")
    if fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {FORMATS}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "poetry_csv":
        return read_poetry_csv(path)
    if fmt == "sonnets":
        from tasks.sonnets import read_sonnets

        return read_sonnets(path)
    text = normalize_newlines(read_text(path, "corpus file"))
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return [text]


def join_documents(token_lists: Sequence[Sequence[int]], eos_id: int) -> list[int]:
    """One stream: every document followed by `eos_id` (`<|endoftext|>` for GPT-2)."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(eos_id)
    return stream


def pack_blocks(stream: Sequence[int], block_size: int, allow_empty: bool = False) -> tuple[torch.Tensor, list[int]]:
    """The one sequence packer: cut a token stream into consecutive, non-overlapping blocks of
    `block_size` tokens: returns (blocks (num_blocks, block_size), tail).  Every token lands in
    exactly one block, in order, except the final `len(stream) % block_size` tokens (the tail,
    fewer than one block), returned separately: callers train on it or drop it.  A stream shorter
    than one block is an error unless `allow_empty` (then: no blocks, all of it the tail)."""
    if block_size < 2:
        raise ConfigError("block_size", f"must be >= 2 (a block predicts its tokens 1..T-1), got {block_size}")
    num_blocks = len(stream) // block_size
    if num_blocks == 0 and not allow_empty:
        raise ConfigError("block_size", f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}; "
                          f"use shorter blocks or add text")
    body = torch.tensor(list(stream[:num_blocks * block_size]), dtype=torch.long)
    return body.view(num_blocks, block_size), list(stream[num_blocks * block_size:])


def split_documents(docs: Sequence[str], valid_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, valid) documents.  With several documents a seeded shuffle sends
    round(valid_fraction * n) of them (at least one) to valid, so no document is split; a
    single document is split by characters at a line break near the cut instead."""
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError("valid_fraction", f"must be in (0, 1), got {valid_fraction}")
    docs = list(docs)
    if len(docs) >= 2:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_valid = min(len(docs) - 1, max(1, round(valid_fraction * len(docs))))
        valid_idx = set(order[:n_valid])
        return ([d for i, d in enumerate(docs) if i not in valid_idx],
                [d for i, d in enumerate(docs) if i in valid_idx])
    (text,) = docs
    cut = int(len(text) * (1.0 - valid_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    train, valid = text[:cut], text[cut:]
    if not train.strip() or not valid.strip():
        raise ConfigError("valid_fraction", "the corpus is too small to split into train and valid; add text or "
                          "give a separate validation file")
    return [train], [valid]


def tokenize_corpus_file(path: str | Path, tokenizer, max_tokens: Optional[int] = None) -> torch.Tensor:
    """One corpus file (`read_documents`) as a token stream, every document followed by EOS, the
    format `pretrain.py` trains on; with `max_tokens`, only the first tokens (only a generous prefix
    of the characters is tokenised)."""
    docs = read_documents(path)
    if max_tokens is not None:
        kept, budget = [], max_tokens * 8
        for doc in docs:
            kept.append(doc[:budget])
            budget -= len(kept[-1])
            if budget <= 0:
                break
        docs = kept
    stream = join_documents([tokenizer.encode(d, verbose=False) for d in docs], tokenizer.eos_token_id)
    return torch.tensor(stream[:max_tokens] if max_tokens else stream, dtype=torch.long)
