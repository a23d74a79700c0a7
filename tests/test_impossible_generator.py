"""The student paraphrase generator of Impossible Distillation: the format, the CE on y' tokens only, the
KL against a frozen copy (no gradient into it, lambda = 0 is exactly the CE), training through the shared
trainer, the saved Hugging Face directory (read by transformers and by the `generate` stage), LoRA."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distillation import generator as gen
from distillation import impossible as imp
from models.losses import IGNORE_INDEX, token_nll
from models.tokenizer import load_tokenizer

PAIRS = [("How do I learn Python?", "What is the best way to study Python?"),
         ("Why is the sky blue?", "What makes the sky look blue?")]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def test_paraphrase_format_tokens_and_targets(tok):
    seqs, prompt_lengths, truncated = gen.encode_paraphrases(tok, PAIRS, max_length=64)
    assert truncated == 0
    for (x, y), seq, n in zip(PAIRS, seqs, prompt_lengths):
        assert tok.decode(seq[:n]) == x + "\nIn other words:"
        assert tok.decode(seq[n:-1]) == " " + y and seq[-1] == tok.eos_token_id
        assert seq[:n] == gen.paraphrase_prompt_ids(tok, [x])[0]  # generation sees the training prompt
    from training.batching import pad_right

    ids, mask = pad_right(seqs, tok.eos_token_id)
    targets = gen.generator_targets(ids, mask, torch.tensor(prompt_lengths))
    for b, (seq, n) in enumerate(zip(seqs, prompt_lengths)):
        expected = [IGNORE_INDEX] * (n - 1) + seq[n:] + [IGNORE_INDEX] * (ids.size(1) - len(seq) + 1)
        assert targets[b].tolist() == expected  # y' tokens and <eos>; nothing of the prompt, nothing of the padding
    long = [("word " * 40, "other " * 40)]
    (seq,), (n,), truncated = gen.encode_paraphrases(tok, long, max_length=32)
    assert truncated == 1 and len(seq) == 32 and seq[-1] == tok.eos_token_id and tok.decode(seq[:n]).endswith("words:")
    with pytest.raises(ValueError, match="max_length"):
        gen.encode_paraphrases(tok, PAIRS, max_length=6)


def _toy(seed=0, V=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # one padded row
    prompt_lengths = torch.tensor([4, 2, 5])
    logits = torch.randn(3, 9, V, generator=g)
    return ids, mask, prompt_lengths, logits


def test_ce_covers_y_prime_tokens_only():
    ids, mask, plen, logits = _toy()
    targets = gen.generator_targets(ids, mask, plen)
    loss, ce, kl = gen.generator_loss(logits, targets)
    # by hand: position t predicts ids[t + 1] for t + 1 in [prompt length, real length)
    rows, cols = zip(*[(b, t) for b in range(3) for t in range(8) if t + 1 >= plen[b] and mask[b, t + 1]])
    want = F.cross_entropy(logits[list(rows), list(cols)], ids[list(rows), [c + 1 for c in cols]])
    assert torch.allclose(loss, want, atol=1e-6) and float(kl) == 0.0
    # perturbing the PROMPT tokens (targets of a plain LM loss) changes nothing ...
    perturbed = ids.clone()
    for b in range(3):
        perturbed[b, 1:plen[b]] = (perturbed[b, 1:plen[b]] + 3) % 11
    assert torch.equal(gen.generator_loss(logits, gen.generator_targets(perturbed, mask, plen))[0], loss)
    # ... perturbing one y' token does
    other = ids.clone()
    other[0, 6] = (other[0, 6] + 1) % 11
    assert not torch.allclose(gen.generator_loss(logits, gen.generator_targets(other, mask, plen))[0], loss)
    # and the logits of prompt positions (except the last, which predicts y'_1) get no gradient
    leaf = logits.clone().requires_grad_(True)
    gen.generator_loss(leaf, targets)[0].backward()
    for b in range(3):
        assert leaf.grad[b, : plen[b] - 1].abs().sum() == 0 and leaf.grad[b, plen[b] - 1].abs().sum() > 0


def test_kl_term_against_a_hand_computation_and_lambda_zero_is_exactly_ce():
    ids, mask, plen, logits = _toy(1)
    ref = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    targets = gen.generator_targets(ids, mask, plen)
    keep = targets != IGNORE_INDEX
    ce = token_nll(logits, targets)
    loss0, _, _ = gen.generator_loss(logits, targets, ref, kl_lambda=0.0)
    assert torch.equal(loss0, ce)
    for T in (1.0, 2.0):
        log_s, log_t = F.log_softmax(logits[keep] / T, -1), F.log_softmax(ref[keep] / T, -1)
        kl_st = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")  # KL(S || P_T), per position mean
        loss, ce_part, kl = gen.generator_loss(logits, targets, ref, kl_lambda=0.3, temperature=T)
        assert torch.allclose(kl, kl_st * T * T, atol=1e-6)
        assert torch.allclose(loss, ce + 0.3 * T * T * kl_st, atol=1e-6) and torch.equal(ce_part, ce)
    assert float(gen.generator_loss(logits, targets, logits.clone(), 0.5)[2]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="reference"):
        gen.generator_loss(logits, targets, None, 0.5)


def test_kl_reference_is_a_frozen_copy_that_gets_no_gradient(tok):
    from models.gpt2 import GPT2LMHeadModel
    from training.efficient import frozen_copy

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_name_or_path("tiny")
    reference = frozen_copy(model)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    seqs, plen, _ = gen.encode_paraphrases(tok, PAIRS, 64)
    task = gen.generator_task((seqs, plen), ([], []), tok.eos_token_id, gen.GeneratorLossConfig(kl_lambda=1.0),
                              reference, 2, torch.device("cpu"), "fp32")
    batch = task.make_batch([0, 1])
    model.train()
    loss, tokens, logs = task.loss(model, batch)
    assert tokens == sum(len(s) - n for s, n in zip(seqs, plen))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())
    model.eval()  # a changed student, an unchanged teacher: KL > 0 in eval mode
    _, _, logs = task.loss(model, batch)
    assert float(logs["kl"]) > 0


def write_pairs(path, n_contexts=6):
    rows = [{"context_id": c, "a": f"How do I learn topic {c} fast?", "b": f"What is the quickest way to study topic {c}?"}
            for c in range(n_contexts)]
    rows += [{"context_id": c, "a": f"Why is thing {c} so hard?", "b": f"What makes thing {c} difficult?"}
             for c in range(n_contexts)]
    imp.write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_train_generator_stage_saves_a_generator_that_generate_and_transformers_load(tmp_path, tokenizer_dir, peft):
    import impossible_distillation as idist
    import transformers

    pairs = write_pairs(tmp_path / "filtered.jsonl")
    out = tmp_path / "generator"
    extra = ["--peft", "lora", "--lora_r", "4", "--lora_targets", "all"] if peft == "lora" else []
    stats = idist.main(["train-generator", "--pairs", str(pairs), "--out", str(out), "--model_size", "tiny",
                        "--tokenizer", str(tokenizer_dir), "--epochs", "3", "--lr", "3e-3", "--batch_size", "4",
                        "--kl_lambda", "0.1", "--dev_fraction", "0.2", "--no_progress", "--seed", "3",
                        "--run_dir", str(tmp_path / "run"), *extra])
    assert stats["train_pairs"] == 10 and stats["dev_pairs"] == 2  # one of six contexts held out
    assert stats["train_loss_last"] < stats["train_loss_first"]  # the y' CE falls within the stage
    assert json.loads(imp.stats_path(out).read_text())["generator_out"] == str(out)
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert {"train_ce", "train_kl"} <= set(next(e for e in events if e["event"] == "epoch"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()  # the real client reads the export
    from models.gpt2 import GPT2LMHeadModel

    ours = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ids = torch.tensor([gen.paraphrase_prompt_ids(load_tokenizer(str(tokenizer_dir)), [PAIRS[0][0]])[0]])
    assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
    # the trained model is the student: its CE on its training pairs is what the stage reported
    assert (out / "vocab.json").is_file()
    if peft == "lora":
        assert not any("lora" in k for k in ours.state_dict())
        return
    cand = tmp_path / "cand.jsonl"
    gstats = idist.main(["generate", "--model", str(out), "--contexts", str(_contexts(tmp_path)), "--mode", "paraphrase",
                         "--samples_per_context", "2", "--max_new_tokens", "5", "--batch_size", "4", "--out", str(cand)])
    rows = imp.read_jsonl(cand, ["a", "b", "source"])
    assert gstats["model"] == str(out) and gstats["mode"] == "paraphrase" and gstats["candidates"] == 2 * (2 + 1)
    assert sum(r["source"] == "context-student" for r in rows) == 4


def _contexts(tmp_path):
    path = tmp_path / "contexts.txt"
    path.write_text("How do I learn topic 1 fast?\nWhy is thing 2 so hard?\n")
    return path


def test_held_out_split_and_errors():
    rows = [{"context_id": c, "a": "x", "b": "y"} for c in range(10) for _ in range(2)]
    train, dev = gen.held_out_split(rows, 0.2, seed=0)
    assert len(dev) == 4 and len(train) == 16 and not {r["context_id"] for r in dev} & {r["context_id"] for r in train}
    assert gen.held_out_split(rows, 0.0, 0) == (rows, [])
    with pytest.raises(ValueError, match="dev_fraction"):
        gen.held_out_split(rows[:2], 0.1, 0)
    with pytest.raises(ValueError, match="kept nothing"):
        gen.held_out_split([], 0.1, 0)
    with pytest.raises(ValueError, match="kl_lambda"):
        gen.GeneratorLossConfig(kl_lambda=-1).validate()
    with pytest.raises(ValueError, match="kl_temperature"):
        gen.GeneratorLossConfig(kl_temperature=0).validate()
