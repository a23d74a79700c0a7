"""Peak memory, step time and trainable-parameter share of full fine-tuning vs first-half frozen vs
LoRA r = 4, 8, 16, 32, each with and without gradient checkpointing, on a random-weight GPT-2.

    python -m bench.peft --device cuda                     # gpt2-large shape, batch 8 x 128, fp32
    python -m bench.peft --device cpu                      # gpt2-large shape, batch 1 x 128 (slow)
    python -m bench.peft --device cpu --model gpt2-medium  # what fits a busy 2-core CPU

A training step is the sonnet script's: forward of GPT2LMHeadModel, next-token cross-entropy,
backward, our AdamW step (the trainer's `make_optimizer`), zero_grad.  Every configuration runs in a
fresh subprocess, set up by the same `training.efficient.prepare_model` the Trainer calls, so that
its peak memory is its own: CUDA max allocated on a GPU, the process's peak RSS on the CPU (there
also minus the RSS after imports, before the model is built, which is the same in every process).
Step time is the median over the timed steps after `--warmup` untimed ones (the first step
allocates the optimiser state).  Ratios are against full fine-tuning without checkpointing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import machine_description, markdown_table, median, sync, write_results
from models.losses import next_token_loss

REPO = Path(__file__).resolve().parent.parent
RANKS = (4, 8, 16, 32)
REFERENCE = "reference (issue 5): gpt2-large, LoRA r=16 3.36 GB vs full fine-tuning 12.78 GB GPU memory (26 %)"


def configurations() -> list[str]:
    base = ["full", "first-half"] + [f"lora-r{r}" for r in RANKS]
    return [name + ckpt for name in base for ckpt in ("", "+ckpt")]


def efficiency_args(name: str, lora_targets: str):
    """The EfficiencyConfig a configuration stands for."""
    from training.config import EfficiencyConfig

    kind, _, ckpt = name.partition("+")
    ns = EfficiencyConfig(lora_targets=lora_targets, grad_checkpointing=ckpt == "ckpt")
    if kind == "first-half":
        ns.freeze = "first-half"
    elif kind.startswith("lora-r"):
        ns.peft, ns.lora_r = "lora", int(kind[len("lora-r"):])
        ns.lora_alpha = 2.0 * ns.lora_r
    elif kind != "full":
        raise ValueError(f"unknown configuration {name!r}; choose from {configurations()}")
    return ns


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process; returns its measurements."""
    import peft  # noqa: F401  imported in every configuration so the CPU baseline RSS is the same
    
    from config import GPT2Config
    from models.gpt2 import GPT2LMHeadModel
    from training.build import autocast
    from training.efficient import efficiency_report, prepare_model, reset_peak_memory
    from training.trainer import make_optimizer

    device = torch.device(args.device)
    baseline = current_rss() if device.type == "cpu" else 0
    reset_peak_memory(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(GPT2Config.from_name(args.model))
    prepare_model(model, efficiency_args(args.child, args.lora_targets))
    opt = make_optimizer(model, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)
    model.train()

    def step() -> None:
        with autocast(device, args.precision):
            logits = model(ids)
        loss = next_token_loss(logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    report = efficiency_report(model, device)
    return {"config": args.child, "step_s": median(times), "times": times, "baseline_bytes": baseline,
            "trainable_params": report["trainable_params"], "total_params": report["total_params"],
            "trainable_pct": report["trainable_pct"], "peak_memory_bytes": report["peak_memory_bytes"],
            "peak_memory_kind": report["peak_memory_kind"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="gpt2-large", help="preset shape (random weights)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 3 on CUDA; 0 on CPU, where one step is minutes and its time then includes allocating the optimiser state)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    parser.add_argument("--lora_targets", default="attn", help="as the --lora_targets flag of the scripts")
    parser.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                        help=f"subset of {configurations()} (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per configuration")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one configuration, print JSON
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (8 if cuda else 1)
    args.steps = args.steps or (10 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    if args.child:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    names = args.configs or configurations()
    for name in names:
        efficiency_args(name, args.lora_targets)  # unknown names fail before any run
    common = ["--device", args.device, "--model", args.model, "--batch_size", str(args.batch_size),
              "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--precision", args.precision, "--lora_targets", args.lora_targets]
    results = {}
    for name in names:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bench.peft", *common, "--child", name], cwd=REPO,
                              capture_output=True, text=True, timeout=args.timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"configuration {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
        r = results[name]
        print(f"{name}: {r['step_s']:.2f} s/step, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr, flush=True)

    ref = results.get("full")
    kind = next(iter(results.values()))["peak_memory_kind"]
    mem_label = "CUDA max allocated" if kind == "cuda_max_allocated" else "peak RSS"
    header = ["configuration", "trainable params", "trainable %", f"{mem_label} GiB"]
    if not cuda:
        header.append("peak RSS - import RSS GiB")
    header += ["memory / full", "step s", "step time / full"]
    rows = []
    for name, r in results.items():
        used = r["peak_memory_bytes"] - r["baseline_bytes"]
        row = [name, f"{r['trainable_params']:,}", f"{r['trainable_pct']:.2f}",
               f"{r['peak_memory_bytes'] / 2**30:.2f}"]
        if not cuda:
            row.append(f"{used / 2**30:.2f}")
        if ref:
            ref_used = ref["peak_memory_bytes"] - ref["baseline_bytes"]
            row += [f"{used / ref_used:.2f}", f"{r['step_s']:.2f}", f"{r['step_s'] / ref['step_s']:.2f}"]
        else:
            row += ["-", f"{r['step_s']:.2f}", "-"]
        rows.append(row)
    device = machine_description(torch.device(args.device)) if cuda else \
        f"{machine_description(torch.device('cpu')).split(',')[0]}, {os.cpu_count()} cores"
    title = (f"{args.model} shape, random weights, {args.precision}, batch {args.batch_size} x {args.seq_len} tokens, "
             f"LoRA targets {args.lora_targets} (alpha = 2r), {device}; median of {args.steps} timed step(s) after "
             f"{args.warmup} warm-up; each configuration in its own subprocess; memory ratio "
             f"{'of CUDA max allocated' if cuda else 'of peak RSS minus the RSS after imports'}")
    print(title)
    print(markdown_table(header, rows))
    print(REFERENCE)
    payload = {"device": device, "model": args.model, "precision": args.precision, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
               "lora_targets": args.lora_targets, "results": results}
    print("wrote", write_results(f"peft-{args.device}-{args.model}", payload))


if __name__ == "__main__":
    main()
