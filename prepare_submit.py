"""Check every prediction file the CS224N leaderboard expects, then bundle the submission zip.

Checked against the data files: sentiment predictions for each `--modes` entry (SST and CFIMDB, dev
and test), paraphrase predictions (dev and test) and the generated sonnets (one per prompt of
`sonnets_held_out.txt`, numbered 0, 1, ... in prompt order, each starting with its prompt's first
line).  Each CSV must have the starter's exact header and one row `{id}, {value} ` per input id (no
id missing, extra or repeated; values in range): exactly what the starter's `classifier.py`,
`paraphrase_detection.py` and `sonnet_generation.py` write, and what our scripts write.  Anything
missing or malformed is named and the exit status is 1.

The zip follows the starter's `prepare_submit.py`: named `cs224n_default_final_project_submission.zip`,
holding the `.py` files at the top level of the repository, and the files in `models/`, `modules/`
and `predictions/`.  Never inside it: the zip itself or any other `.zip` (an earlier submission in
`predictions/` is not packed again), caches (`__pycache__`), checkpoints (`*.pt`, `*.bin`,
`*.safetensors`, `*.ckpt`), and nothing from `data/`, `runs/` or environments (they are not among
the folders packed).  The file list is fixed before the zip is opened and the zip is written to a
temporary file renamed into place, so `--out` may lie inside `--predictions_dir`.

    python prepare_submit.py                       # both fine-tune modes
    python prepare_submit.py --modes full-model --check_only
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from collections import Counter
from pathlib import Path

from common.io import atomic_write
from tasks.data import (PARAPHRASE_HEADER, SENTIMENT_HEADER, DataError, read_paraphrase, read_predictions,
                        read_sentiment)
from tasks.leaderboard import FINE_TUNE_MODES, leaderboard_files

ZIP_NAME = "cs224n_default_final_project_submission.zip"  # the starter's name
PACKED_DIRS = ("models", "modules")  # besides the top-level .py files and the predictions
NEVER_PACKED = (".zip", ".pt", ".bin", ".safetensors", ".ckpt", ".pyc", ".tmp")  # outputs, checkpoints, caches


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=FINE_TUNE_MODES, default=list(FINE_TUNE_MODES),
                   help="fine-tune modes whose sentiment files are expected")
    p.add_argument("--data_dir", default="data", help="the CS224N data files the predictions answer")
    p.add_argument("--predictions_dir", default="predictions")
    p.add_argument("--out", default=ZIP_NAME, help="the submission zip (the starter's name by default)")
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
    want, got = list(range(len(prompts))), [n for n, _ in generated]
    if got != want:
        return [f"{out}: sonnets numbered {got}, expected 0..{len(prompts) - 1} (the starter's 0-based index, one "
                f"per prompt of {prompts_path}, in its order)"]
    return [f"{out}: sonnet {i} does not start with the first line of prompt {i} (sonnet {number} of {prompts_path})"
            for i, ((_, text), (number, prompt)) in enumerate(zip(generated, prompts))
            if not text.startswith(prompt.split("\n")[0])]


def _packable(path: Path, out: Path) -> bool:
    return (path.is_file() and not path.is_symlink() and path.resolve() != out and not path.name.startswith(".")
            and not path.name.endswith(NEVER_PACKED) and "__pycache__" not in path.parts)


def submission_files(root: Path, predictions: Path, out: Path) -> list[tuple[Path, str]]:
    """(file, name in the zip), the starter's rule: the .py files at the top of `root`, the files in
    `root`/models and `root`/modules, and the files in `predictions` (as predictions/NAME); never
    `out` itself, another zip, a checkpoint or a cache (NEVER_PACKED)."""
    out = out.resolve()
    files = [(p, p.name) for p in sorted(root.glob("*.py")) if _packable(p, out)]
    for folder in PACKED_DIRS:
        files += [(p, f"{folder}/{p.name}") for p in sorted((root / folder).iterdir()) if _packable(p, out)]
    files += [(p, f"predictions/{p.name}") for p in sorted(predictions.iterdir()) if _packable(p, out)]
    return files


def write_zip(out: Path, files: list[tuple[Path, str]]) -> Path:
    """The zip of `files`, written to a temporary file next to `out` and renamed into place."""
    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for path, name in files:
                zf.write(path, name)
    return atomic_write(out, write)


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
    out = Path(args.out)
    files = submission_files(Path(__file__).resolve().parent, Path(args.predictions_dir), out)  # before the zip exists
    write_zip(out, files)
    print(f"wrote {args.out} ({len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
