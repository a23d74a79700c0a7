"""Processes for tests/test_fault_injection.py to kill or to race: a tiny training run that SIGKILLs
itself half-way through a chosen checkpoint write, a holder of a run directory's lock, and a run
that creates its default run directory at an agreed instant.

    python tests/fault_worker.py train RUN_DIR NAME:N [FLAG ...]   # killed in the N-th write of NAME
    python tests/fault_worker.py lock RUN_DIR                      # hold RUN_DIR's lock until stdin closes
    python tests/fault_worker.py newdir ROOT START_AT GO_FILE      # once GO_FILE exists: a new default run
                                                                   # dir, the clock frozen at START_AT

`regression_run` is the training run itself; the test calls it in its own process too (the
uninterrupted reference and the resumed run), so all three are the same computation.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def regression_run(run_dir, *argv):
    """Linear regression (8 examples, 2 steps an epoch, 3 epochs, dev MSE falls every epoch) through
    the shared Trainer with a real signature; returns (model, FitResult)."""
    import argparse

    import torch
    from torch import nn

    from training.cli import add_common_args, build_configs
    from training.trainer import Trainer, TrainTask

    args = add_common_args(argparse.ArgumentParser()).parse_args(
        ["--no_progress", "--lr", "0.05", "--warmup_ratio", "0", "--max_grad_norm", "0", "--batch_size", "4",
         "--epochs", "3", *argv])
    cfg = build_configs(args)
    torch.manual_seed(0)
    x, w = torch.randn(8, 3), torch.tensor([[1.0], [-2.0], [0.5]])
    y = x @ w
    model = nn.Linear(3, 1)
    task = TrainTask("reg", [4] * 8, lambda idx: {"x": x[idx], "y": y[idx]},
                     lambda m, b: (nn.functional.mse_loss(m(b["x"]), b["y"]), len(b["x"])),
                     lambda m: {"mse": nn.functional.mse_loss(m(x), y).item()}, metric="mse", higher_is_better=False)
    trainer = Trainer(model, task, cfg.train, torch.device("cpu"), Path(run_dir), signature=cfg.signature)
    return model, trainer.fit()


def kill_in_write(name: str, nth: int) -> None:
    """Patch torch.save: the `nth` write of checkpoint `name` (best.pt / last.pt) leaves half its
    bytes in the temporary file, then the process is SIGKILLed (no cleanup runs)."""
    import torch

    real_save, seen = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if os.path.basename(str(f)).startswith(f".{name}."):
            seen["n"] += 1
            if seen["n"] == nth:
                os.truncate(f, os.path.getsize(f) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save


def main(argv: list[str]) -> int:
    from common.errors import UserError
    from training.rundir import lock_run_dir, new_run_dir

    mode = argv[0]
    try:
        if mode == "train":
            name, nth = argv[2].split(":")
            kill_in_write(name, int(nth))
            regression_run(argv[1], *argv[3:])
        elif mode == "lock":
            lock_run_dir(argv[1])
            print("locked", flush=True)
            sys.stdin.read()  # hold the lock until the test closes our stdin (or kills us)
        elif mode == "newdir":
            frozen = time.gmtime(float(argv[2]))  # every worker in the same second, however late it started
            time.gmtime = lambda *_: frozen
            print("ready", flush=True)
            while not Path(argv[3]).exists():  # start together
                time.sleep(0.001)
            path = new_run_dir("sweep", argv[1])
            lock_run_dir(path)
            print(path, flush=True)
        else:
            raise SystemExit(f"unknown mode {mode}")
    except UserError as exc:
        print(f"fault_worker: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
