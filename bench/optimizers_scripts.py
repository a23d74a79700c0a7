"""Benchmark: AdamW vs SOAP vs Shampoo THROUGH THE TRAINING SCRIPTS (`--optimizer soap|shampoo`).

`bench/optimizers.py` trains the models itself; this one runs the real command lines in
subprocesses, as a user would, and reads the per-step records of each run's `RUN_DIR/metrics.jsonl`
(`step` records every `training.trainer.LOG_EVERY` batches: the mean train loss of those batches
and the wall clock; `epoch` records: the dev metric and the training seconds).  Two suites:

* `pretrain`: `pretrain.py --model_size tiny --corpus ptb.train.txt` (random init, full 50257-token
  vocabulary, one epoch over `--pretrain_blocks` packed blocks of `--max_length` tokens);
* `classifier`: `classifier.py --datasets sst --model_size tiny --fine-tune-mode full-model --limit N`.

`--model_size` / `--device` (default tiny / cpu) go to every run of both suites.

Per run: the loss curve, smoothed as the mean of the last `--smooth` step records (= `--smooth` x
LOG_EVERY batches).  The target is the smoothed train loss AdamW reaches at its last record (median
over the repeats); reported per optimizer and repeat: the first step whose smoothed loss is <= the
target, the training seconds to that step (wall clock from the first record of the epoch, dev
evaluation and checkpointing between epochs excluded), their ratios to AdamW's, the median step time
and the final dev metric.  Separate processes cannot give same-process ratios: the runs are
interleaved (repeat r runs the optimizers in rotated order) and repeated, and the load average
before and after every run is recorded.

Run: python -m bench.optimizers_scripts --suite pretrain classifier --repeats 2
Writes bench/results/optimizers-scripts.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine_description, markdown_table, write_results
from common.io import read_jsonl_log

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CS224N_SHARED_DATA", ROOT.parent / "shared" / "data"))
OPTIMIZERS = ("adamw", "soap", "shampoo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", choices=["pretrain", "classifier"], default=["pretrain", "classifier"])
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--lr", nargs="+", default=["adamw=3e-3", "soap=1e-2", "shampoo=3e-3"],
                   help="NAME=LR per optimizer (default: the best rates of bench/optimizers.py on PTB)")
    p.add_argument("--classifier_lr", nargs="+", default=["adamw=1e-3", "soap=3e-3", "shampoo=1e-3"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pretrain_blocks", type=int, default=2400, help="--limit of pretrain.py (training blocks)")
    p.add_argument("--max_length", type=int, default=32, help="pretrain block length")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--classifier_limit", type=int, default=2000)
    p.add_argument("--classifier_epochs", type=int, default=2)
    p.add_argument("--smooth", type=int, default=3, help="step records averaged into the smoothed loss")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each run")
    p.add_argument("--model_size", default="tiny", help="--model_size of every run (e.g. gpt2 on a GPU)")
    p.add_argument("--device", default="cpu", help="--device of every run")
    p.add_argument("--data", type=Path, default=DATA, help="the shared data directory (ptb/, cs224n/)")
    p.add_argument("--name", default="optimizers-scripts", help="results file bench/results/NAME.json")
    p.add_argument("--report", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only print the tables of earlier results files (several: one table over all their runs)")
    return p.parse_args(argv)


def rates(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = float(value)
    return out


def command(suite: str, optimizer: str, lr: float, run_dir: Path, args) -> list[str]:
    common = ["--model_size", args.model_size, "--optimizer", optimizer, "--lr", str(lr), "--batch_size",
              str(args.batch_size), "--no_progress", "--run_dir", str(run_dir), "--device", args.device]
    if suite == "pretrain":
        return [sys.executable, "pretrain.py", "--corpus", str(args.data / "ptb" / "ptb.train.txt"), "--epochs", "1",
                "--max_length", str(args.max_length), "--limit", str(args.pretrain_blocks), *common]
    sst = args.data / "cs224n"
    return [sys.executable, "classifier.py", "--datasets", "sst", "--fine-tune-mode", "full-model",
            "--sst_train", str(sst / "ids-sst-train.csv"), "--sst_dev", str(sst / "ids-sst-dev.csv"),
            "--sst_test", str(sst / "ids-sst-test-student.csv"), "--predictions_dir", str(run_dir / "predictions"),
            "--epochs", str(args.classifier_epochs), "--limit", str(args.classifier_limit), *common]


def curve(records: list[dict], smooth: int) -> list[dict]:
    """(step, smoothed train loss, training seconds so far) per step record; evaluation and
    checkpointing between epochs excluded (each epoch's clock starts at the record before its first step)."""
    out, window, elapsed, epoch_start, last_time, last_epoch, previous_time = [], [], 0.0, None, None, None, None
    for rec in records:
        if rec["event"] == "step":
            if rec["epoch"] != last_epoch:  # a new epoch: bank the previous one, restart the clock
                if last_epoch is not None:
                    elapsed += last_time - epoch_start
                epoch_start, last_epoch = previous_time, rec["epoch"]
            window = (window + [rec["train_loss"]])[-smooth:]
            last_time = rec["time"]
            out.append({"step": rec["step"], "loss": sum(window) / len(window), "raw": rec["train_loss"],
                        "seconds": elapsed + rec["time"] - epoch_start})
        previous_time = rec["time"]
    return out


def run_one(suite: str, optimizer: str, lr: float, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "GPT2_TOKENIZER_DIR": os.environ.get("GPT2_TOKENIZER_DIR", str(args.data / "gpt2-tokenizer")),
           "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix=f"optbench-{suite}-{optimizer}-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = command(suite, optimizer, lr, run_dir, args)
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall, load_after = time.perf_counter() - t0, os.getloadavg()[0]
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        logs = sorted(run_dir.rglob("metrics.jsonl"))
        records = read_jsonl_log(logs[-1])
    steps = curve(records, args.smooth)
    epochs = [r for r in records if r["event"] == "epoch"]
    dev = epochs[-1]["dev"]
    step_ms = [1000 * (b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in zip(steps, steps[1:])
               if b["step"] > a["step"]]
    return {"suite": suite, "optimizer": optimizer, "lr": lr, "command": " ".join(cmd[1:]), "curve": steps,
            "final_loss": steps[-1]["loss"], "dev": dev, "step_ms": statistics.median(step_ms),
            "process_s": wall, "load": [load_before, load_after]}


def to_target(run: dict, target: float) -> tuple:
    for point in run["curve"]:
        if point["loss"] <= target:
            return point["step"], point["seconds"]
    return None, None


def loss_at(run: dict, fraction: float) -> float:
    """The smoothed train loss at the first record at or after `fraction` of the run's steps."""
    last = run["curve"][-1]["step"]
    return next(p["loss"] for p in run["curve"] if p["step"] >= fraction * last)


def report(suite: str, runs: list[dict], args) -> tuple[str, dict]:
    """The table of `runs`; the target is the best AdamW rate's final loss (median over its repeats)."""
    by_lr = {}
    for r in runs:
        if r["optimizer"] == "adamw":
            by_lr.setdefault(r["lr"], []).append(r["final_loss"])
    target = min(statistics.median(v) for v in by_lr.values())
    rows, summary = [], {"target": target}
    best_lr = min(by_lr, key=lambda lr: statistics.median(by_lr[lr]))
    adam = {r["repeat"]: to_target(r, target) for r in runs if r["optimizer"] == "adamw" and r["lr"] == best_lr}
    dev_key = "valid_loss" if suite == "pretrain" else "accuracy"
    for r in sorted(runs, key=lambda r: (OPTIMIZERS.index(r["optimizer"]), r["repeat"])):
        step, sec = to_target(r, target)
        a_step, a_sec = adam.get(r["repeat"], (None, None))
        ratio = (lambda x, y: f"{x / y:.2f}" if x is not None and y else "-")
        rows.append([r["optimizer"], f"{r['lr']:g}", r["repeat"], step if step is not None else f"> {r['curve'][-1]['step']}",
                     f"{sec:.1f}" if sec is not None else "-", ratio(step, a_step), ratio(sec, a_sec),
                     *(f"{loss_at(r, q):.4f}" for q in (0.25, 0.5)), f"{r['final_loss']:.4f}",
                     f"{r['dev'][dev_key]:.4f}", f"{r['step_ms']:.0f}", f"{r['load'][0]:.1f} / {r['load'][1]:.1f}"])
        summary.setdefault(r["optimizer"], []).append({"repeat": r["repeat"], "steps": step, "seconds": sec})
    head = ["optimizer", "lr", "repeat", "steps to target", "train s to target", "steps vs AdamW",
            "time vs AdamW", "loss at 1/4", "loss at 1/2", "final smoothed train loss", f"dev {dev_key}", "step ms (median)", "load before / after"]
    return f"target: smoothed train loss {target:.4f} (the final loss of AdamW at lr {best_lr:g}, median of " \
           f"repeats; ratios against that run of the same repeat)\n\n" \
           + markdown_table(head, rows), summary


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        saved = [json.loads(Path(p).read_text()) for p in args.report]
        for suite in sorted({s for d in saved for s in d["suites"]}):
            runs = [r for d in saved for r in d["suites"].get(suite, {}).get("runs", [])]
            print(f"\n## {suite}\n\n{report(suite, runs, args)[0]}\n")
        return
    lrs = {"pretrain": rates(args.lr), "classifier": rates(args.classifier_lr)}
    results = {"machine": machine_description(torch.device("cpu")), "args": {k: str(v) for k, v in vars(args).items()}, "suites": {}}
    for suite in args.suite:
        runs = []
        for repeat in range(args.repeats):
            order = args.optimizers[repeat % len(args.optimizers):] + args.optimizers[:repeat % len(args.optimizers)]
            for name in order:
                run = run_one(suite, name, lrs[suite][name], args)
                run["repeat"] = repeat
                runs.append(run)
                print(f"{suite} {name} repeat {repeat}: final loss {run['final_loss']:.4f}, "
                      f"{run['step_ms']:.0f} ms/step, load {run['load']}", flush=True)
        table, summary = report(suite, runs, args)
        print(f"\n## {suite}\n\n{table}\n\ncommand: {runs[0]['command']}\n", flush=True)
        results["suites"][suite] = {"runs": runs, "table": table, "summary": summary}
    write_results(args.name, results)


if __name__ == "__main__":
    main()
