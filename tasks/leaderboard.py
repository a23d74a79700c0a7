"""The leaderboard's prediction files: ONE table of their names, what each answers and its values,
read by the task scripts (defaults of their output flags) and by `prepare_submit.py` (what to check).

Names as the starter's scripts write them under predictions/:
    {mode}-{sst,cfimdb}-{dev,test}-out.csv   classifier.py, mode = last-linear-layer | full-model
    para-{dev,test}-output.csv               paraphrase_detection.py
    generated_sonnets.txt                    sonnet_generation.py (test prompts)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.data import NO_TOKEN_ID, YES_TOKEN_ID
from tasks.sentiment import DATASETS, FINE_TUNE_MODES

PREDICTIONS_DIR = "predictions"
SONNET_TEST_FILE = "generated_sonnets.txt"
SONNET_DEV_FILE = "generated_sonnets_dev.txt"  # ours: the dev completions (not submitted)


@dataclass(frozen=True)
class PredictionFile:
    name: str  # file name under predictions/
    task: str  # sst | cfimdb | para | sonnet
    split: str  # dev | test
    data_file: str  # the data file (under data/) whose ids it answers
    values: tuple[int, ...] = ()  # allowed values of a CSV row


def sentiment_file(mode: str, dataset: str, split: str) -> str:
    return f"{mode}-{dataset}-{split}-out.csv"


def paraphrase_file(split: str) -> str:
    return f"para-{split}-output.csv"


def leaderboard_files(modes=FINE_TUNE_MODES) -> list[PredictionFile]:
    """Every file the leaderboard expects, for the given fine-tune modes."""
    out = []
    for mode in modes:
        for dataset, k in DATASETS.items():
            for split, data in (("dev", "dev"), ("test", "test-student")):
                out.append(PredictionFile(sentiment_file(mode, dataset, split), dataset, split,
                                          f"ids-{dataset}-{data}.csv", tuple(range(k))))
    for split, data in (("dev", "quora-dev.csv"), ("test", "quora-test-student.csv")):
        out.append(PredictionFile(paraphrase_file(split), "para", split, data, (YES_TOKEN_ID, NO_TOKEN_ID)))
    out.append(PredictionFile(SONNET_TEST_FILE, "sonnet", "test", "sonnets_held_out.txt"))
    return out


def default_path(name: str, predictions_dir: str | Path = PREDICTIONS_DIR) -> str:
    return str(Path(predictions_dir) / name)
