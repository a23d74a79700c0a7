"""Readers and writers of the CS224N task files: layouts, exact formats, row counts, bad input."""
from __future__ import annotations

import os

import pytest

from conftest import CS224N_DATA, SHARED_DATA
from cs224n_files import write_quora, write_sentiment
from starter import needs_starter, writer
from tasks.data import (NO_TOKEN_ID, PARAPHRASE_HEADER, SENTIMENT_HEADER, YES_TOKEN_ID, DataError, read_paraphrase,
                        read_predictions, read_sentiment, write_paraphrase_predictions, write_sentiment_predictions)

ROWS = [("aa1", "A fine film .", 3), ("bb2", "Bad.<br /><br />Really bad .", 0), ("cc3", 'He said "no"', 4)]
PAIRS = [("p1", "How do I learn?", "How can I learn?", 1), ("p2", "What is X?", "Where is Y?", 0)]


def test_sentiment_train_and_odd_test_header(tmp_path):
    ex = read_sentiment(write_sentiment(tmp_path / "train.csv", ROWS), 5)
    assert [(e.id, e.label) for e in ex] == [("aa1", 3), ("bb2", 0), ("cc3", 4)]
    assert ex[1].text == "Bad.\n\nReally bad ."  # each <br /> -> newline, outer whitespace stripped
    test = read_sentiment(write_sentiment(tmp_path / "test.csv", ROWS, test=True), 5, labeled=False)
    assert [(e.id, e.text, e.label) for e in test] == [("aa1", "A fine film .", None), ("bb2", ex[1].text, None),
                                                       ("cc3", 'He said "no"', None)]


@pytest.mark.parametrize("header,index,float_labels", [(True, True, True), (False, True, True),
                                                       (False, False, False), (True, False, False)])
def test_quora_layouts(tmp_path, header, index, float_labels):
    path = write_quora(tmp_path / "q.csv", PAIRS, header=header, index=index, float_labels=float_labels)
    ex = read_paraphrase(path)
    assert [(e.id, e.sentence1, e.sentence2, e.label) for e in ex] == PAIRS


@pytest.mark.parametrize("header,index", [(True, True), (False, True), (False, False)])
def test_quora_test_files_without_labels(tmp_path, header, index):
    path = write_quora(tmp_path / "q.csv", PAIRS, header=header, index=index, labels=False)
    assert [(e.id, e.label) for e in read_paraphrase(path, labeled=False)] == [("p1", None), ("p2", None)]


def test_quora_empty_label_is_kept_unlabeled(tmp_path, capsys):
    path = tmp_path / "q.csv"
    path.write_text("\tid\tsentence1\tsentence2\tis_duplicate\n0\tx1\ta?\tb?\t1.0\n1\tx2\tc?\td?\t\n")
    ex = read_paraphrase(path)
    assert [(e.id, e.label) for e in ex] == [("x1", 1), ("x2", None)]
    assert "(lines 3)" in capsys.readouterr().err


def _bad(tmp_path, text: str) -> str:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("body,message", [
    ("\tid\tsentence\tsentiment\n0\ta\tx\t1\n1\tb\ty\n", "line 3: 3 tab-separated columns"),
    ("\tid\tsentence\tsentiment\n0\ta\tx\tgood\n", "line 2: sentiment 'good' is not a number"),
    ("\tid\tsentence\tsentiment\n0\ta\tx\t7\n", "line 2: sentiment '7' is out of range"),
    ("\tid\tsentence\tsentiment\n0\ta\tx\t1.5\n", "out of range"),
    ("\tid\tsentence\tsentiment\n", "no examples (empty split)"),
    ("\tid\tsentence\tsentiment\n0\ta\tx\t1\n1\ta\ty\t2\n", "line 3: duplicate id 'a' (first seen on line 2)"),
    ("\tid\ttext\tsentiment\n0\ta\tx\t1\n", "lacks column(s) ['sentence']"),
    ("", "empty file"),
])
def test_sentiment_bad_input(tmp_path, body, message):
    path = _bad(tmp_path, body)
    with pytest.raises(DataError, match=r".*") as err:
        read_sentiment(path, 5)
    assert path in str(err.value) and message in str(err.value)


def test_missing_file_and_bad_quora(tmp_path):
    with pytest.raises(DataError, match="nothere.csv: file not found"):
        read_sentiment(tmp_path / "nothere.csv", 5)
    with pytest.raises(DataError, match=r"line 2: is_duplicate '2.0' is out of range"):
        read_paraphrase(_bad(tmp_path, "\tid\tsentence1\tsentence2\tis_duplicate\n0\ta\tx\ty\t2.0\n"))
    with pytest.raises(DataError, match=r"line 1: 2 tab-separated columns and no header"):
        read_paraphrase(_bad(tmp_path, "a\tb\n"))
    with pytest.raises(DataError, match=r"line 2: 4 tab-separated columns, expected 5"):
        read_paraphrase(_bad(tmp_path, "0\ta\tx\ty\t1\n1\tb\tx\ty\n"))


def test_sonnet_file_without_sonnets(tmp_path):
    from tasks.sonnets import read_sonnets

    with pytest.raises(ValueError, match="no sonnet found"):
        read_sonnets(_bad(tmp_path, "Sonnets\nby nobody\n"))


def test_prediction_writers_exact_format_and_row_check(tmp_path):
    path = write_sentiment_predictions(tmp_path / "s.csv", ["a", "b"], [3, 0], expected_rows=2)
    assert path.read_text() == "id \t Predicted_Sentiment \na, 3 \nb, 0 \n"
    assert read_predictions(path, SENTIMENT_HEADER, range(5)) == [("a", 3), ("b", 0)]
    with pytest.raises(ValueError, match="2 predictions for 3 input rows"):
        write_sentiment_predictions(tmp_path / "t.csv", ["a", "b"], [1, 1], expected_rows=3)
    assert not (tmp_path / "t.csv").exists()
    p = write_paraphrase_predictions(tmp_path / "p.csv", ["x", "y"], [YES_TOKEN_ID, NO_TOKEN_ID], expected_rows=2)
    assert p.read_text() == "id \t Predicted_Is_Paraphrase \nx, 8505 \ny, 3919 \n"
    with pytest.raises(ValueError, match="must be 8505 or 3919"):
        write_paraphrase_predictions(tmp_path / "q.csv", ["x"], [1])
    with pytest.raises(ValueError, match="without spaces or commas"):
        write_sentiment_predictions(tmp_path / "q.csv", ["a b"], [1])
    (tmp_path / "r.csv").write_text("id \t Predicted_Is_Paraphrase \nx, 8505\n")
    with pytest.raises(DataError, match="r.csv, line 2"):
        read_predictions(tmp_path / "r.csv", PARAPHRASE_HEADER, (YES_TOKEN_ID, NO_TOKEN_ID))
    (tmp_path / "m.csv").write_text("id \t Predicted_Is_Paraphrase \nx , 8505 \n")  # minBERT's row format
    with pytest.raises(DataError, match="m.csv, line 2: .*space before the comma"):
        read_predictions(tmp_path / "m.csv", PARAPHRASE_HEADER, (YES_TOKEN_ID, NO_TOKEN_ID))
    (tmp_path / "w.csv").write_bytes(b"id \t Predicted_Sentiment \r\na, 3 \r\n")  # the starter on Windows
    assert read_predictions(tmp_path / "w.csv", SENTIMENT_HEADER, range(5)) == [("a", 3)]


@needs_starter
@pytest.mark.parametrize("script,flag,ids,preds,header", [
    ("classifier.py", "dev_out", "dev_sent_ids", "dev_pred", SENTIMENT_HEADER),
    ("classifier.py", "test_out", "test_sent_ids", "test_pred", SENTIMENT_HEADER),
    ("paraphrase_detection.py", "para_dev_out", "dev_para_sent_ids", "dev_para_y_pred", PARAPHRASE_HEADER),
    ("paraphrase_detection.py", "para_test_out", "test_para_sent_ids", "test_para_y_pred", PARAPHRASE_HEADER)])
def test_prediction_files_are_byte_identical_to_the_starters(tmp_path, script, flag, ids, preds, header):
    """The starter's own writing code (run from its script) and ours give the same bytes, and our
    reader reads the starter's file back."""
    import numpy as np

    sent_ids = ["a7d575c9ed86ea9633660c67e", "33cfa32975091f471e3a19656", "0f"]
    values = [8505, 3919, 8505] if header == PARAPHRASE_HEADER else [3, 0, 4]
    theirs = writer(script, flag)(tmp_path / "theirs.csv", **{ids: sent_ids, preds: list(np.array(values)),
                                                               "dev_acc": 0.5})
    write = write_paraphrase_predictions if header == PARAPHRASE_HEADER else write_sentiment_predictions
    ours = write(tmp_path / "ours.csv", sent_ids, values, expected_rows=3)
    assert ours.read_bytes() == theirs.read_bytes()
    allowed = (YES_TOKEN_ID, NO_TOKEN_ID) if header == PARAPHRASE_HEADER else range(5)
    assert read_predictions(theirs, header, allowed) == list(zip(sent_ids, values))


needs_real_data = pytest.mark.skipif(not CS224N_DATA.is_dir() and not os.environ.get("CI"),
                                     reason=f"{CS224N_DATA} missing")


@needs_real_data
def test_real_cs224n_files_row_counts():
    from tasks.sonnets import read_sonnets

    d = CS224N_DATA
    counts = [len(read_sentiment(d / f"ids-sst-{s}.csv", 5, labeled=s != "test-student"))
              for s in ("train", "dev", "test-student")]
    assert counts == [8544, 1101, 2210]
    assert len(read_sentiment(d / "ids-cfimdb-dev.csv", 2)) == 245
    assert len(read_sentiment(d / "ids-cfimdb-test-student.csv", 2, labeled=False)) == 488
    assert len(read_sentiment(d / "ids-cfimdb-train.csv", 2)) == 1707
    assert len(read_sonnets(d / "sonnets.txt")) == 131
    assert len(read_sonnets(d / "sonnets_held_out_dev.txt")) == 12
    assert len(read_sonnets(d / "sonnets_held_out.txt")) == 12
    dev = read_paraphrase(d / "quora-dev.csv")
    assert len(dev) == 20214 and sum(e.label is None for e in dev) == 2
    assert len(read_paraphrase(SHARED_DATA / "quora" / "quora-train-small.csv")) == 5000
    assert len(read_paraphrase(SHARED_DATA / "quora" / "quora-train-pre-left.csv")) == 8507
