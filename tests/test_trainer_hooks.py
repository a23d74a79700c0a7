"""The trainer's extension points (training/task.py) and recipes: callback state inside last.pt with
exact resume, extra parameter groups, epoch hooks that stop training, patience, outputs kept for the
best epoch, loss terms logged, schedules, layer-wise learning-rate decay, SGD; and the one model
loader (training/checkpoint.load_model) on a LoRA run, a classifier run and a distillation run."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

from common.errors import CheckpointError, UserError
from training import checkpoint
from training.cli import add_common_args, build_configs
from training.optimizers import build_optimizer, lr_schedule, param_groups
from training.task import Callback, Evaluation, TrainTask
from training.trainer import Trainer


def train_config(*argv):
    args = add_common_args(argparse.ArgumentParser()).parse_args(
        ["--no_progress", "--lr", "0.05", "--warmup_ratio", "0", "--max_grad_norm", "0", *argv])
    return build_configs(args).train


def regression_task(callbacks=(), evaluate=None, loss_logs=False):
    torch.manual_seed(0)
    x, w = torch.randn(16, 3), torch.tensor([[1.0], [-2.0], [0.5]])
    y = x @ w

    def loss(m, b):
        value = nn.functional.mse_loss(m(b["x"]), b["y"])
        return (value, len(b["x"]), {"half": value.detach() / 2}) if loss_logs else (value, len(b["x"]))

    evaluate = evaluate or (lambda m: {"mse": nn.functional.mse_loss(m(x), y).item()})
    return TrainTask("reg", [4] * 16, lambda idx: {"x": x[idx], "y": y[idx]}, loss, evaluate,
                     metric="mse", higher_is_better=False, callbacks=list(callbacks))


class Counter(Callback):
    """State that must survive --resume: micro-batches and steps seen, an EMA of the weight."""

    def __init__(self):
        self.micro, self.steps, self.ema = 0, 0, None

    def on_micro_batch_end(self, trainer, batch):
        self.micro += 1

    def on_step_end(self, trainer, step):
        self.steps = step
        w = trainer.model.weight.detach().clone()
        self.ema = w if self.ema is None else 0.9 * self.ema + 0.1 * w

    def state_dict(self):
        return {"micro": self.micro, "steps": self.steps, "ema": self.ema}

    def load_state_dict(self, state):
        self.micro, self.steps, self.ema = state["micro"], state["steps"], state["ema"]


def fit(tmp_path, *argv, callbacks=(), **task_kw):
    torch.manual_seed(1)
    model = nn.Linear(3, 1)
    result = Trainer(model, regression_task(callbacks, **task_kw), train_config(*argv), torch.device("cpu"),
                     tmp_path).fit()
    return model, result


def test_callback_state_lives_in_last_pt_and_resumes_exactly(tmp_path):
    full_cb, cut_cb, resumed_cb = Counter(), Counter(), Counter()
    full, _ = fit(tmp_path / "full", "--epochs", "3", "--batch_size", "4", callbacks=[full_cb])
    fit(tmp_path / "cut", "--epochs", "3", "--batch_size", "4", "--stop_after_epoch", "2", callbacks=[cut_cb])
    assert checkpoint.load(tmp_path / "cut" / "last.pt")["callbacks"][0]["micro"] == 8
    resumed, _ = fit(tmp_path / "cut", "--epochs", "3", "--batch_size", "4", "--resume", str(tmp_path / "cut"),
                     callbacks=[resumed_cb])
    assert (resumed_cb.micro, resumed_cb.steps) == (full_cb.micro, full_cb.steps) == (12, 12)
    assert torch.equal(resumed_cb.ema, full_cb.ema) and torch.equal(resumed.weight, full.weight)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    with pytest.raises(UserError, match="state of 1 callback"):  # a resumed run without the callback
        fit(tmp_path / "cut", "--epochs", "3", "--batch_size", "4", "--resume", str(tmp_path / "cut"))


def test_extra_parameter_groups_are_trained_and_saved(tmp_path):
    class Projection(Callback):
        def __init__(self):
            self.scale = nn.Parameter(torch.ones(()))

        def param_groups(self, model):
            return [{"params": [self.scale], "lr": 0.5}]

    model = nn.Linear(3, 1)
    opt = build_optimizer(model, train_config("--weight_decay", "0.1"), Projection().param_groups(model))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1]
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[2]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="repeats parameters"):
        build_optimizer(model, train_config(), [{"params": [model.weight]}])


def test_epoch_hook_stops_training_and_resume_does_not_restart_it(tmp_path):
    class StopAfterTwo(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            return epoch >= 2

    _, result = fit(tmp_path, "--epochs", "5", callbacks=[StopAfterTwo()])
    assert result.stopped_early == "StopAfterTwo ended training" and not result.interrupted
    records = [r for r in checkpoint.load(tmp_path / "last.pt").items() if r[0] == "epoch"]
    assert records == [("epoch", 2)]
    _, again = fit(tmp_path, "--epochs", "5", "--resume", str(tmp_path), callbacks=[StopAfterTwo()])
    assert again.best_epoch == result.best_epoch and again.stopped_early == result.stopped_early


def test_patience_stops_after_epochs_without_improvement(tmp_path):
    scores = iter([3.0, 2.0, 2.5, 2.2, 2.1, 1.0])
    _, result = fit(tmp_path, "--epochs", "6", "--patience", "3", evaluate=lambda m: {"mse": next(scores)})
    assert result.best_epoch == 2 and result.best_metrics["mse"] == 2.0
    assert "no better dev mse for 3 epoch(s)" in result.stopped_early
    log = (tmp_path / "metrics.jsonl").read_text()
    assert log.count('"event": "epoch"') == 5 and '"event": "early_stop"' in log


def test_outputs_of_the_best_epoch_are_kept_in_best_pt(tmp_path):
    scores = iter([2.0, 1.0, 3.0])
    epoch = iter(range(1, 4))
    _, result = fit(tmp_path, "--epochs", "3",
                    evaluate=lambda m: Evaluation({"mse": next(scores)}, {"texts": [f"epoch {next(epoch)}"]}))
    assert result.best_epoch == 2 and result.best_outputs == {"texts": ["epoch 2"]}
    assert checkpoint.load(tmp_path / "best.pt")["outputs"] == {"texts": ["epoch 2"]}
    assert "epoch 2" not in (tmp_path / "metrics.jsonl").read_text()  # outputs are not metrics


def test_loss_terms_and_steps_are_logged(tmp_path):
    from common.io import read_jsonl_log

    fit(tmp_path, "--epochs", "2", "--batch_size", "2", loss_logs=True)
    records = read_jsonl_log(tmp_path / "metrics.jsonl")
    epochs = [r for r in records if r["event"] == "epoch"]
    assert all(e["train_half"] == pytest.approx(e["train_loss"] / 2) for e in epochs)
    steps = [r for r in records if r["event"] == "step"]
    assert [s["step"] for s in steps] == [8, 16]  # 8 batches an epoch: one record at its end (LOG_EVERY 10)
    assert all(s["train_half"] == pytest.approx(s["train_loss"] / 2) for s in steps)


def test_schedules():
    linear, cosine = lr_schedule("linear", 2, 10), lr_schedule("cosine", 2, 10)
    constant, inv = lr_schedule("constant", 2, 10), lr_schedule("inverse_sqrt", 4, 100)
    assert [linear(s) for s in range(2)] == [cosine(s) for s in range(2)] == [constant(s) for s in range(2)] == [0.5, 1.0]
    assert cosine(2) == pytest.approx(1.0) and cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert constant(9) == 1.0 and linear(9) == pytest.approx(1 / 8)
    assert inv(3) == 1.0 and inv(15) == pytest.approx(math.sqrt(4 / 16))
    with pytest.raises(UserError, match="lr_schedule"):
        lr_schedule("step", 0, 10)


def test_layer_wise_learning_rate_decay():
    from models.gpt2 import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_name_or_path("tiny")  # 2 layers
    opt = build_optimizer(model, train_config("--lr", "1.0", "--layer_lr_decay", "0.5"))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    gpt = model.gpt
    assert lr_of[id(gpt.word_embedding.weight)] == 0.125  # depth 0: 0.5^3
    assert lr_of[id(gpt.gpt_layers[0].interm_dense.weight)] == 0.25
    assert lr_of[id(gpt.gpt_layers[1].interm_dense.bias)] == 0.5
    assert lr_of[id(gpt.final_layer_norm.weight)] == 1.0
    assert len(lr_of) == len({id(p) for p in model.parameters()})  # the tied embedding once
    flat = param_groups(model, 0.0)
    assert {g["lr_scale"] for g in flat} == {1.0}


def test_sgd_is_torch_sgd(tmp_path):
    model, _ = fit(tmp_path, "--epochs", "1", "--batch_size", "16", "--optimizer", "sgd", "--momentum", "0")
    torch.manual_seed(1)
    ref = nn.Linear(3, 1)
    task = regression_task()
    batch = task.make_batch(list(range(16)))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    nn.functional.mse_loss(ref(batch["x"]), batch["y"]).backward()
    opt.step()
    torch.testing.assert_close(model.weight, ref.weight, rtol=1e-6, atol=1e-7)


def test_flags_reject_non_finite_values():
    for flag, value in (("--lr", "inf"), ("--lr", "nan"), ("--weight_decay", "-1"), ("--layer_lr_decay", "0"),
                        ("--patience", "0"), ("--max_grad_norm", "nan")):
        with pytest.raises(UserError, match=flag.lstrip("-")):
            train_config(flag, value)


# ---- the one model loader -------------------------------------------------------------------
def test_load_model_from_lora_classifier_and_distillation_runs(tmp_path):
    from distillation.models import StudentWithAligner
    from distillation.losses import HiddenStateAligner
    from models.gpt2 import GPT2LMHeadModel, GPT2Model
    from tasks.sentiment import GPT2SentimentClassifier
    from training.checkpoint import load_model, save_atomic
    from training.config import EfficiencyConfig
    from training.efficient import model_state, prepare_model

    ids = torch.randint(0, 50257, (2, 7))
    torch.manual_seed(3)
    lm = GPT2LMHeadModel.from_name_or_path("tiny")
    prepare_model(lm, EfficiencyConfig(peft="lora", lora_r=2, lora_targets="qv"))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter
    save_atomic({"model": model_state(lm)}, tmp_path / "lora" / "best.pt")
    torch.manual_seed(3)
    loaded = load_model(GPT2LMHeadModel, "tiny", tmp_path / "lora")  # a run directory
    assert not loaded.training
    torch.testing.assert_close(loaded(ids), lm.eval()(ids))

    clf = GPT2SentimentClassifier(GPT2Model.from_name_or_path("tiny"), 5, 0.0)
    save_atomic({"model": clf.state_dict()}, tmp_path / "clf.pt")
    backbone = load_model(GPT2Model, "tiny", tmp_path / "clf.pt")
    torch.testing.assert_close(backbone(ids)["last_hidden_state"], clf.gpt.eval()(ids)["last_hidden_state"])

    student = GPT2LMHeadModel.from_name_or_path("tiny")
    wrapped = StudentWithAligner(student, HiddenStateAligner(64, 64, []))
    save_atomic({"model": wrapped.state_dict()}, tmp_path / "distill.pt")
    torch.testing.assert_close(load_model(GPT2LMHeadModel, "tiny", tmp_path / "distill.pt")(ids), student.eval()(ids))

    with pytest.raises(CheckpointError, match="do not fit the model .* the run was trained with"):
        load_model(GPT2LMHeadModel, str(_other_shape(tmp_path)), tmp_path / "clf.pt")
    with pytest.raises(CheckpointError, match="without best.pt or last.pt"):
        load_model(GPT2LMHeadModel, "tiny", tmp_path)


def _other_shape(tmp_path):
    from config import GPT2Config
    from models.gpt2 import GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=50257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      max_position_embeddings=64)).save_pretrained(tmp_path / "small")
