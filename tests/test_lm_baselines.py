"""Word-level baselines: the from-scratch RNN cell against hand computation and nn.RNN, learning on
a tiny corpus, the shared sampling loop (KV-cached transformer == recomputation), and the CLI."""
from __future__ import annotations

import math

import pytest
import torch

from lm.baselines import TrainSettings, evaluate_nll, train_baseline
from lm.models import ElmanRNN, ElmanRNNCell, build_baseline
from lm.sampling import sample
from lm.vocab import Vocabulary


def test_rnn_cell_matches_hand_computation():
    cell = ElmanRNNCell(2, 2)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.tensor([[0.5, -1.0], [0.25, 2.0]]))
        cell.weight_hh.copy_(torch.tensor([[1.0, 0.0], [-0.5, 0.5]]))
        cell.bias_ih.copy_(torch.tensor([0.1, 0.0]))
        cell.bias_hh.copy_(torch.tensor([0.0, -0.2]))
    x, h = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.3, -0.4]])
    # unit 0: 0.5*1 - 1*2 + 0.1 + (1*0.3 + 0*-0.4) + 0 = -1.1;  unit 1: 0.25*1 + 2*2 + 0 + (-0.5*0.3 + 0.5*-0.4) - 0.2 = 3.7
    expected = torch.tensor([[math.tanh(-1.1), math.tanh(3.7)]])
    assert torch.allclose(cell(x, h), expected, atol=1e-7)


def test_unrolled_rnn_matches_torch_rnn():
    torch.manual_seed(0)
    ours = ElmanRNN(5, 7, num_layers=2, dropout=0.0)
    ref = torch.nn.RNN(5, 7, num_layers=2, nonlinearity="tanh", batch_first=True)
    with torch.no_grad():
        for layer, cell in enumerate(ours.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{layer}").copy_(getattr(cell, name))
    x, h0 = torch.randn(3, 6, 5), torch.randn(2, 3, 7)
    out, hn = ours(x, h0)
    ref_out, ref_hn = ref(x, h0)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(hn, ref_hn, atol=1e-6)


def tiny_corpus():
    words = "the cat sat on the mat and the dog ran to the park".split()
    vocab = Vocabulary(words)
    stream = torch.tensor([vocab.stoi[w] for w in words * 20] + [vocab.eos_id])
    return vocab, stream


@pytest.mark.parametrize("kind", ["rnn", "lstm", "transformer"])
def test_each_baseline_learns_tiny_corpus(kind):
    torch.manual_seed(0)
    vocab, stream = tiny_corpus()
    kw = dict(context=16) if kind == "transformer" else dict(num_layers=1)
    model = build_baseline(kind, len(vocab), hidden_size=32, dropout=0.0, **kw)
    settings = TrainSettings(epochs=4, lr=1e-2, batch_size=4, bptt=8, eval_batch_size=8, log_every=10**6)
    before = evaluate_nll(model, stream, settings)
    run = train_baseline(model, kind, {"train": stream, "valid": stream}, settings, log=lambda m: None)
    after = evaluate_nll(model, stream, settings)
    assert before[0] / before[1] > math.log(len(vocab)) - 0.5  # starts near uniform
    assert after[0] / after[1] < 0.6 * before[0] / before[1]  # e.g. 2.5 -> < 1.5 nats
    assert len(run.history) == 4 and run.best_valid_ppl == pytest.approx(math.exp(after[0] / after[1]), rel=1e-4)


def test_transformer_sampling_with_kv_cache_equals_recomputation():
    torch.manual_seed(0)
    vocab, _ = tiny_corpus()
    model = build_baseline("transformer", len(vocab), hidden_size=32, num_layers=2, context=24, dropout=0.0).eval()
    text = sample(model, vocab, "the cat", max_new_tokens=10, temperature=0.0, stop_at_eos=False)
    ids = [vocab.stoi["the"], vocab.stoi["cat"]]
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert text == vocab.decode(ids[2:])
    assert model.gpt2.gpt.gpt_layers[0].self_attention.kv_cache is None  # cleaned up
    # never runs past the context
    assert len(sample(model, vocab, "the cat", max_new_tokens=100, stop_at_eos=False).split()) == 22


def test_temperature_sampling_is_seeded_and_recurrent_state_carried():
    torch.manual_seed(0)
    vocab, _ = tiny_corpus()
    model = build_baseline("lstm", len(vocab), hidden_size=16, num_layers=1, dropout=0.0)
    a = sample(model, vocab, "the", 12, temperature=1.0, generator=torch.Generator().manual_seed(1), stop_at_eos=False)
    b = sample(model, vocab, "the", 12, temperature=1.0, generator=torch.Generator().manual_seed(1), stop_at_eos=False)
    assert a == b and len(a.split()) == 12
    with pytest.raises(ValueError, match="temperature"):
        sample(model, vocab, "the", 3, temperature=-1.0)


def test_cli_end_to_end(tmp_path):
    import lm_baselines

    ptb = tmp_path / "ptb"
    ptb.mkdir()
    line = "the company said it expects N profit <unk> in the first quarter\n"
    for split, n in (("train", 20), ("valid", 4), ("test", 4)):
        (ptb / f"ptb.{split}.txt").write_text(line * n)
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" = Title = \n The company said 35 @,@ 000 profits rose .\n")
    shakes = tmp_path / "shakes.txt"
    shakes.write_text("First Citizen:\nThe company said it, didn't it?\n")
    out = tmp_path / "out"
    runs = lm_baselines.main(["--ptb_dir", str(ptb), "--wikitext", str(wiki), "--shakespeare", str(shakes),
                              "--epochs", "1", "--hidden", "16", "--layers", "1", "--tf_layers", "1",
                              "--tf_heads", "2", "--tf_context", "16", "--batch_size", "4", "--tf_batch_size", "4",
                              "--bptt", "8", "--sample_words", "4", "--out", str(out)])
    assert [r.name for r in runs] == ["RNN", "LSTM", "Transformer"]
    md = (out / "results.md").read_text()
    assert "| LSTM |" in md and "WikiText-2 ppl" in md and "Out-of-vocabulary rate" in md
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "perplexity_curves.png").is_file()
    assert all(math.isfinite(r.test_ppl) and set(r.cross_domain) == {"WikiText-2", "Shakespeare"} for r in runs)
