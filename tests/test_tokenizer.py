"""Tokenizer resolution order and the real GPT-2 BPE ids the paraphrase task relies on."""
from __future__ import annotations

import shutil

import pytest

from models.tokenizer import TOKENIZER_ENV, load_tokenizer, resolve_tokenizer_dir


def test_real_tokenizer_ids(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    assert tok("yes").input_ids == [8505]
    assert tok("no").input_ids == [3919]
    assert tok.eos_token_id == 50256 and tok.pad_token_id == 50256
    assert len(tok) == 50257


def test_resolution_order(tokenizer_dir, tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / f, model_dir / f)
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    assert resolve_tokenizer_dir(None, None) == "gpt2"  # the hub, last
    assert resolve_tokenizer_dir(None, str(model_dir)) == str(model_dir)
    monkeypatch.setenv(TOKENIZER_ENV, str(tokenizer_dir))
    assert resolve_tokenizer_dir(None, str(model_dir)) == str(tokenizer_dir)  # env beats model dir
    assert resolve_tokenizer_dir(str(model_dir), None) == str(model_dir)  # explicit beats env


def test_bad_directories_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tokenizer directory .*vocab.json and merges.txt"):
        resolve_tokenizer_dir(str(tmp_path))
    monkeypatch.setenv(TOKENIZER_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=TOKENIZER_ENV):
        resolve_tokenizer_dir(None)


def test_unreachable_hub_explains_offline_use(monkeypatch, tmp_path):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in tests")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    with pytest.raises(OSError, match="--tokenizer DIR"):
        load_tokenizer(None, str(tmp_path))
