"""A training script for the sweep tests: the real skeleton (ScriptRun, the shared trainer, its epoch
hook) on a one-weight model, with a dev `score` that is a known function of --lr and the epoch, so
the tests know which trial is best and which one the pruner must stop.

    score after epoch e = e * (4 - |log10(lr) + 3|)      (best at lr = 1e-3)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.cli import UsageError, add_common_args, entry_point  # noqa: E402
from training.runner import ScriptRun  # noqa: E402
from training.task import TrainTask  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--fail_above_lr", type=float, default=None, help="exit with an error when --lr is above this")
    add_common_args(p, epochs=3, batch_size=2, lr=1e-3, model_size="tiny")
    args = p.parse_args(argv)
    if args.fail_above_lr is not None and args.lr > args.fail_above_lr:
        raise UsageError(f"--lr {args.lr} is above --fail_above_lr {args.fail_above_lr}")
    run = ScriptRun.start("toy", args)
    model = torch.nn.Linear(1, 1).to(run.device)
    epochs_seen = []

    def evaluate(m) -> dict:
        epochs_seen.append(1)
        return {"score": len(epochs_seen) * (4 - abs(math.log10(args.lr) + 3))}

    task = TrainTask("toy", [1] * 4, lambda idx: {"x": torch.ones(len(idx), 1)},
                     lambda m, b: ((m(b["x"]) ** 2).mean(), len(b["x"])), evaluate, metric="score")
    result = run.fit(model, task)
    return result.best_metrics


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
