"""Sonnet files in the CS224N starter's layouts: the numbered sonnet files and the generated output.

Two layouts, both plain text (CRLF or LF):

* `sonnets.txt`-style (`sonnets.txt`, `sonnets_held_out*.txt`, `TRUE_sonnets_held_out_dev.txt`):
  a free-form header, then each sonnet introduced by a line that holds only its number.
* the generated-sonnets output: a first line `--Generated Sonnets-- `, then for each sonnet
  `\\n{index}\\n{text}\\n\\n` with its 0-based index (exactly what the starter's
  `sonnet_generation.py` writes).

Files are read as UTF-8 (`common.io.read_text`: a byte-order mark is dropped, so it cannot hide the
first number line; invalid bytes are a `DataError` naming the line).  Parsing follows the starter's
`SonnetsDataset` (`re.split(r'\\n\\s*\\d+\\s*\\n', text)[1:]`, each piece stripped): a line
holding only digits (and whitespace) starts the next sonnet, and the text before the first such line
is the header.  So, as in the starter, a generated line made only of digits
would start a new sonnet.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from common.errors import DataError
from common.io import atomic_write_text, read_text

GENERATED_HEADER = "--Generated Sonnets--"
_NUMBER_LINE = re.compile(r"^\s*(\d+)\s*$")


def _read_text(path: str | Path) -> str:
    return read_text(path, "sonnet file")


def _split_numbered(text: str, path: str | Path) -> list[tuple[int, str]]:
    """(number, stripped sonnet text) for every number line of `text`; the header is dropped."""
    lines = text.split("\n")
    items: list[tuple[int, int, list[str]]] = []  # (number, line number of the number, body lines)
    for lineno, line in enumerate(lines, start=1):
        m = _NUMBER_LINE.match(line)
        if m:
            items.append((int(m.group(1)), lineno, []))
        elif items:
            items[-1][2].append(line)
    if not items:
        raise DataError(f"{path}: no sonnet found; each sonnet must be introduced by a line holding only "
                         f"its number (the layout of sonnets.txt)")
    out = []
    for number, lineno, body in items:
        sonnet = "\n".join(body).strip()
        if not sonnet:
            raise DataError(f"{path}, line {lineno}: sonnet {number} is empty (a number line followed by "
                             f"no text before the next number line or the end of the file)")
        out.append((number, sonnet))
    return out


def read_numbered_sonnets(path: str | Path) -> list[tuple[int, str]]:
    """(number, text) for each sonnet of a `sonnets.txt`-style file, in file order."""
    return _split_numbered(_read_text(path), path)


def sonnets_by_number(items: list[tuple[int, str]], path: str | Path) -> dict[int, str]:
    """number -> text of `read_numbered_sonnets` / `read_generated_sonnets` items; a number given twice
    is a DataError (pairing by number would be ambiguous)."""
    out: dict[int, str] = {}
    for number, text in items:
        if number in out:
            raise DataError(f"{path}: sonnet {number} appears twice; each number may appear once")
        out[number] = text
    return out


def read_sonnets(path: str | Path) -> list[str]:
    """The sonnets of a `sonnets.txt`-style file (text of each, stripped), in file order."""
    return [text for _, text in read_numbered_sonnets(path)]


def read_generated_sonnets(path: str | Path) -> list[tuple[int, str]]:
    """(index, text) for each sonnet of a `--Generated Sonnets--` file, in file order."""
    text = _read_text(path)
    first = text.split("\n", 1)[0]
    if first.strip() != GENERATED_HEADER:
        raise DataError(f"{path}, line 1: expected the header {GENERATED_HEADER!r}, found {first[:60]!r}; "
                         f"is this a generated-sonnets file (for sonnets.txt-style files use read_sonnets)?")
    return _split_numbered(text, path)


def write_generated_sonnets(path: str | Path, sonnets: Sequence[str]) -> Path:
    """Write `sonnets` (texts, in the order of their prompts) in the starter's generated-sonnets layout,
    atomically (a temporary file in the same directory, then a rename).

    Each sonnet is numbered by its 0-based position, as the starter's `sonnet_generation.py` does
    (`SonnetsDataset.__getitem__` returns `(idx, text)` and the index is what it writes), not by the
    sonnet number of its prompt: the leaderboard pairs the i-th generated sonnet with the i-th prompt.
    """
    parts = [f"{GENERATED_HEADER} \n\n"]
    for index, sonnet in enumerate(sonnets):
        if not isinstance(sonnet, str):
            raise TypeError(f"write_generated_sonnets takes the sonnet texts in prompt order (numbered 0, 1, ... "
                            f"as the starter does); item {index} is {type(sonnet).__name__}: {sonnet!r:.60}")
        parts.append(f"\n{index}\n{sonnet}\n\n")
    return atomic_write_text(path, "".join(parts))
