"""The shared training machinery: schedule, optimiser groups, bucketing, checkpoints, accumulation, devices."""
from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import CheckpointError, UserError
from common.params import count_parameters
from training import checkpoint
from training.batching import bucketed_batches, pad_right, sorted_batches
from training.cli import add_common_args, build_configs, resolve_device
from training.trainer import Trainer, TrainTask, linear_schedule, make_optimizer


def common_args(*argv):
    return add_common_args(argparse.ArgumentParser()).parse_args(["--no_progress", *argv])


def train_config(*argv):
    return build_configs(common_args(*argv)).train


def test_linear_warmup_then_decay():
    f = linear_schedule(warmup_steps=4, total_steps=10)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [round(f(s), 4) for s in range(4, 10)] == [1.0, 0.8333, 0.6667, 0.5, 0.3333, 0.1667]
    assert linear_schedule(0, 5)(0) == 1.0


def test_weight_decay_only_on_trainable_matrices():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].weight.requires_grad = False
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([2, 4])] and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # two biases + LayerNorm
    assert all(p is not model[0].weight for g in opt.param_groups for p in g["params"])
    assert count_parameters(model) == (4 + 8 + 8 + 2, 16 + 4 + 8 + 8 + 2)


def test_bucketed_batches_cover_everything_once_and_pad_little():
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(1000)]
    batches = bucketed_batches(lengths, 16, torch.Generator().manual_seed(0), bucket_batches=10)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    random_padded = sum(max(lengths[i] for i in order[j:j + 16]) * len(order[j:j + 16]) for j in range(0, 1000, 16))
    assert padded < 0.7 * random_padded
    again = bucketed_batches(lengths, 16, torch.Generator().manual_seed(0), bucket_batches=10)
    assert again == batches
    assert sorted(i for b in sorted_batches(lengths, 7) for i in b) == list(range(1000))
    ids, mask = pad_right([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_checkpoint_atomic_and_weights_only(tmp_path):
    gen = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"model": nn.Linear(2, 2).state_dict(), "rng": checkpoint.rng_state(gen), "args": {"lr": 1e-3}}
    draws = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    path = checkpoint.save_atomic(state, tmp_path / "sub" / "last.pt")
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    loaded = checkpoint.load(path)
    checkpoint.set_rng_state(loaded["rng"], gen)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item()) == draws
    torch.save({"evil": argparse.Namespace(x=1)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="(?i)weights.only"):
        checkpoint.load(tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def _regression_fit(tmp_path, *argv):
    torch.manual_seed(0)
    x, w = torch.randn(8, 3), torch.tensor([[1.0], [-2.0], [0.5]])
    y = x @ w
    model = nn.Linear(3, 1)
    cfg = train_config("--lr", "0.05", "--warmup_ratio", "0", "--max_grad_norm", "0", *argv)
    task = TrainTask("reg", [4] * 8, lambda idx: {"x": x[idx], "y": y[idx]},
                     lambda m, b: (nn.functional.mse_loss(m(b["x"]), b["y"]), len(b["x"])),
                     lambda m: {"mse": nn.functional.mse_loss(m(x), y).item()}, metric="mse", higher_is_better=False)
    result = Trainer(model, task, cfg, torch.device("cpu"), tmp_path).fit()
    return model, result


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    big, r1 = _regression_fit(tmp_path / "a", "--batch_size", "8", "--epochs", "3")
    acc, r2 = _regression_fit(tmp_path / "b", "--batch_size", "4", "--grad_accum", "2", "--epochs", "3")
    torch.testing.assert_close(big.weight, acc.weight, rtol=1e-5, atol=1e-6)
    assert r1.best_epoch == r2.best_epoch == 3  # the loss falls every epoch; the best is the last
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count('"event": "epoch"') == 3


def test_device_and_precision_flags():
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda .*no CUDA device"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    assert build_configs(common_args("--use_gpu")).device == "cuda"  # the starter's flag is --device cuda
    with pytest.raises(UserError, match="device: 'tpu'"):
        build_configs(common_args("--device", "tpu"))
    with pytest.raises(SystemExit):
        common_args("--precision", "fp8")


def test_a_used_run_directory_is_not_overwritten(tmp_path):
    _regression_fit(tmp_path, "--epochs", "1")
    with pytest.raises(UserError, match="already holds a run's checkpoints"):
        _regression_fit(tmp_path, "--epochs", "1")
    model, result = _regression_fit(tmp_path, "--epochs", "1", "--resume", str(tmp_path))  # finished: loads best
    assert result.best_epoch == 1 and not result.interrupted


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs(tmp_path, precision):
    model, result = _regression_fit(tmp_path, "--epochs", "2", "--precision", precision)
    assert result.best_epoch is not None and np.isfinite(result.best_metrics["mse"])
