"""lm.corpus and lm.vocab: document reading, block packing, splits, PTB-style word handling."""
from __future__ import annotations

import csv

import pytest
import torch

from common.errors import DataError
from lm.batching import batchify, bptt_segments, transformer_blocks
from lm.corpus import (clean_poem, join_documents, normalize_newlines, pack_blocks, read_documents,
                       read_poetry_csv, split_documents)
from lm.vocab import Vocabulary, ptb_style_words


@pytest.mark.parametrize("n,block", [(100, 10), (103, 10), (10, 10), (57, 2)])
def test_pack_blocks_keeps_every_token_once_except_tail(n, block):
    stream = list(range(1000, 1000 + n))
    blocks, tail = pack_blocks(stream, block)
    assert blocks.shape == (n // block, block)
    assert blocks.flatten().tolist() + tail == stream  # in order, each token exactly once
    assert len(tail) == n % block < block


def test_pack_blocks_rejects_short_corpus():
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_blocks([1, 2, 3], 4)


def test_join_documents_puts_eos_after_each():
    assert join_documents([[1, 2], [3], []], eos_id=9) == [1, 2, 9, 3, 9, 9]


def test_poetry_csv_newlines_and_blank_poems(tmp_path):
    path = tmp_path / "poems.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "Title", "Poem", "Poet", "Tags"])
        w.writerow([0, "A", "\r\r\nDog bone, stapler,\r\r\n     garlic press  \r\r\n", "X", ""])
        w.writerow([1, "B", "   \r\r\n  ", "Y", ""])  # blank poem: dropped
        w.writerow([2, "C", "one\rtwo\r\nthree\xa0", "Z", ""])
    assert read_poetry_csv(path) == ["Dog bone, stapler,\n     garlic press", "one\ntwo\nthree"]
    assert read_documents(path) == read_poetry_csv(path)  # *.csv -> poetry_csv


def test_poetry_csv_without_poem_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no 'Poem' column"):
        read_poetry_csv(path)


def test_read_documents_text_and_sonnets(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("line one\r\nline two\n")
    assert read_documents(text) == ["line one\nline two\n"]
    sonnets = tmp_path / "sonnets.txt"
    sonnets.write_text("Header\n\n1\n\nFirst line\nsecond\n\n2\n\nOther\n")
    assert read_documents(sonnets) == ["First line\nsecond", "Other"]
    with pytest.raises(DataError, match="no such corpus file"):
        read_documents(tmp_path / "missing.txt")


def test_normalize_newlines():
    assert normalize_newlines("a\r\r\nb\r\nc\rd\n") == "a\nb\nc\nd\n"
    assert clean_poem("\n\n  x  \n") == "  x"


def test_split_documents():
    docs = [f"doc {i}" for i in range(20)]
    train, valid = split_documents(docs, 0.1, seed=3)
    assert len(valid) == 2 and sorted(train + valid) == sorted(docs) and not set(train) & set(valid)
    assert split_documents(docs, 0.1, seed=3) == (train, valid)
    (t,), (v,) = split_documents(["a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n"], 0.2)
    assert t + v == "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n" and t.endswith("\n")


def test_vocabulary_oov_and_eos():
    vocab = Vocabulary.from_sentences([["a", "b", "a"], ["c"]])
    assert vocab.itos[:3] == ["<unk>", "<eos>", "a"] and len(vocab) == 5
    ids, oov, words = vocab.encode([["a", "zzz"], ["c"]])
    assert vocab.decode(ids.tolist()) == "a <unk> <eos> c <eos>"
    assert (oov, words) == (1, 3)


def test_ptb_style_words():
    assert ptb_style_words("The U.S. economy grew 3.5 % in 1999 , didn't it ?") == \
        ["the", "u.s.", "economy", "grew", "N", "in", "N", "did", "n't", "it"]
    assert ptb_style_words(" = Valkyria Chronicles III = ") == ["valkyria", "chronicles", "iii"]
    assert ptb_style_words("First Citizen:\nBefore we proceed, hear me speak. John's") == \
        ["first", "citizen", "before", "we", "proceed", "hear", "me", "speak", "john", "'s"]
    assert ptb_style_words("a well @-@ known fact") == ["a", "well-known", "fact"]


def test_bptt_segments_shift_targets_by_one():
    data = batchify(torch.arange(103), 4)  # 4 columns of 25
    assert data.shape == (4, 25) and data[1, 0] == 25
    segs = list(bptt_segments(data, 10))
    assert [x.shape[1] for x, _ in segs] == [10, 10, 4]
    for x, y in segs:
        assert torch.equal(y, x + 1)


def test_transformer_blocks_cover_each_target_once():
    stream = torch.arange(1, 42)
    seen = []
    for x, y in transformer_blocks(stream, 8, 3, torch.Generator().manual_seed(0)):
        assert torch.equal(y, x + 1)
        seen += y.flatten().tolist()
    assert sorted(seen) == list(range(2, 42))
