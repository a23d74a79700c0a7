"""SMART (objectives/smart.py): the symmetric KL against torch's kl_div, eps = 0 gives a zero regulariser
(dropout on), the perturbation stays in its ball and off the padding, the ascent finds a worse
perturbation than the random start, the Bregman term is 0 at the start and the EMA follows its formula,
and classifier.py / paraphrase_detection.py with the flags log both terms and resume exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cs224n_files import keyword_sentiment, quora_pairs, write_quora, write_sentiment
from models.gpt2 import GPT2Model
from objectives.smart import RandomState, Smart, SmartConfig, perturbed_embeddings, symmetric_kl
from tasks.sentiment import GPT2SentimentClassifier


def test_symmetric_kl_equals_torch_kl_div_both_ways():
    torch.manual_seed(0)
    p, q = torch.randn(6, 5), torch.randn(6, 5) * 2
    log_p, log_q = F.log_softmax(p, -1), F.log_softmax(q, -1)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(P || Q)
    backward = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(Q || P)
    assert torch.allclose(symmetric_kl(p, q), forward + backward, atol=1e-6)
    assert torch.allclose(symmetric_kl(p, q), symmetric_kl(q, p))
    assert symmetric_kl(p, p).abs().max() == 0
    # By hand: P = (1/2, 1/2), Q = (1/4, 3/4): sum (p - q) log(p / q).
    hand = 0.25 * torch.log(torch.tensor(2.0)) - 0.25 * torch.log(torch.tensor(2 / 3))
    assert symmetric_kl(torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]]))).item() == \
        pytest.approx(hand.item(), abs=1e-6)


def classifier(dropout=0.3):
    torch.manual_seed(0)
    gpt = GPT2Model.from_name_or_path("tiny", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return GPT2SentimentClassifier(gpt, 3, dropout).train()  # training mode: dropout active


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = mask[3, 3:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def logits_fn(m, b):
    return m(b["input_ids"], b["attention_mask"])


def test_eps_zero_gives_a_zero_regulariser_with_dropout_on():
    model, b = classifier(), batch()
    smart = Smart(SmartConfig(smart_lambda=1.0, smart_eps=0.0, smart_steps=2), logits_fn)
    torch.manual_seed(3)
    logits, penalty, logs = smart.forward(model, b)
    assert penalty.item() == 0.0 and logs["smart_loss"].item() == 0.0
    torch.manual_seed(3)
    assert torch.equal(logits, logits_fn(model, b))  # the clean pass is the plain forward, same dropout
    on = Smart(SmartConfig(smart_lambda=1.0, smart_eps=1e-2, smart_step_size=1e-2), logits_fn)
    assert on.forward(model, b)[1].item() > 0


def test_perturbation_stays_in_the_ball_off_the_padding_and_ascends():
    model, b = classifier(0.0), batch(1)
    seen = []

    def recording(m, bt):  # the perturbation = hooked embedding output - the plain embedding
        emb = m.gpt.word_embedding
        seen.append((emb(bt["input_ids"]) - F.embedding(bt["input_ids"], emb.weight)).detach())
        return logits_fn(m, bt)

    eps = 0.05
    losses = {}
    for steps in (0, 1):
        seen.clear()
        torch.manual_seed(5)
        smart = Smart(SmartConfig(smart_lambda=1.0, smart_eps=eps, smart_steps=steps, smart_step_size=eps,
                                  smart_noise=eps), recording)
        losses[steps] = smart.forward(model, b)[2]["smart_loss"].item()
        assert len(seen) == steps + 2  # clean, each ascent step, the final perturbed pass
        assert seen[0].abs().max() == 0
        for delta in seen[1:]:
            assert delta.abs().max() <= eps + 1e-7
            assert delta[b["attention_mask"] == 0].abs().max() == 0
    assert seen[-1].abs().amax(dim=(1, 2)).min() == pytest.approx(eps)  # a normalised step reaches the boundary
    assert losses[1] > losses[0]


def test_bregman_term_is_zero_at_the_start_and_the_ema_follows_its_formula():
    model, b = classifier(), batch(2)
    smart = Smart(SmartConfig(bregman_mu=1.0, bregman_beta=0.9), logits_fn)

    class Host:  # what on_fit_start / on_step_end read of the trainer
        engine = model

    Host.model = model
    smart.on_fit_start(Host())
    assert smart.forward(model, b)[2]["bregman_loss"].item() == 0.0
    before = {n: p.detach().clone() for n, p in smart.ema.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    smart.on_step_end(Host(), 1)
    for name, p in model.named_parameters():
        want = 0.9 * before[name] + 0.1 * p.detach()
        assert torch.allclose(dict(smart.ema.named_parameters())[name], want, atol=1e-6), name
    assert smart.forward(model, b)[2]["bregman_loss"].item() > 0
    assert set(smart.state_dict()["ema"]) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_random_state_replays_the_same_dropout():
    state = RandomState(torch.device("cpu"))
    first = F.dropout(torch.ones(100), 0.5)
    with state.replay():
        again = F.dropout(torch.ones(100), 0.5)
    after = F.dropout(torch.ones(100), 0.5)
    assert torch.equal(first, again) and not torch.equal(first, after)
    delta = torch.full((1, 2, 64), 0.5)
    model = classifier()
    with perturbed_embeddings(model, delta):
        out = model.gpt.word_embedding(torch.tensor([[1, 2]]))
    assert torch.allclose(out - model.gpt.word_embedding(torch.tensor([[1, 2]])), delta)


def classifier_run(tmp_path, tokenizer_dir, run, *extra):
    import classifier as script

    files = []
    for split, n, test in (("train", 16, False), ("dev", 8, False), ("test", 4, True)):
        path = write_sentiment(tmp_path / f"cf-{split}.csv", keyword_sentiment(n, len(files), 2), test=test)
        files += [f"--cfimdb_{split}", str(path)]
    return script.main(["--model_size", "tiny", "--no_progress", "--tokenizer", str(tokenizer_dir), "--datasets",
                        "cfimdb", "--fine-tune-mode", "full-model", "--lr", "1e-3", "--batch_size", "8",
                        "--predictions_dir", str(run / "pred"), "--run_dir", str(run), *files, *extra])


def test_classifier_with_smart_logs_both_terms_and_resumes_exactly(tmp_path, tokenizer_dir):
    from common.io import read_jsonl_log
    from training import checkpoint

    flags = ["--epochs", "2", "--smart_lambda", "1", "--smart_eps", "1e-3", "--bregman_mu", "1",
             "--bregman_beta", "0.5"]
    full = classifier_run(tmp_path, tokenizer_dir, tmp_path / "a", *flags)
    epochs = [r for r in read_jsonl_log(tmp_path / "a" / "cfimdb" / "metrics.jsonl") if r["event"] == "epoch"]
    assert all(e["train_smart_loss"] > 0 and e["train_bregman_loss"] >= 0 for e in epochs)
    assert epochs[1]["train_bregman_loss"] > 0
    ema = checkpoint.load(tmp_path / "a" / "cfimdb" / "last.pt")["callbacks"][0]["ema"]
    assert "classifier_head.weight" in ema
    assert classifier_run(tmp_path, tokenizer_dir, tmp_path / "b", *flags, "--stop_after_epoch", "1") == {}
    resumed = classifier_run(tmp_path, tokenizer_dir, tmp_path / "b", *flags, "--resume", str(tmp_path / "b"))
    assert resumed == full
    a, b = (checkpoint.load(tmp_path / d / "cfimdb" / "last.pt") for d in ("a", "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["callbacks"][0]["ema"][k], b["callbacks"][0]["ema"][k]) for k in ema)


def test_paraphrase_detector_with_smart_and_lora(tmp_path, tokenizer_dir):
    import paraphrase_detection as script
    from common.io import read_jsonl_log

    train, dev = (write_quora(tmp_path / f"{s}.csv", quora_pairs(n, seed))
                  for s, n, seed in (("t", 16, 1), ("d", 8, 2)))
    test = write_quora(tmp_path / "test.csv", quora_pairs(4, 3), labels=False)
    out = script.main(["--model_size", "tiny", "--no_progress", "--tokenizer", str(tokenizer_dir), "--epochs", "1",
                       "--para_train", str(train), "--para_dev", str(dev), "--para_test", str(test),
                       "--para_dev_out", str(tmp_path / "dev-out.csv"), "--para_test_out", str(tmp_path / "t-out.csv"),
                       "--run_dir", str(tmp_path / "run"), "--peft", "lora", "--lora_r", "2",
                       "--smart_lambda", "2", "--bregman_mu", "1"])
    assert 0 <= out["accuracy"] <= 1
    epoch = [r for r in read_jsonl_log(tmp_path / "run" / "metrics.jsonl") if r["event"] == "epoch"][0]
    assert epoch["train_smart_loss"] > 0 and epoch["train_bregman_loss"] > 0  # both terms ran and were logged
    # The (no, yes) probabilities saved for ensemble.py are the ones the dev predictions were made from.
    from tasks.data import PARAPHRASE_HEADER, read_predictions
    from tasks.run_outputs import outputs_path, read_outputs

    saved = read_outputs(outputs_path(tmp_path / "run", "para", "dev"))
    rows = read_predictions(tmp_path / "dev-out.csv", PARAPHRASE_HEADER, (8505, 3919))
    assert [r[1] for r in rows] == [[3919, 8505][int(p[1] > p[0])] for p in saved.probs]
    assert saved.prediction_file == "para-dev-output.csv" and saved.classes == 2


def test_bad_smart_flags_name_the_flag(tmp_path, capsys):
    import classifier as script
    from training.cli import entry_point

    with pytest.raises(SystemExit) as exc:
        entry_point(script.main)(["--smart_lambda", "1", "--smart_eps", "-1"])
    assert exc.value.code == 2 and "--smart_eps: must be >= 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        entry_point(script.main)(["--bregman_mu", "1", "--bregman_beta", "1"])
    assert "--bregman_beta" in capsys.readouterr().err


def test_smart_under_two_gloo_ranks(tmp_path, capsys):
    """DistributedDataParallel: 2 ranks x batch 2 with the Bregman term == 1 process x batch 4 (weights and
    EMA copy); the adversarial term runs too, the ranks ending with the same weights.  FSDP is refused,
    naming the flag."""
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    import classifier
    from training.cli import entry_point

    sys.path.insert(0, str(Path(__file__).parent))
    import smart_worker
    import speed_worker

    common = ["--epochs", "1", "--lr", "1e-2"]  # 3 steps: the last global batch of 3 splits 2 + 1
    bregman = {"bregman_mu": 1.0, "bregman_beta": 0.5}
    single = smart_worker.run(str(tmp_path / "single"), ["--batch_size", "4", *common], bregman)
    runs = {"bregman": (["--batch_size", "2", *common], bregman),
            "adversarial": (["--batch_size", "2", *common], {"smart_lambda": 1.0, "smart_eps": 1e-2})}
    mp.spawn(speed_worker.spawn_worker, nprocs=2,
             args=(2, speed_worker.free_port(), str(tmp_path), runs, smart_worker.run))
    out = {(n, r): torch.load(tmp_path / f"{n}-rank{r}.pt", weights_only=True) for n in runs for r in (0, 1)}
    for name in single["state"]:
        torch.testing.assert_close(out["bregman", 0]["state"][name], single["state"][name], rtol=1e-5, atol=1e-5)
        assert torch.equal(out["adversarial", 0]["state"][name], out["adversarial", 1]["state"][name])
    assert single["ema"] and all(torch.allclose(out["bregman", r]["ema"][k], v, atol=1e-5)
                                 for k, v in single["ema"].items() for r in (0, 1))
    assert all(e["train_smart_loss"] > 0 for e in out["adversarial", 0]["epochs"])
    for flag in ("--smart_lambda", "--bregman_mu"):
        with pytest.raises(SystemExit) as exc:
            entry_point(classifier.main)([flag, "1", "--fsdp"])
        assert exc.value.code == 2 and f"{flag}: " in capsys.readouterr().err
