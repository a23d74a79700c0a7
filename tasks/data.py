"""Readers and writers for the CS224N "Build GPT-2" task files, strict about their layout.

Input files are tab-separated with a leading unnamed index column; columns are read BY NAME
(`id`, `sentence`, `sentiment`, `sentence1`, `sentence2`, `is_duplicate`), because the
`*-test-student.csv` files carry an odd header (`0`, ``, `id`, `sentence`).  Files are UTF-8 (a
byte-order mark is dropped; invalid bytes are an error naming the line: `common.io.read_text`).

One line is one record.  A field that is quoted as a whole (`"..."`, inner quotes doubled) is
unquoted as Python's `csv` module would (the starter's `csv.DictReader(fp, delimiter='\\t')`), so
every well-formed row reads as it did there; any other quote is an ordinary character.  The `csv`
module instead lets a stray opening quote run on across tabs and line ends, silently merging every
following row into one field (rows vanish); here such a field is kept as written and reported.

Quora files come in the layouts found in the wild: with or without a header line, with or without
the leading index column, labels `1`/`0` or `1.0`/`0.0`, test files without labels.

No row is ever dropped: a malformed row raises `DataError` naming the file and line.  Prediction
writers check that there is one prediction per input id before writing (atomically), byte for byte
in the layout of the GPT-2 starter's writers (`classifier.py` / `paraphrase_detection.py` write
`f"id \\t Predicted_Sentiment \\n"` then `f"{p}, {s} \\n"` per row):

    id \\t Predicted_Sentiment \\n          then   {id}, {label} \\n
    id \\t Predicted_Is_Paraphrase \\n      then   {id}, {token id} \\n

(no space before the comma: `{id} , {value}` is the older minBERT project's format, which the GPT-2
leaderboard does not use).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from common.errors import DataError
from common.io import atomic_write_text, read_text

SENTIMENT_HEADER = "id \t Predicted_Sentiment "
PARAPHRASE_HEADER = "id \t Predicted_Is_Paraphrase "
YES_TOKEN_ID = 8505  # "yes" in the GPT-2 vocabulary (no leading space)
NO_TOKEN_ID = 3919  # "no"
_BR = re.compile(r"\s*<br\s*/?>\s*", re.IGNORECASE)


@dataclass(frozen=True)
class SentimentExample:
    id: str
    text: str
    label: Optional[int]  # None for test files


@dataclass(frozen=True)
class ParaphraseExample:
    id: str
    sentence1: str
    sentence2: str
    label: Optional[int]  # 1 = paraphrase, 0 = not, None for test files


def clean_text(text: str) -> str:
    """Strip, and turn the HTML line breaks of CFIMDB reviews (`<br />`) into newlines."""
    return _BR.sub("\n", text).strip()


_QUOTED = re.compile(r'"((?:[^"]|"")*)"')


def _field(raw: str) -> tuple[str, bool]:
    """(value, well_formed): a field quoted as a whole loses its quotes (`""` -> `"`), as in `csv`;
    a field that opens a quote it does not close is kept as written (well_formed False)."""
    m = _QUOTED.fullmatch(raw)
    if m:
        return m.group(1).replace('""', '"'), True
    return raw, not raw.startswith('"')


def _rows(path: str | Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line of a tab-separated file: one line, one record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (copy the CS224N data into data/, e.g. "
                        f"`mkdir -p data && cp ../shared/data/cs224n/* data/`, or pass the path flag)")
    out, stray = [], []
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        fields = []
        for raw in line.split("\t"):
            value, ok = _field(raw)
            fields.append(value)
            if not ok:
                stray.append(n)
        out.append((n, fields))
    if stray:
        print(f"warning: {path}: {len(stray)} field(s) open a quote they do not close (lines "
              f"{', '.join(map(str, stray[:5]))}{', ...' if len(stray) > 5 else ''}); the quote is read as a "
              f"character and every row is kept", file=sys.stderr)
    return out


def _parse_label(raw: str, num_labels: int, path, line: int, column: str) -> int:
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}, line {line}: {column} {raw!r} is not a number") from None
    if not value.is_integer() or not 0 <= value < num_labels:
        raise DataError(f"{path}, line {line}: {column} {raw!r} is out of range "
                        f"(expected an integer in 0..{num_labels - 1})")
    return int(value)


def _check_nonempty_unique(path, ids_lines: list[tuple[str, int]]) -> None:
    if not ids_lines:
        raise DataError(f"{path}: no examples (empty split)")
    seen: dict[str, int] = {}
    for id_, line in ids_lines:
        if not id_:
            raise DataError(f"{path}, line {line}: empty id")
        if id_ in seen:
            raise DataError(f"{path}, line {line}: duplicate id {id_!r} (first seen on line {seen[id_]})")
        seen[id_] = line


def _columns(path, header: list[str], needed: Sequence[str]) -> dict[str, int]:
    names = [h.strip() for h in header]
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(f"{path}, line 1: header {names} lacks column(s) {missing}")
    return {c: names.index(c) for c in names if c}


def read_sentiment(path: str | Path, num_labels: int, labeled: bool = True) -> list[SentimentExample]:
    """SST / CFIMDB examples.  `labeled=False` reads test files (any `sentiment` column is ignored)."""
    rows = _rows(path)
    if not rows:
        raise DataError(f"{path}: empty file")
    (_, header), body = rows[0], rows[1:]
    cols = _columns(path, header, ["id", "sentence"] + (["sentiment"] if labeled else []))
    out, ids = [], []
    for line, fields in body:
        if len(fields) != len(header):
            raise DataError(f"{path}, line {line}: {len(fields)} tab-separated columns, expected "
                            f"{len(header)} like the header")
        label = _parse_label(fields[cols["sentiment"]], num_labels, path, line, "sentiment") if labeled else None
        ex = SentimentExample(fields[cols["id"]].strip(), clean_text(fields[cols["sentence"]]), label)
        out.append(ex)
        ids.append((ex.id, line))
    _check_nonempty_unique(path, ids)
    return out


_QUORA_COLUMNS = ["id", "sentence1", "sentence2", "is_duplicate"]


def _is_label(text: str) -> bool:
    return text.strip() in {"0", "1", "0.0", "1.0"}


def read_paraphrase(path: str | Path, labeled: bool = True) -> list[ParaphraseExample]:
    """Quora pairs in any of the layouts described in the module docstring.

    `labeled=False` reads test files: an `is_duplicate` column, if present, is ignored.  With
    `labeled=True` an EMPTY `is_duplicate` (two rows of the real quora-dev.csv, whose question holds
    an unbalanced quote) gives `label=None` and a warning naming the lines: the row is kept, so it
    gets a prediction, but it is neither trained on nor scored.  (The starter dropped such rows.)
    """
    rows = _rows(path)
    if not rows:
        raise DataError(f"{path}: empty file")
    first = [h.strip() for h in rows[0][1]]
    if "sentence1" in first and "sentence2" in first:  # a header line: read by name
        cols = _columns(path, rows[0][1], ["id", "sentence1", "sentence2"] + (["is_duplicate"] if labeled else []))
        width, body = len(first), rows[1:]
    else:  # no header: infer the layout from the first row's width and last field
        n = len(first)
        layouts = {5: ["", *_QUORA_COLUMNS], 3: ["id", "sentence1", "sentence2"]}
        if n == 4:
            names = _QUORA_COLUMNS if _is_label(first[-1]) else ["", "id", "sentence1", "sentence2"]
        elif n in layouts:
            names = layouts[n]
        else:
            raise DataError(f"{path}, line {rows[0][0]}: {n} tab-separated columns and no header; expected "
                            f"[index,] id, sentence1, sentence2[, is_duplicate]")
        if labeled and "is_duplicate" not in names:
            raise DataError(f"{path}: no is_duplicate column (labels) in a headerless file of {n} columns")
        cols = {c: i for i, c in enumerate(names) if c}
        width, body = n, rows
    out, ids, unlabeled = [], [], []
    for line, fields in body:
        if len(fields) != width:
            raise DataError(f"{path}, line {line}: {len(fields)} tab-separated columns, expected {width}")
        label = None
        if labeled:
            raw = fields[cols["is_duplicate"]]
            if raw.strip():
                label = _parse_label(raw, 2, path, line, "is_duplicate")
            else:
                unlabeled.append(line)
        ex = ParaphraseExample(fields[cols["id"]].strip(), fields[cols["sentence1"]].strip(),
                               fields[cols["sentence2"]].strip(), label)
        out.append(ex)
        ids.append((ex.id, line))
    _check_nonempty_unique(path, ids)
    if unlabeled:
        print(f"warning: {path}: {len(unlabeled)} row(s) with an empty is_duplicate (lines "
              f"{', '.join(map(str, unlabeled[:5]))}{', ...' if len(unlabeled) > 5 else ''}); they are kept "
              f"for predictions but carry no label (not trained on, not scored)", file=sys.stderr)
    return out


# ---- prediction files -----------------------------------------------------------------------
def write_predictions(path: str | Path, header: str, ids: Sequence[str], values: Sequence[int],
                      expected_rows: Optional[int] = None) -> Path:
    """Write `header` then `{id}, {value} ` per row (the starter's `f"{p}, {s} \\n"`); refuses a row count
    that differs from the input's."""
    if len(ids) != len(values):
        raise ValueError(f"{path}: {len(ids)} ids but {len(values)} predictions")
    if expected_rows is not None and len(ids) != expected_rows:
        raise ValueError(f"{path}: {len(ids)} predictions for {expected_rows} input rows; refusing to write")
    bad = [i for i in ids if not _PREDICTION_ID.fullmatch(str(i))]
    if bad:
        raise ValueError(f"{path}: ids must be non-empty without spaces or commas (the row format "
                         f"'{{id}}, {{value}} '), got {bad[:3]}")
    lines = [f"{header}\n"] + [f"{i}, {int(v)} \n" for i, v in zip(ids, values)]
    return atomic_write_text(path, "".join(lines))


def write_sentiment_predictions(path, ids, labels, expected_rows=None) -> Path:
    return write_predictions(path, SENTIMENT_HEADER, ids, labels, expected_rows)


def write_paraphrase_predictions(path, ids, token_ids, expected_rows=None) -> Path:
    bad = [t for t in token_ids if int(t) not in (YES_TOKEN_ID, NO_TOKEN_ID)]
    if bad:
        raise ValueError(f"{path}: paraphrase predictions must be {YES_TOKEN_ID} or {NO_TOKEN_ID}, got {bad[:3]}")
    return write_predictions(path, PARAPHRASE_HEADER, ids, token_ids, expected_rows)


def read_predictions(path: str | Path, header: str, allowed: Sequence[int]) -> list[tuple[str, int]]:
    """(id, value) rows of a prediction file, checking the exact header and every row's form: exactly
    what the starter's writers produce (`{id}, {value} ` per line; CRLF line ends, as the starter
    writes them on Windows, are accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8", newline=None) as f:  # universal newlines: CRLF -> LF
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != header:
        raise DataError(f"{path}, line 1: expected the header {header!r}, found {(lines or [''])[0]!r}")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        m = _PREDICTION_ROW.fullmatch(line)
        if not m:
            hint = " (the minBERT format '{id} , {value} ' has a space before the comma)" \
                if re.fullmatch(r"\S+ , -?\d+ ?", line) else ""
            raise DataError(f"{path}, line {n}: expected '{{id}}, {{value}} ' as the starter writes it, "
                            f"found {line!r}{hint}")
        if int(m.group(2)) not in allowed:
            raise DataError(f"{path}, line {n}: value {m.group(2)} not in {sorted(allowed)}")
        out.append((m.group(1), int(m.group(2))))
    return out


_PREDICTION_ID = re.compile(r"[^\s,]+")
_PREDICTION_ROW = re.compile(rf"({_PREDICTION_ID.pattern}), (-?\d+) ")
