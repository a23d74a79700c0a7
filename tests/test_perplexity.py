"""Sliding-window perplexity: uniform model, full-context equivalence, coverage, HF parity, CLI."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import GPT2Config
from evaluation.perplexity import perplexity, sliding_window_nll, window_spans
from models.gpt2 import GPT2LMHeadModel


class UniformLM(torch.nn.Module):
    """Logits all zero: every token has probability 1/V."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab_size)


def tiny_model(seed=0, positions=64):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=positions)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (7, 1)])
def test_uniform_model_perplexity_is_vocab_size(window, stride):
    ids = torch.randint(0, 123, (200,))
    nll, n = sliding_window_nll(UniformLM(123), ids, window=window, stride=stride, batch_size=3)
    assert n == 199
    assert perplexity(nll, n) == pytest.approx(123.0, rel=1e-5)


def test_sliding_window_equals_full_context_for_short_text():
    model = tiny_model()
    ids = torch.randint(0, 97, (40,))
    full = F.cross_entropy(model(ids[None])[0, :-1], ids[1:], reduction="sum").item()
    for stride in (1, 8, 64):
        nll, n = sliding_window_nll(model, ids, window=64, stride=stride)
        assert n == 39
        assert nll == pytest.approx(full, rel=1e-5)
    nll, n = sliding_window_nll(model, ids, window=39, stride=10)  # exactly fits: one window
    assert nll == pytest.approx(full, rel=1e-5)


def test_every_target_scored_once_with_expected_context():
    for n_tok, window, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 3), (2, 4, 4), (50, 10, 1)]:
        seen = []
        for begin, end, new in window_spans(n_tok, window, stride):
            assert end - begin <= window and 1 <= new <= end - begin
            targets = list(range(end - new + 1, end + 1))
            seen += targets
            if begin > 0:  # later windows give every scored target >= window - stride + 1 tokens of context
                assert min(t - begin for t in targets) >= window - stride + 1
        assert seen == list(range(1, n_tok))


def test_long_text_matches_manual_window_loop():
    """Batched, padded scoring equals scoring each window on its own."""
    model = tiny_model(positions=16)
    ids = torch.randint(0, 97, (75,))
    expected = 0.0
    for begin, end, new in window_spans(75, 16, 6):
        logits = model(ids[None, begin:end])[0]
        expected += F.cross_entropy(logits[-new:], ids[end - new + 1:end + 1], reduction="sum").item()
    nll, n = sliding_window_nll(model, ids, window=16, stride=6, batch_size=4)
    assert n == 74 and nll == pytest.approx(expected, rel=1e-5)


def test_matches_transformers_loss(tiny_hf_checkpoint):
    directory, hf = tiny_hf_checkpoint
    ours = GPT2LMHeadModel.from_name_or_path(str(directory)).eval()
    ids = torch.randint(0, hf.config.vocab_size, (60,))
    with torch.no_grad():
        ref = hf(ids[None], labels=ids[None]).loss.item()
    nll, n = sliding_window_nll(ours, ids, window=128, stride=64)
    assert nll / n == pytest.approx(ref, abs=1e-4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, 5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        window_spans(1, 4, 2)
    with pytest.raises(ValueError, match="1-D"):
        sliding_window_nll(UniformLM(5), torch.zeros(2, 3, dtype=torch.long), 4, 2)


def test_restores_training_mode():
    model = tiny_model().train()
    sliding_window_nll(model, torch.randint(0, 97, (20,)), window=8, stride=4)
    assert model.training


def test_cli_corpora_table(tiny_hf_checkpoint, tmp_path, tokenizer_dir, monkeypatch, capsys):
    import perplexity as cli

    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    directory, _ = tiny_hf_checkpoint
    a = tmp_path / "a.txt"
    a.write_text("the cat sat on the mat .\n" * 30)
    b = tmp_path / "sonnets_x.txt"
    b.write_text("header\n\n1\n\nShall I compare thee\nto a summer's day\n\n2\n\nThou art more lovely\n")
    results = cli.main(["--model", str(directory), "--model", "tiny", "--corpora", f"a={a}", f"s={b}",
                        "--max_tokens", "100", "--window", "32", "--stride", "16"])
    out = capsys.readouterr().out
    assert "| model | a | s |" in out
    assert results[str(directory)]["a"]["tokens"] == 99
    assert math.isfinite(results["tiny"]["s"]["perplexity"])
