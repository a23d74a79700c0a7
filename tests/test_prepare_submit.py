"""prepare_submit.py: accepts a complete, well-formed prediction set (ours or the starter's); names
whatever is missing or malformed; zips by the starter's rule and never zips its own output."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import numpy as np

import prepare_submit
from conftest import ROOT
from cs224n_files import keyword_sentiment, quora_pairs, write_quora, write_sentiment, write_sonnets
from starter import STARTER, needs_starter, writer
from tasks.data import write_paraphrase_predictions, write_sentiment_predictions
from tasks.sonnets import write_generated_sonnets

SONNET_PROMPTS = [(145, "A\nB\nC"), (146, "D\nE\nF")]


def _data(tmp_path):
    """The data files (ids), and the predictions each should hold: {file name: (ids, values)}."""
    data = tmp_path / "data"
    data.mkdir()
    expected = {}
    for name, k in (("sst", 5), ("cfimdb", 2)):
        for split, file, test in (("dev", "dev", False), ("test", "test-student", True)):
            rows = keyword_sentiment(4, len(name) * 10 + len(split), k)
            write_sentiment(data / f"ids-{name}-{file}.csv", rows, test=test)
            expected[f"full-model-{name}-{split}-out.csv"] = ([r[0] for r in rows], [0, 1, 1, 0])
    for split, file, labels in (("dev", "quora-dev.csv", True), ("test", "quora-test-student.csv", False)):
        pairs = quora_pairs(3, len(file))
        write_quora(data / file, pairs, labels=labels)
        expected[f"para-{split}-output.csv"] = ([p[0] for p in pairs], [8505, 3919, 8505])
    write_sonnets(data / "sonnets_held_out.txt", SONNET_PROMPTS)
    return data, expected


def _complete_set(tmp_path):
    data, expected = _data(tmp_path)
    pred = tmp_path / "predictions"
    for name, (ids, values) in expected.items():
        write = write_paraphrase_predictions if name.startswith("para") else write_sentiment_predictions
        write(pred / name, ids, values)
    write_generated_sonnets(pred / "generated_sonnets.txt", ["A\nB\nC\nmore", "D\nE\nF\nmore"])
    return ["--modes", "full-model", "--data_dir", str(data), "--predictions_dir", str(pred)]


def test_complete_set_is_zipped_by_the_starters_rule(tmp_path, capsys):
    argv = _complete_set(tmp_path)
    assert prepare_submit.main([*argv, "--out", str(tmp_path / "sub.zip")]) == 0
    names = zipfile.ZipFile(tmp_path / "sub.zip").namelist()
    assert {"classifier.py", "models/gpt2.py", "modules/attention.py", "predictions/para-test-output.csv",
            "predictions/generated_sonnets.txt"} <= set(names)
    assert all("/" not in n or n.startswith(("models/", "modules/", "predictions/")) for n in names)
    assert not any(n.endswith((".pyc", ".zip")) or "__pycache__" in n for n in names)
    assert prepare_submit.ZIP_NAME == "cs224n_default_final_project_submission.zip"


def test_missing_and_malformed_files_are_named(tmp_path, capsys):
    argv = _complete_set(tmp_path)
    pred = tmp_path / "predictions"
    (pred / "full-model-sst-test-out.csv").unlink()
    lines = (pred / "para-dev-output.csv").read_text().splitlines(keepends=True)
    (pred / "para-dev-output.csv").write_text("".join(lines[:-1]))  # one row short
    text = (pred / "full-model-cfimdb-dev-out.csv").read_text()
    (pred / "full-model-cfimdb-dev-out.csv").write_text(text.replace(", 0 \n", ", 7 \n", 1))
    write_generated_sonnets(pred / "generated_sonnets.txt", ["A\nB\nC\nmore"])  # one sonnet short
    assert prepare_submit.main([*argv, "--out", str(tmp_path / "sub.zip")]) == 1
    err = capsys.readouterr().err
    assert "4 problem(s)" in err
    assert "full-model-sst-test-out.csv: file not found" in err
    assert "para-dev-output.csv: 1 ids missing" in err
    assert "full-model-cfimdb-dev-out.csv, line 2: value 7 not in [0, 1]" in err
    assert "generated_sonnets.txt: sonnets numbered [0], expected 0..1" in err
    assert not (tmp_path / "sub.zip").exists()


def test_sonnets_numbered_by_sonnet_number_are_refused(tmp_path, capsys):
    argv = _complete_set(tmp_path)
    (tmp_path / "predictions" / "generated_sonnets.txt").write_text(
        "--Generated Sonnets-- \n\n\n145\nA\nB\nC\n\n\n146\nD\nE\nF\n\n")  # our old numbering
    assert prepare_submit.main([*argv, "--check_only"]) == 1
    assert "sonnets numbered [145, 146], expected 0..1 (the starter's 0-based index" in capsys.readouterr().err


@needs_starter
def test_accepts_exactly_what_the_starter_writes(tmp_path, capsys):
    """Files written by the starter's own writing code (run from its scripts) pass the check."""
    data, expected = _data(tmp_path)
    pred = tmp_path / "predictions"
    pred.mkdir()
    for name, (ids, values) in expected.items():
        split = "dev" if "-dev-" in name else "test"
        if name.startswith("para"):
            writer("paraphrase_detection.py", f"para_{split}_out")(
                pred / name, **{f"{split}_para_sent_ids": ids, f"{split}_para_y_pred": list(np.array(values))})
        else:
            writer("classifier.py", f"{split}_out")(
                pred / name, **{f"{split}_sent_ids": ids, f"{split}_pred": list(np.array(values)), "dev_acc": 0.5})
    # the starter's sonnet writer: (index, f'{decoded_output}\n\n') per held-out sonnet
    writer("sonnet_generation.py", "sonnet_out")(pred / "generated_sonnets.txt", generated_sonnets=[
        (i, f"{prompt}\nand more\n\n") for i, (_, prompt) in enumerate(SONNET_PROMPTS)])
    argv = ["--modes", "full-model", "--data_dir", str(data), "--predictions_dir", str(pred), "--check_only"]
    assert prepare_submit.main(argv) == 0, capsys.readouterr().err


def _tree(root):
    """A repository with files the starter's rule packs and files it must not."""
    for rel in ("a.py", "b.py", "models/gpt2.py", "models/__init__.py", "modules/attention.py", "data/ids.csv",
                "runs/x/best.pt", ".venv/lib/site.py", "training/trainer.py", "predictions/README",
                "predictions/para-dev-output.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_zip_contents_follow_the_starters_rule(tmp_path):
    root = _tree(tmp_path / "repo")
    expected = {"a.py", "b.py", "models/gpt2.py", "models/__init__.py", "modules/attention.py", "predictions/README",
                "predictions/para-dev-output.csv"}
    out = root / "predictions" / prepare_submit.ZIP_NAME
    got = {name for _, name in prepare_submit.submission_files(root, root / "predictions", out)}
    assert got == expected
    if (STARTER / "prepare_submit.py").is_file():  # the starter's own script on the same tree, for reference
        shutil.copyfile(STARTER / "prepare_submit.py", tmp_path / "theirs.py")
        subprocess.run([sys.executable, str(tmp_path / "theirs.py")], cwd=root, check=True, capture_output=True)
        theirs = zipfile.ZipFile(root / prepare_submit.ZIP_NAME).namelist()
        assert set(theirs) == expected
    # what the starter would also take but we never pack: caches, checkpoints, zips, temporary files
    for rel in ("models/__pycache__/gpt2.cpython-312.pyc", "predictions/model.pt", "predictions/old.zip",
                "predictions/.generated_sonnets.txt.abc.tmp", "modules/w.safetensors"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    got = {name for _, name in prepare_submit.submission_files(root, root / "predictions", out)}
    assert got == expected


def test_out_inside_predictions_never_zips_itself(tmp_path, capsys):
    """Issue 14, item 1: with --out inside --predictions_dir and an earlier zip there, the zip being
    written was packed into itself and grew without end (27.9 GB in 10 minutes)."""
    argv = _complete_set(tmp_path)
    pred = tmp_path / "predictions"
    out = pred / prepare_submit.ZIP_NAME
    for earlier in (out, pred / "earlier-submission.zip"):  # earlier zips lying there, one at --out itself
        earlier.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    listed = [path for path, _ in prepare_submit.submission_files(ROOT, pred, out)]
    assert out not in listed and not any(p.suffix == ".zip" for p in listed)
    for _ in range(3):  # each run finds the previous run's zip in predictions/
        assert prepare_submit.main([*argv, "--out", str(out)]) == 0
        with zipfile.ZipFile(out) as zf:
            names = zf.namelist()
            assert zf.testzip() is None
        assert not any(n.endswith(".zip") for n in names)
        assert sorted(n for n in names if n.startswith("predictions/")) == sorted(
            f"predictions/{p.name}" for p in pred.iterdir() if not p.name.endswith(".zip"))
    assert out.stat().st_size < 2 * sum(p.stat().st_size for p in ROOT.glob("*.py")) + 10**6
    assert not list(pred.glob(".*.tmp"))  # the temporary zip was renamed into place
