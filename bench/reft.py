"""Benchmark: ReFT vs LoRA vs full fine-tuning on paraphrase detection, through the real script.

Each configuration runs `paraphrase_detection.py` in its own subprocess (so its peak RSS is its own)
on the real Quora files with `--limit`, and the run's `metrics.jsonl` gives the trainable
parameters (`start`), the dev accuracy / F1 of the best epoch (`done`), the peak memory and the
training seconds of each epoch (`epoch`).  The checkpoint size is the size of `best.pt`
(adapter-only for LoRA and ReFT).  Separate processes cannot give same-process ratios: the
configurations run in rotated order per repeat and the load average is recorded with every run.

Run: python -m bench.reft --limit 800 --epochs 2 --repeats 2
Writes bench/results/reft.json.
"""
from __future__ import annotations

import argparse
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
CONFIGS = {
    "full": ["--lr", "1e-4"],
    "lora r8 attn": ["--peft", "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_targets", "attn", "--lr", "1e-3"],
    "reft r4 f1+l1 all": ["--peft", "reft", "--reft_rank", "4", "--reft_positions", "f1+l1", "--lr", "3e-3"],
    "reft r4 l4 all": ["--peft", "reft", "--reft_rank", "4", "--reft_positions", "l4", "--lr", "3e-3"],
    "reft r4 f1+l1 all lr 3e-2": ["--peft", "reft", "--reft_rank", "4", "--reft_positions", "f1+l1", "--lr", "3e-2"],
    "reft r8 all-positions lr 1e-2": ["--peft", "reft", "--reft_rank", "8", "--reft_positions", "all", "--lr", "1e-2"],
    "lora r8 attn lr 1e-2": ["--peft", "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_targets", "attn",
                             "--lr", "1e-2"],
}
DEFAULT = ["full", "lora r8 attn", "reft r4 f1+l1 all", "reft r4 l4 all"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT)
    p.add_argument("--model_size", default="tiny")
    p.add_argument("--limit", type=int, default=800)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="reft", help="results file bench/results/NAME.json")
    p.add_argument("--train", type=Path, default=DATA / "quora" / "quora-train-small.csv")
    p.add_argument("--dev", type=Path, default=DATA / "cs224n" / "quora-dev.csv")
    return p.parse_args(argv)


def run_one(name: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "GPT2_TOKENIZER_DIR": os.environ.get("GPT2_TOKENIZER_DIR", str(DATA / "gpt2-tokenizer")),
           "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="reftbench-") as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "paraphrase_detection.py", "--model_size", args.model_size, "--para_train",
               str(args.train), "--para_dev", str(args.dev), "--para_test", str(args.dev), "--para_dev_out",
               str(tmp / "dev.csv"), "--para_test_out", str(tmp / "test.csv"), "--limit", str(args.limit),
               "--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--no_progress",
               "--device", "cpu", "--run_dir", str(tmp / "run"), *CONFIGS[name]]
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall, load_after = time.perf_counter() - t0, os.getloadavg()[0]
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        records = read_jsonl_log(tmp / "run" / "metrics.jsonl")
        ckpt_bytes = (tmp / "run" / "best.pt").stat().st_size
    start = next(r for r in records if r["event"] == "start")
    end = next(r for r in records if r["event"] == "done")
    epochs = [r for r in records if r["event"] == "epoch"]
    return {"config": name, "command": " ".join(cmd[1:]), "trainable": start["trainable_params"],
            "total": start["total_params"], "trainable_pct": start["trainable_pct"], "dev": end["best"],
            "peak_rss": end["peak_memory_bytes"], "checkpoint_bytes": ckpt_bytes,
            "train_s_per_epoch": statistics.median(e["seconds"] for e in epochs),
            "tokens_per_s": statistics.median(e["tokens_per_s"] for e in epochs),
            "process_s": wall, "load": [load_before, load_after]}


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = []
    for repeat in range(args.repeats):
        order = args.configs[repeat % len(args.configs):] + args.configs[:repeat % len(args.configs)]
        for name in order:
            run = run_one(name, args)
            run["repeat"] = repeat
            runs.append(run)
            print(f"{name} repeat {repeat}: dev {run['dev']}, {run['train_s_per_epoch']:.1f} s/epoch, "
                  f"load {run['load']}", flush=True)
    rows = []
    full_s = statistics.median(r["train_s_per_epoch"] for r in runs if r["config"] == "full") \
        if "full" in args.configs else None
    for name in args.configs:
        mine = [r for r in runs if r["config"] == name]
        s = statistics.median(r["train_s_per_epoch"] for r in mine)
        rows.append([name, f"{mine[0]['trainable']:,}", f"{mine[0]['trainable_pct']:.3f}",
                     f"{statistics.median(r['checkpoint_bytes'] for r in mine) / 2**20:.2f}",
                     f"{statistics.median(r['peak_rss'] for r in mine) / 2**30:.2f}", f"{s:.1f}",
                     f"{s / full_s:.2f}" if full_s else "-",
                     f"{statistics.median(r['dev']['accuracy'] for r in mine):.4f}",
                     f"{statistics.median(r['dev']['f1'] for r in mine):.4f}",
                     " / ".join(f"{r['load'][0]:.1f}" for r in mine)])
    table = markdown_table(["config", "trainable params", "trainable %", "best.pt MiB", "peak RSS GiB",
                            "train s / epoch", "time vs full", "dev accuracy", "dev F1", "load"], rows)
    print(f"\n{table}\n\ncommand: {runs[0]['command']}")
    write_results(args.name, {"machine": machine_description(torch.device("cpu")), "runs": runs, "table": table,
                           "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
