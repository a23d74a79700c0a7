"""File I/O with the guarantees the scripts promise: outputs are never half-written, logs survive a
kill in the middle of an append, and text that is not UTF-8 is reported with its file and line.

* `atomic_write(path, write)`: `write(tmp)` into a temporary file in the same directory, then
  `os.replace` -> readers see the old file or the whole new one; the temporary file is removed on
  any failure (also KeyboardInterrupt).
* `append_jsonl(path, record)`: one JSON object per line, appended and flushed; `read_jsonl_log`
  reads such a log back and skips a torn LAST line (what a kill during an append leaves), while a
  malformed line anywhere else is an error naming the line.
* `read_text(path)`: UTF-8 (a leading byte-order mark removed), universal newlines; invalid bytes
  raise `DataError` naming the file, line and byte offset.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from common.errors import DataError

BOM = "\ufeff"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
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


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """A whole JSON-lines file, atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """Every record of a JSON-lines file (blank lines skipped); a malformed line or a record lacking
    a `required` field is a DataError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, found {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}, line {n}: missing field(s) {missing}")
        rows.append(row)
    return rows


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one line.  A torn previous last line (no trailing newline: a kill during
    an append) is ended first, so the new record starts its own line."""
    path = Path(path)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8"))
        f.flush()


def read_jsonl_log(path: str | Path) -> list[dict]:
    """The records of an append-only log written by `append_jsonl`, skipping lines that are not a
    complete JSON object: what a kill during an append leaves (`append_jsonl` ends such a torn line,
    so the records after it stay intact).  A missing log has no records."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn append
        if isinstance(record, dict):
            out.append(record)
    return out


def read_text(path: str | Path, what: Optional[str] = None, universal_newlines: bool = True) -> str:
    """The text of a UTF-8 file with universal newlines and no byte-order mark.  Invalid UTF-8 is a
    DataError naming the file, line and byte offset (`what` describes the file in the message).
    `universal_newlines=False` keeps every CR (for a `csv` reader, which handles line ends itself)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" + (f" ({what})" if what else ""))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: byte {exc.start} ({raw[exc.start:exc.start + 1]!r}) is not valid "
                        f"UTF-8; save the file as UTF-8" + (f" ({what})" if what else "")) from None
    if text.startswith(BOM):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n") if universal_newlines else text
