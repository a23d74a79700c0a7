"""Sonnet file formats (the CS224N starter's layouts) and the starter's chrF."""
from __future__ import annotations

import re

import pytest
from sacrebleu.metrics import CHRF

from common.errors import DataError
from conftest import CS224N_DATA
from evaluation.sonnets import chrf
from tasks.sonnets import read_generated_sonnets, read_numbered_sonnets, read_sonnets, write_generated_sonnets


def starter_split(path):
    """The starter's SonnetsDataset._load_sonnets, as the reference."""
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    return [s.strip() for s in re.split(r"\n\s*\d+\s*\n", text)[1:]]


needs_data = pytest.mark.skipif(not (CS224N_DATA / "sonnets.txt").exists(), reason="CS224N data missing")


@needs_data
@pytest.mark.parametrize("name,count,first", [
    ("sonnets.txt", 131, 1), ("sonnets_held_out_dev.txt", 12, 132),
    ("sonnets_held_out.txt", 12, 145), ("TRUE_sonnets_held_out_dev.txt", 12, 132)])
def test_real_files_match_starter(name, count, first):
    path = CS224N_DATA / name
    sonnets = read_sonnets(path)
    assert len(sonnets) == count
    assert sonnets == starter_split(path)
    numbers = [n for n, _ in read_numbered_sonnets(path)]
    assert numbers == list(range(first, first + count))
    assert "\r" not in "".join(sonnets)


@needs_data
def test_real_file_shapes():
    train = read_sonnets(CS224N_DATA / "sonnets.txt")
    assert train[0].startswith("From fairest creatures we desire increase,")
    assert len(train[0].split("\n")) == 14
    prompts = read_sonnets(CS224N_DATA / "sonnets_held_out_dev.txt")
    assert all(len(p.split("\n")) == 3 for p in prompts)
    gold = read_sonnets(CS224N_DATA / "TRUE_sonnets_held_out_dev.txt")
    assert all(g.startswith(p) for g, p in zip(gold, prompts))


def test_generated_roundtrip_and_starter_layout(tmp_path):
    texts = ["Shall I compare thee\nto a summer's day?", "Line one,\n  line two."]
    path = write_generated_sonnets(tmp_path / "out" / "gen.txt", texts)
    raw = path.read_text()
    assert raw == ("--Generated Sonnets-- \n\n" "\n0\nShall I compare thee\nto a summer's day?\n\n"
                   "\n1\nLine one,\n  line two.\n\n")
    assert read_generated_sonnets(path) == list(enumerate(texts))
    assert texts == starter_split(path)
    with pytest.raises(TypeError, match="prompt order"):
        write_generated_sonnets(tmp_path / "bad.txt", [(145, "numbered by the caller")])
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_bad_files_name_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("Sonnets\nno numbers here\n")
    with pytest.raises(ValueError, match="bad.txt.*no sonnet"):
        read_sonnets(p)
    p.write_text("header\n\n1\n\n\n2\n\nsome text\n")
    with pytest.raises(ValueError, match="bad.txt, line 3: sonnet 1 is empty"):
        read_sonnets(p)
    p.write_text("Sonnets\n\n1\n\ntext\n")
    with pytest.raises(ValueError, match="bad.txt, line 1: expected the header"):
        read_generated_sonnets(p)
    with pytest.raises(DataError, match="missing.txt: no such file"):
        read_sonnets(tmp_path / "missing.txt")


def test_chrf_is_sacrebleu_default():
    gen = ["the cat sat on the mat", "a rose by any other name"]
    gold = ["the cat sat on a mat", "a rose by another name would smell"]
    assert chrf(gen, gold) == pytest.approx(CHRF().corpus_score(gen, [gold]).score, abs=1e-12)
    assert chrf(gold, gold) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="pair them"):
        chrf(gen, gold[:1])
