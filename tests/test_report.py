"""report.py / experiments/report.py: the table's numbers come from the runs' metrics logs (resumed
runs de-duplicated), flags that differ are the columns, --group_by means and sample stds match
numpy's, the figures are real PNGs; and a real 3-trial sweep of classifier.py from the command line
followed by report.py on its directory."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from common.io import append_jsonl
from cs224n_files import keyword_sentiment, write_sentiment
from experiments.report import differing_flags, group_table, table, write_report
from experiments.runs import find_runs, lookup

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread_subprocesses")

def fake_run(directory: Path, flags: dict, accs: list[float], *, resumed_at=None, memory=2**20 * 100):
    """A metrics.jsonl as the trainer writes it: start, step records, one epoch record per accuracy, done."""
    directory.mkdir(parents=True)
    log = directory / "metrics.jsonl"
    t = 1000.0
    append_jsonl(log, {"event": "start", "time": t, "task": "sst", "trainable_params": 1234, "args": flags,
                       "run": {"metric": "accuracy", "higher_is_better": True}})
    best, best_epoch = None, None
    for epoch, acc in enumerate(accs, 1):
        for step in (1, 2):
            append_jsonl(log, {"event": "step", "time": t, "epoch": epoch, "step": 2 * (epoch - 1) + step,
                               "batch": step * 10, "lr": 0.1, "train_loss": 1.0 / (2 * epoch + step)})
        if best is None or acc > best:
            best, best_epoch = acc, epoch
        t += 10
        record = {"event": "epoch", "time": t, "epoch": epoch, "train_loss": 0.5, "seconds": 7.5,
                  "dev": {"accuracy": acc, "f1": acc / 2}, "best_epoch": best_epoch,
                  "peak_memory_bytes": memory, "peak_memory_kind": "cuda"}
        append_jsonl(log, record)
        if resumed_at == epoch:  # killed after logging, resumed: the epoch is logged again
            append_jsonl(log, {"event": "resume", "time": t, "epoch": epoch - 1})
            append_jsonl(log, record)
    append_jsonl(log, {"event": "done", "time": t + 1, "best_epoch": best_epoch, "best": {"accuracy": best}})
    return directory


@pytest.fixture()
def runs_dir(tmp_path):
    for i, (r, seed, accs) in enumerate([(4, 1, [0.5, 0.7]), (4, 2, [0.6, 0.65]), (8, 1, [0.8, 0.75]),
                                         (8, 2, [0.7, 0.9])]):
        fake_run(tmp_path / "sweep" / f"trial-{i:03d}", {"--lora_r": r, "--seed": seed, "--lr": 1e-4},
                 accs, resumed_at=1 if i == 0 else None)
    return tmp_path / "sweep"


def test_runs_are_found_and_deduplicated(runs_dir):
    runs = find_runs([runs_dir])
    assert [r.name for r in runs] == ["sweep/trial-000", "sweep/trial-001", "sweep/trial-002", "sweep/trial-003"]
    assert [e["epoch"] for e in runs[0].epochs] == [1, 2] and len(runs[0].steps) == 4
    assert runs[0].value_at_best("dev_accuracy") == 0.7 and runs[2].best_epoch() == 1
    assert runs[2].value_at_best("dev_f1") == 0.4 and runs[0].train_seconds() == 15.0
    assert lookup({"dev": {"accuracy": 0.5}, "train_loss": 2.0}, "train_loss") == 2.0
    with pytest.raises(DataError, match="no training run there"):
        (runs_dir.parent / "empty").mkdir()
        find_runs([runs_dir.parent / "empty"])
    with pytest.raises(DataError, match="no such run directory"):
        find_runs([runs_dir.parent / "missing"])


def test_table_has_the_differing_flags_and_the_kept_epoch(runs_dir):
    runs = find_runs([runs_dir])
    assert differing_flags(runs) == ["--lora_r", "--seed"]  # --lr is the same everywhere
    lines = table(runs, "dev_accuracy").splitlines()
    assert lines[0] == ("| run | --lora_r | --seed | status | best epoch / epochs | dev_accuracy | dev_f1 | train s | "
                        "wall s | trainable params | peak memory MiB |")
    assert lines[2] == "| sweep/trial-000 | 4 | 1 | done | 2 / 2 | 0.7 | 0.35 | 15.0 | 21.0 | 1,234 | 100 (cuda) |"
    assert lines[4].split(" | ")[4:6] == ["1 / 2", "0.8"]


def test_group_by_gives_mean_and_sample_std_over_seeds(runs_dir):
    runs = find_runs([runs_dir])
    lines = group_table(runs, "lora_r", "dev_accuracy").splitlines()
    for line, values in ((lines[2], [0.7, 0.65]), (lines[3], [0.8, 0.9])):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(np.mean(values), rel=1e-3)
        assert float(cells[3]) == pytest.approx(np.std(values, ddof=1), rel=1e-3)
        assert cells[1] == "2"
    with pytest.raises(ConfigError, match="no run has this flag"):
        group_table(runs, "attention", "dev_accuracy")


def test_report_writes_markdown_and_pngs(runs_dir, tmp_path):
    import matplotlib.image

    path, tables = write_report(find_runs([runs_dir]), tmp_path / "rep", group_by="lora_r")
    text = path.read_text()
    assert "metric `dev_accuracy`" in text and "| lora_r | runs |" in text  # the default metric: the task's
    for name in ("train_loss.png", "dev_accuracy.png", "best_accuracy.png"):
        assert f"]({name})" in text
        image = matplotlib.image.imread(tmp_path / "rep" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert (tmp_path / "rep" / name).stat().st_size < 60_000


def test_sweep_then_report_from_the_command_line(tmp_path, tokenizer_dir):
    """Done-when of the issue: a 3-trial sweep of a real task script, then its report with plots."""
    files = []
    for split, n, test in (("train", 16, False), ("dev", 8, False), ("test", 4, True)):
        path = write_sentiment(tmp_path / f"cf-{split}.csv", keyword_sentiment(n, 5 + n, 2), test=test)
        files += [f"--cfimdb_{split}", str(path)]
    out = tmp_path / "sweep"
    sweep = subprocess.run(
        [sys.executable, "sweep.py", "--script", "classifier.py", "--trials", "3", "--metric", "dev_accuracy",
         "--space", "lr=loguniform(1e-4,1e-2) batch_size=choice(4,8)", "--out", str(out), "--sampler", "random",
         "--", "--model_size", "tiny", "--tokenizer", str(tokenizer_dir), "--datasets", "cfimdb", "--fine-tune-mode",
         "full-model", "--epochs", "1", "--device", "cpu", "--predictions_dir", str(tmp_path / "pred"), *files],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr + sweep.stdout
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["complete"] * 3
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == max(float(r["dev_accuracy"]) for r in rows)
    report = subprocess.run([sys.executable, "report.py", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    assert report.stdout.count("| sweep/trial-00") == 3 and "--batch_size" in report.stdout
    assert {p.name for p in out.glob("*.png")} == {"train_loss.png", "dev_accuracy.png", "best_accuracy.png"}
