"""Impossible Distillation rounds: round chaining (round 2's candidates come from round 1's student), stage
skipping (complete stages are not rerun, incomplete or stale ones are), settings checks, interruption; the
real `run` end to end with a trained critic, then the detector trained on its output with the contrastive
term; the contrastive groups and losses against hand computations."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from distillation import impossible as imp
from distillation import synthetic
from distillation.rounds import RoundStages, run_rounds
from tasks.data import ParaphraseExample, read_paraphrase

SETTINGS = {"generate": {"n": 1}, "filter": {"tau": 0.5}, "train": {"epochs": 1}, "build": {"neg": 1}}


class FakeStages:
    """Stages that write tiny outputs and record every call."""

    def __init__(self, interrupt_round=None):
        self.calls, self.interrupt_round = [], interrupt_round

    def generate(self, gen_in, mode, out):
        self.calls.append(("generate", gen_in, mode))
        imp.write_jsonl(out, [{"context_id": 0, "a": f"q from {gen_in}", "b": "p", "source": mode}])
        return {"samples": 2, "candidates": 1, "model": gen_in}

    def filter(self, cand, out):
        self.calls.append(("filter", str(cand)))
        imp.write_jsonl(out, imp.read_jsonl(cand))
        return {"kept": 1, "removed": {"critic": 0}, "critic_score_mean_kept": 0.8}

    def train(self, gen_in, filtered, gen_dir, run_dir):
        self.calls.append(("train", gen_in, str(filtered)))
        if self.interrupt_round and gen_dir.parent.name == f"round-{self.interrupt_round}":
            return None
        gen_dir.mkdir(parents=True, exist_ok=True)
        (gen_dir / "config.json").write_text("{}")
        return {"generator_out": str(gen_dir), "train_pairs": 1, "train_loss_first": 2.0, "train_loss_last": 1.0,
                "train_step_loss_first": 2.0, "train_step_loss_last": 1.5, "dev_ce_before": 2.0, "dev_ce_after": 1.2}

    def build(self, files, out):
        self.calls.append(("build", [str(f) for f in files]))
        out.write_text("csv")
        return {"positives": 2, "negatives": 2, "rows": 4}

    def stages(self):
        return RoundStages(self.generate, self.filter, self.train, self.build)


def test_rounds_chain_each_student_into_the_next_round_and_skip_complete_stages(tmp_path):
    fake = FakeStages()
    summary = run_rounds(tmp_path, 3, "PRETRAINED", "rewrite", fake.stages(), SETTINGS, say=lambda m: None)
    r1, r2, r3 = (str(tmp_path / f"round-{k}" / "generator") for k in (1, 2, 3))
    assert [c for c in fake.calls if c[0] == "generate"] == [("generate", "PRETRAINED", "rewrite"),
                                                           ("generate", r1, "paraphrase"), ("generate", r2, "paraphrase")]
    assert [c[1] for c in fake.calls if c[0] == "train"] == ["PRETRAINED", r1, r2]
    assert [(e["generator_in"], e["generator_out"]) for e in summary["rounds"]] == [("PRETRAINED", r1), (r1, r2), (r2, r3)]
    assert summary["rounds"][1]["train_loss_first"] == 2.0 and summary["rounds"][0]["critic_score_mean"] == 0.8
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert fake.calls[-1] == ("build", [str(tmp_path / f"round-{k}" / "filtered.jsonl") for k in (1, 2, 3)])

    again = FakeStages()  # everything complete: nothing runs
    summary2 = run_rounds(tmp_path, 3, "PRETRAINED", "rewrite", again.stages(), SETTINGS, say=lambda m: None)
    assert again.calls == [] and summary2["rounds"] == [
        {**e, "stages": {"generate": "skipped", "filter": "skipped", "train": "skipped"}} for e in summary["rounds"]]

    # round 2's training incomplete (no statistics file): it runs again, and round 3 (its inputs changed) too
    (tmp_path / "round-2" / "generator.stats.json").unlink()
    third = FakeStages()
    summary3 = run_rounds(tmp_path, 3, "PRETRAINED", "rewrite", third.stages(), SETTINGS, say=lambda m: None)
    assert [c[0] for c in third.calls] == ["train", "generate", "filter", "train", "build"]
    assert [e["stages"] for e in summary3["rounds"]][1:] == [
        {"generate": "skipped", "filter": "skipped", "train": "ran"},
        {"generate": "reran", "filter": "reran", "train": "reran"}]

    with pytest.raises(UserError, match="other settings.*tau"):
        run_rounds(tmp_path, 3, "PRETRAINED", "rewrite", FakeStages().stages(),
                   {**SETTINGS, "filter": {"tau": 0.9}}, say=lambda m: None)


def test_an_interrupted_training_stops_the_rounds_and_resumes(tmp_path):
    fake = FakeStages(interrupt_round=1)
    summary = run_rounds(tmp_path, 2, "P", "continue", fake.stages(), SETTINGS, say=lambda m: None)
    assert summary["interrupted"] and summary["rounds"] == [] and "synthetic" not in summary
    assert not (tmp_path / "round-1" / "generator.stats.json").exists()
    resumed = FakeStages()
    summary = run_rounds(tmp_path, 2, "P", "continue", resumed.stages(), SETTINGS, say=lambda m: None)
    assert [c[0] for c in resumed.calls] == ["train", "generate", "filter", "train", "build"]  # round 1: only training
    with pytest.raises(UserError, match="--mode"):
        run_rounds(tmp_path, 2, "P", "paraphrase", resumed.stages(), SETTINGS)


def test_run_end_to_end_two_rounds_then_the_detector(tmp_path, tokenizer_dir):
    import impossible_distillation as idist
    import paraphrase_detection as para
    from cs224n_files import quora_pairs, write_quora

    tok = ["--tokenizer", str(tokenizer_dir)]
    quora = write_quora(tmp_path / "quora.csv", quora_pairs(16, 1))
    dev = write_quora(tmp_path / "dev.csv", quora_pairs(6, 2))
    test = write_quora(tmp_path / "test.csv", quora_pairs(4, 3), labels=False)
    common = ["--model_size", "tiny", "--no_progress", "--batch_size", "8", *tok, "--epochs", "1", "--max_length", "64",
              "--para_dev", str(dev), "--para_test", str(test), "--para_dev_out", str(tmp_path / "d.csv"),
              "--para_test_out", str(tmp_path / "t.csv")]
    para.main([*common, "--para_train", str(quora), "--run_dir", str(tmp_path / "critic")])  # a trained critic
    out = tmp_path / "synth"
    argv = ["run", "--model", "tiny", *tok, "--quora", str(quora), "--rounds", "2", "--num_contexts", "4",
            "--samples_per_context", "3", "--max_new_tokens", "6", "--batch_size", "12", "--min_words", "1",
            "--min_length_ratio", "0", "--max_overlap", "1", "--critic_model", "tiny", "--critic_checkpoint",
            str(tmp_path / "critic"), "--tau", "0", "--max_length", "64", "--generator_epochs", "2",
            "--generator_lr", "3e-3", "--generator_batch_size", "8", "--dev_fraction", "0.25", "--no_progress",
            "--out", str(out)]
    summary = idist.main(argv)
    r1, r2 = summary["rounds"]
    assert r2["generator_in"] == r1["generator_out"] == str(out / "round-1" / "generator")
    assert r1["generator_in"] == str(out / "pretrained") and r2["generator_out"] == str(out / "round-2" / "generator")
    cand2 = json.loads(imp.stats_path(out / "round-2" / "candidates.jsonl").read_text())
    assert cand2["model"] == r1["generator_out"] and cand2["mode"] == "paraphrase"  # round 2 samples the student
    assert {r["source"] for r in imp.read_jsonl(out / "round-2" / "candidates.jsonl")} == {"context-student", "sample-sample"}
    for r in (r1, r2):
        assert r["candidates"] == 4 * (3 + 3) and r["kept"] + sum(r["removed"].values()) == r["candidates"]
        assert r["train_loss_last"] < r["train_loss_first"]  # the generator loss falls within each round
        assert 0 <= r["critic_score_mean"] <= 1 and 0 < r["distinct_2"] <= 1
    rows = read_paraphrase(out / "synthetic.csv")
    assert len(rows) == summary["build"]["rows"] and sum(e.label for e in rows) == summary["build"]["positives"]
    assert json.loads((out / "summary.json").read_text())["rounds"][1]["generator_in"] == r1["generator_out"]
    mtime = (out / "round-2" / "generator" / "model.safetensors").stat().st_mtime_ns
    again = idist.main(argv)  # complete: every stage skipped
    assert all(s == "skipped" for r in again["rounds"] for s in r["stages"].values())
    assert (out / "round-2" / "generator" / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="--generator_lr"):
        idist.main([*argv[:-2], "--generator_lr", "-1", "--out", str(tmp_path / "x")])

    metrics = para.main([*common, "--para_train", str(quora), "--synthetic_train", str(out / "synthetic.csv"),
                         "--kl_lambda", "0.1", "--contrastive", "infonce", "--contrastive_weight", "0.5",
                         "--smart_lambda", "1", "--smart_eps", "1e-3", "--run_dir", str(tmp_path / "detector")])
    assert set(metrics) == {"accuracy", "f1"}
    epoch = next(json.loads(line) for line in open(tmp_path / "detector" / "metrics.jsonl") if '"epoch"' in line
                 and json.loads(line)["event"] == "epoch")
    assert epoch["train_contrastive"] > 0 and epoch["train_smart_loss"] > 0  # SMART with the contrastive rows


def _ex(a, b, y):
    return ParaphraseExample(f"{a}|{b}", a, b, y)


def test_contrastive_groups_and_batches():
    examples = [_ex("real q", "real p", 1), _ex("Q one?", "para one", 1), _ex("q one", "other", 0),
                _ex("Q one", "another", 0), _ex("q two", "para two", 1), _ex("q three", "x", 0)]
    synth = [False, True, True, True, True, True]
    groups = synthetic.contrastive_groups(examples, synth)
    assert groups == {1: [2, 3]}  # q two has no negative, q three no positive, the real pair is not synthetic
    rows, pos, neg = synthetic.with_negatives([4, 1, 0], groups)
    assert rows == [4, 1, 0, 2, 3] and pos.tolist() == [1] and neg.tolist() == [[3, 4]]
    rows, pos, neg = synthetic.with_negatives([0, 4], groups)
    assert rows == [0, 4] and pos.numel() == 0


def test_contrastive_losses_against_hand_computations():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.5], [0.0, 1.0], [0.3, 0.0], [0.0, -1.0]], requires_grad=True)
    s = [2.0, -0.5, 1.0, -0.3, -1.0]  # log-odds of yes
    pos, neg = torch.tensor([0, 2]), torch.tensor([[1, 3], [4, -1]])
    margin = synthetic.contrastive_loss(logits, pos, neg, "margin", margin=1.0)
    hand = (max(0, 1 - (s[0] - s[1])) + max(0, 1 - (s[0] - s[3])) + max(0, 1 - (s[2] - s[4]))) / 3
    assert float(margin.detach()) == pytest.approx(hand)  # every pair is already apart by more than 1
    tight = synthetic.contrastive_loss(logits, pos, neg, "margin", margin=3.0)
    assert float(tight.detach()) == pytest.approx(((3 - 2.5) + (3 - 2.3) + (3 - 2.0)) / 3)
    info = synthetic.contrastive_loss(logits, pos, neg, "infonce")
    hand = (F.cross_entropy(torch.tensor([[s[0], s[1], s[3]]]), torch.tensor([0]))
            + F.cross_entropy(torch.tensor([[s[2], s[4]]]), torch.tensor([0]))) / 2
    assert float(info.detach()) == pytest.approx(float(hand), abs=1e-6)
    info.backward()
    assert logits.grad[0, 1] < 0 and logits.grad[1, 1] > 0  # descent raises the positive's yes, lowers the negative's
    empty = synthetic.contrastive_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long),
                                       "margin")
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="contrastive"):
        synthetic.contrastive_loss(logits, pos, neg, "none")


def test_detector_contrastive_flag_errors(tmp_path, tokenizer_dir):
    import paraphrase_detection as para

    base = ["--model_size", "tiny", "--tokenizer", str(tokenizer_dir)]
    with pytest.raises(UserError, match="--contrastive needs --synthetic_train"):
        para.main([*base, "--contrastive", "margin"])
    with pytest.raises(UserError, match="--contrastive_weight"):
        para.main([*base, "--contrastive_weight", "2"])
    with pytest.raises(UserError, match="--contrastive_margin goes with"):
        para.main([*base, "--synthetic_train", "x.csv", "--contrastive", "infonce", "--contrastive_margin", "1"])
