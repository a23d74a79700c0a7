"""prepare_submit.py: accepts a complete, well-formed prediction set; names whatever is missing or malformed."""
from __future__ import annotations

import zipfile

import prepare_submit
from cs224n_files import keyword_sentiment, quora_pairs, write_quora, write_sentiment, write_sonnets
from tasks.data import write_paraphrase_predictions, write_sentiment_predictions
from tasks.sonnets import write_generated_sonnets


def _complete_set(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "predictions"
    data.mkdir()
    for name, k in (("sst", 5), ("cfimdb", 2)):
        for split, file, test in (("dev", "dev", False), ("test", "test-student", True)):
            rows = keyword_sentiment(4, len(name) * 10 + len(split), k)
            write_sentiment(data / f"ids-{name}-{file}.csv", rows, test=test)
            write_sentiment_predictions(pred / f"full-model-{name}-{split}-out.csv", [r[0] for r in rows], [0] * 4)
    for split, file, labels in (("dev", "quora-dev.csv", True), ("test", "quora-test-student.csv", False)):
        pairs = quora_pairs(3, len(file))
        write_quora(data / file, pairs, labels=labels)
        write_paraphrase_predictions(pred / f"para-{split}-output.csv", [p[0] for p in pairs], [8505, 3919, 8505])
    write_sonnets(data / "sonnets_held_out.txt", [(145, "A\nB\nC"), (146, "D\nE\nF")])
    write_generated_sonnets(pred / "generated_sonnets.txt", [(145, "A\nB\nC\nmore"), (146, "D\nE\nF\nmore")])
    return ["--modes", "full-model", "--data_dir", str(data), "--predictions_dir", str(pred)]


def test_complete_set_is_zipped(tmp_path, capsys):
    argv = _complete_set(tmp_path)
    assert prepare_submit.main([*argv, "--out", str(tmp_path / "sub.zip")]) == 0
    names = zipfile.ZipFile(tmp_path / "sub.zip").namelist()
    assert "classifier.py" in names and "training/trainer.py" in names and "predictions/para-test-output.csv" in names
    assert not any(n.startswith(("data/", "runs/", ".venv/", "tests/../")) for n in names)


def test_missing_and_malformed_files_are_named(tmp_path, capsys):
    argv = _complete_set(tmp_path)
    pred = tmp_path / "predictions"
    (pred / "full-model-sst-test-out.csv").unlink()
    lines = (pred / "para-dev-output.csv").read_text().splitlines(keepends=True)
    (pred / "para-dev-output.csv").write_text("".join(lines[:-1]))  # one row short
    text = (pred / "full-model-cfimdb-dev-out.csv").read_text()
    (pred / "full-model-cfimdb-dev-out.csv").write_text(text.replace(" , 0 \n", " , 7 \n", 1))
    assert prepare_submit.main([*argv, "--out", str(tmp_path / "sub.zip")]) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "full-model-sst-test-out.csv: file not found" in err
    assert "para-dev-output.csv: 1 ids missing" in err
    assert "full-model-cfimdb-dev-out.csv, line 2: value 7 not in [0, 1]" in err
    assert not (tmp_path / "sub.zip").exists()
