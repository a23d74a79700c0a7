"""torch.optim's optimisers in the trainer's registry (training/torch_optimizers.py): each is reachable
by --optimizer, gets the trainer's parameter groups (decay only on >= 2-dim tensors, layer-wise rates),
matches torch's optimiser built by hand, and resumes exactly from its state_dict (also through the
trainer's --resume)."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from training.cli import add_common_args, build_configs
from training.optimizers import OPTIMIZERS, build_optimizer
from training.torch_optimizers import TORCH_OPTIMIZERS

HAND = {"torch_adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr),
        "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
        "radam": lambda ps, lr: torch.optim.RAdam(ps, lr=lr, decoupled_weight_decay=True),
        "nadam": lambda ps, lr: torch.optim.NAdam(ps, lr=lr, decoupled_weight_decay=True),
        "adafactor": lambda ps, lr: torch.optim.Adafactor(ps, lr=lr),
        "adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
        "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr)}


def config(name, *argv):
    args = add_common_args(argparse.ArgumentParser()).parse_args(["--optimizer", name, "--lr", "0.01", *argv])
    return build_configs(args).train


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1))


def steps(m, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
def test_matches_torch_built_by_hand_and_resumes_exactly(name):
    assert name in OPTIMIZERS
    ours_model, hand_model = model(), model()
    ours = build_optimizer(ours_model, config(name, "--weight_decay", "0.1"))
    decay = [p for p in hand_model.parameters() if p.dim() >= 2]
    rest = [p for p in hand_model.parameters() if p.dim() < 2]
    hand = HAND[name]([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], 0.01)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    steps(ours_model, ours, 3)
    steps(hand_model, hand, 3)
    for a, b in zip(ours_model.parameters(), hand_model.parameters()):
        assert torch.equal(a, b)
    # Resume: 3 steps, save, rebuild, load, 2 more == 5 steps straight.
    saved_model, saved_state = copy.deepcopy(ours_model.state_dict()), copy.deepcopy(ours.state_dict())
    steps(ours_model, ours, 2, seed=1)
    again = model()
    again.load_state_dict(saved_model)
    opt = build_optimizer(again, config(name, "--weight_decay", "0.1"))
    opt.load_state_dict(saved_state)
    steps(again, opt, 2, seed=1)
    for a, b in zip(ours_model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_layer_wise_rates_reach_torch_optimizers():
    from models.gpt2 import GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel.from_name_or_path("tiny")
    opt = build_optimizer(lm, config("radam", "--layer_lr_decay", "0.5"))
    assert sorted({round(g["lr"] / 0.01, 6) for g in opt.param_groups}) == [0.125, 0.25, 0.5, 1.0]


def test_trainer_resumes_a_torch_optimizer_exactly(tmp_path):
    from training.task import TrainTask
    from training.trainer import Trainer

    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    task = TrainTask("reg", [4] * 16, lambda idx: {"x": x[idx], "y": y[idx]},
                     lambda m, b: (nn.functional.mse_loss(m(b["x"]), b["y"]), len(b["x"])),
                     lambda m: {"mse": nn.functional.mse_loss(m(x), y).item()}, metric="mse", higher_is_better=False)

    def fit(d, *argv):
        torch.manual_seed(1)
        m = nn.Linear(3, 1)
        cfg = config("nadam", "--epochs", "3", "--batch_size", "4", "--no_progress", "--warmup_ratio", "0", *argv)
        Trainer(m, task, cfg, torch.device("cpu"), tmp_path / d).fit()
        return m

    full = fit("full")
    fit("cut", "--stop_after_epoch", "1")
    resumed = fit("cut", "--resume", str(tmp_path / "cut"))
    assert torch.equal(full.weight, resumed.weight) and torch.equal(full.bias, resumed.bias)
