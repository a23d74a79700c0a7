"""Check every prediction file the CS224N leaderboard expects, then bundle the submission zip.

Checked against the data files: sentiment predictions for each `--modes` entry (SST and CFIMDB, dev
and test), paraphrase predictions (dev and test) and the generated sonnets (one per prompt of
`sonnets_held_out.txt`, same numbers).  Each CSV must have the exact header and one well-formed
row per input id (no id missing, extra or repeated; values in range).  Anything missing or
malformed is named and the exit status is 1; otherwise the zip holds every `*.py` of the repository
(not data/, runs/, checkpoints/, .venv/) and everything in `predictions/`, like the starter's.

    python prepare_submit.py                       # both fine-tune modes
    python prepare_submit.py --modes full-model --check_only
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from collections import Counter
from pathlib import Path

from tasks.data import (PARAPHRASE_HEADER, SENTIMENT_HEADER, DataError, read_paraphrase, read_predictions,
                        read_sentiment)
from tasks.leaderboard import FINE_TUNE_MODES, leaderboard_files

EXCLUDED_DIRS = {".git", ".venv", "venv", "data", "runs", "checkpoints", "__pycache__", ".pytest_cache"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=FINE_TUNE_MODES, default=list(FINE_TUNE_MODES),
                   help="fine-tune modes whose sentiment files are expected")
    p.add_argument("--data_dir", default="data", help="the CS224N data files the predictions answer")
    p.add_argument("--predictions_dir", default="predictions")
    p.add_argument("--out", default="cs224n_default_final.zip", help="the submission zip")
    p.add_argument("--check_only", action="store_true", help="check the predictions, write no zip")
    return p.parse_args(argv)


def _compare_ids(pred_path: Path, rows: list[tuple[str, int]], data_path: Path, ids: list[str]) -> list[str]:
    problems = []
    got = Counter(i for i, _ in rows)
    repeated = [i for i, c in got.items() if c > 1]
    missing = [i for i in ids if i not in got]
    extra = [i for i in got if i not in set(ids)]
    for what, items in (("repeated ids", repeated), ("ids missing (present in " + str(data_path) + ")", missing),
                        ("ids not in " + str(data_path), extra)):
        if items:
            problems.append(f"{pred_path}: {len(items)} {what}, e.g. {items[:3]}")
    return problems


def check(args: argparse.Namespace) -> list[str]:
    """Every problem found, as one line each naming the file (the files: tasks/leaderboard.py)."""
    data, pred = Path(args.data_dir), Path(args.predictions_dir)
    header = {"sst": SENTIMENT_HEADER, "cfimdb": SENTIMENT_HEADER, "para": PARAPHRASE_HEADER}
    problems = []
    for entry in leaderboard_files(args.modes):
        pred_path, data_path = pred / entry.name, data / entry.data_file
        if entry.task == "sonnet":
            problems += _check_sonnets(pred_path, data_path)
            continue
        try:
            rows = read_predictions(pred_path, header[entry.task], entry.values)
            if entry.task == "para":
                ids = [e.id for e in read_paraphrase(data_path, labeled=False)]
            else:
                ids = [e.id for e in read_sentiment(data_path, len(entry.values), labeled=False)]
            problems += _compare_ids(pred_path, rows, data_path, ids)
        except DataError as exc:
            problems.append(str(exc))
    return problems


def _check_sonnets(out: Path, prompts_path: Path) -> list[str]:
    from tasks.sonnets import read_generated_sonnets, read_numbered_sonnets

    try:
        generated = read_generated_sonnets(out)
        prompts = read_numbered_sonnets(prompts_path)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    want, got = [n for n, _ in prompts], [n for n, _ in generated]
    if got != want:
        return [f"{out}: sonnets numbered {got}, expected one per prompt of {prompts_path}: {want}"]
    return [f"{out}: sonnet {n} does not start with its prompt's first line"
            for (n, text), (_, prompt) in zip(generated, prompts) if not text.startswith(prompt.split("\n")[0])]


def submission_files(root: Path, predictions: Path) -> list[tuple[Path, str]]:
    """(file, name in the zip): the repository's *.py files and predictions/*."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not any(part in EXCLUDED_DIRS for part in rel.parts) and not str(rel).startswith("bench/results"):
            files.append((path, str(rel)))
    files += [(p, f"predictions/{p.name}") for p in sorted(predictions.iterdir()) if p.is_file()]
    return files


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = check(args)
    if problems:
        print(f"{len(problems)} problem(s); no submission written:", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 1
    print("all prediction files present and well formed")
    if args.check_only:
        return 0
    files = submission_files(Path(__file__).resolve().parent, Path(args.predictions_dir))
    with zipfile.ZipFile(args.out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, name in files:
            zf.write(path, name)
    print(f"wrote {args.out} ({len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
