"""One prepared GPU check: what the project claims about GPUs, measured in one run of at most ~8 minutes.

    python -m bench.gpu_check                  # on a CUDA machine (a lent GPU): JSON + a table in bench/RESULTS.md
    python -m bench.gpu_check --dry_run        # the same plan on the CPU with tiny shapes (in the test suite)

Parts, in order, each with its own time budget (seconds on a GPU); a part whose budget would carry
the run past `--time_limit` is skipped with a note, a part that fails records its error and the
others go on, and a part still running at the end of its budget is stopped (SIGALRM):

  parity       fp32 logits ours vs transformers (max |diff| < 1e-4, TF32 off) and bf16 agreement
               (max |diff|, top-1 agreement, each model's bf16 error against its own fp32), gpt2 shape
  train        training step, ours vs transformers, bf16, gpt2 at batch 8 x 1024: tokens/s and MFU
               against the device's peak (bench.speed), eager; then `--compile` (train_compile)
  generation   12 left-padded prompts x 128 new tokens, top-p 0.9 / temperature 1.2: ours
               (`GPT2LMHeadModel.generate`) vs transformers' `generate`, eager; then, where
               `generate` takes `compile=`, with the compiled decode step (generation_compile)
  attention    dense vs each sparse pattern at T = 8192 (time and peak memory; bench.attention)
  peft         LoRA r=16 vs full fine-tuning peak memory, gpt2-large at 8 x 128 (bench.peft; the
               report's reference: 3.36 GB vs 12.78 GB)
  ddp          a one-process torchrun DDP step (NCCL on CUDA, gloo on the CPU)

Writes bench/results/gpu_check-<device>.json (`--json`) and appends a markdown table to
bench/RESULTS.md (`--results_md`; a dry run appends to bench/results/gpu_check-dry_run.md).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.common import RESULTS_DIR, machine_description, markdown_table, median, time_interleaved

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """The shapes of one run: the issue's on a GPU, tiny ones for the dry run."""
    device: str
    model: str = "gpt2"
    train_batch: int = 8
    train_len: int = 1024
    train_steps: int = 10
    gen_prompts: int = 12
    gen_new_tokens: int = 128
    gen_repeats: int = 3
    attn_len: int = 8192
    attn_repeats: int = 5
    peft_model: str = "gpt2-large"
    peft_batch: int = 8
    peft_len: int = 128
    compile: bool = True


GPU_PLAN = Plan(device="cuda")
DRY_PLAN = Plan(device="cpu", model="tiny", train_batch=2, train_len=32, train_steps=1, gen_prompts=3,
                gen_new_tokens=8, gen_repeats=1, attn_len=256, attn_repeats=1, peft_model="tiny", peft_batch=1,
                peft_len=16, compile=False)

# Seconds each part may take: on an H200-class GPU (estimates: model set-up, warm-up, FlexAttention
# and torch.compile compilation included; they sum to 485 s, so under the 480 s limit the last part,
# the compiled training step, is skipped when the others ran to their budgets), and in the dry run on
# a busy 2-core CPU.
BUDGETS = {"parity": 30, "train": 45, "generation": 45, "attention": 75, "peft": 80, "ddp": 30,
           "generation_compile": 60, "train_compile": 120}
DRY_BUDGETS = {"parity": 30, "train": 20, "generation": 20, "attention": 25, "peft": 25, "ddp": 40,
               "generation_compile": 5, "train_compile": 5}


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_budget(seconds: int):
    """Raise PartTimeout in this (main) thread once `seconds` have passed."""
    def expire(signum, frame):
        raise PartTimeout(f"over its budget of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- the parts -----------------------------------------------------------------------------------
_pairs: dict = {}


def model_pair(preset: str, device: torch.device):
    """Ours and transformers' model on the same random weights (bench.model.build_pair), built once
    for the parity and generation parts."""
    from bench.model import build_pair

    if (preset, device) not in _pairs:
        _pairs.clear()
        _pairs[preset, device] = build_pair(preset, device)
    return _pairs[preset, device]


def part_parity(plan: Plan, device: torch.device) -> dict:
    ours, hf = model_pair(plan.model, device)
    ours.eval(), hf.eval()
    ids = torch.randint(0, ours.config.vocab_size, (4, min(128, plan.train_len)), device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 matmuls
    try:
        with torch.no_grad():
            ref_ours, ref_hf = ours(ids).float(), hf(input_ids=ids).logits.float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low_ours, low_hf = ours(ids).float(), hf(input_ids=ids).logits.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    fp32 = (ref_ours - ref_hf).abs().max().item()
    return {"fp32_max_abs_diff": fp32, "fp32_pass": fp32 < 1e-4,
            "bf16_max_abs_diff_vs_transformers_bf16": (low_ours - low_hf).abs().max().item(),
            "bf16_top1_agreement": (low_ours.argmax(-1) == low_hf.argmax(-1)).float().mean().item(),
            "bf16_error_ours_vs_own_fp32": (low_ours - ref_ours).abs().max().item(),
            "bf16_error_transformers_vs_own_fp32": (low_hf - ref_hf).abs().max().item()}


def _train(plan: Plan, device: torch.device, compile: bool) -> dict:
    from bench import speed

    argv = ["--device", device.type, "--precision", "bf16" if device.type == "cuda" else "fp32", "--model", plan.model,
            "--seq_lens", str(plan.train_len), "--batch_sizes", str(plan.train_batch), "--steps", str(plan.train_steps)]
    path = speed.main(argv + (["--compile"] if compile else []))
    r = json.loads(Path(path).read_text())["results"][0]
    return {"batch": r["batch_size"], "seq_len": r["seq_len"], "precision": argv[3], "compile": compile,
            "tokens_per_s": r["tokens_per_s"], "ratio_ours_vs_transformers": r["ratio"], "mfu": r["mfu"]}


def part_train(plan: Plan, device: torch.device) -> dict:
    return _train(plan, device, compile=False)


def part_train_compile(plan: Plan, device: torch.device) -> dict:
    if not plan.compile:
        return {"skipped": "dry run: torch.compile (inductor) takes minutes on a CPU; the GPU run compiles"}
    return _train(plan, device, compile=True)


def _generation(plan: Plan, device: torch.device, compiled: bool) -> dict:
    """Through the public API only (`generate()` / transformers' `generate`)."""
    from models import generation

    ours, hf = model_pair(plan.model, device)
    ours.eval(), hf.eval()
    hf.generation_config.eos_token_id = None  # exactly gen_new_tokens per row in both
    pad = ours.config.pad_token_id
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (24 + (3 * i) % 13,), generator=g).tolist() for i in range(plan.gen_prompts)]
    ids, mask = generation.left_pad(prompts, pad_id=pad)
    ids, mask = ids.to(device), mask.to(device)
    sample = dict(do_sample=True, temperature=1.2, top_p=0.9, max_new_tokens=plan.gen_new_tokens)
    runs: dict[str, Callable[[], None]] = {
        "ours": lambda: ours.generate(ids, mask, **sample),
        "transformers": lambda: hf.generate(ids, attention_mask=mask, top_k=0, pad_token_id=pad, use_cache=True, **sample),
    }
    if compiled:
        runs["ours_compiled"] = lambda: ours.generate(ids, mask, compile=True, **sample)
    for run in runs.values():  # warm-up (and compilation)
        out = run()
    times = time_interleaved(runs, device, plan.gen_repeats, warmup=0)
    tokens = len(prompts) * plan.gen_new_tokens
    tps = {k: tokens / median(v) for k, v in times.items()}
    return {"prompts": len(prompts), "new_tokens": plan.gen_new_tokens, "prompt_len_padded": ids.size(1),
            "tokens_per_s": tps, "speedup_vs_transformers": {k: v / tps["transformers"] for k, v in tps.items()},
            "output_shape": list(out.shape), "notes": []}


def part_generation(plan: Plan, device: torch.device) -> dict:
    return _generation(plan, device, compiled=False)


def part_generation_compile(plan: Plan, device: torch.device) -> dict:

    try:
        if not plan.compile:
            return {"skipped": "dry run: the compiled decode step is not run (inductor takes minutes on a CPU)"}
        return _generation(plan, device, compiled=True)
    finally:
        _pairs.clear()  # the last part that uses the pair


def part_attention(plan: Plan, device: torch.device) -> dict:
    from bench import attention

    paths = "sparse,flex" if device.type == "cuda" else "sparse"
    args = attention.parse_args(["--device", device.type, "--lengths", str(plan.attn_len), "--modes", "train",
                                 "--paths", paths, "--repeats", str(plan.attn_repeats), "--utility_epochs", "0"])
    job = {"kind": "time", "T": plan.attn_len, "mode": "train"}
    rows = attention.run_worker(job, args, device)
    for r in rows:
        r["peak_mb"] = attention.run_worker({**job, "kind": "memory", "spec": r["spec"]}, args, device)
    dense = rows[0]
    return {"T": plan.attn_len, "dtype": args.dtype, "mode": "train (forward + backward)",
            "rows": [{"variant": "/".join(str(x) for x in r["spec"] if x is not None), "ms": r["ms"],
                      "time_vs_dense": r["ratio_vs_dense"], "peak_mb": r["peak_mb"],
                      "peak_vs_dense": r["peak_mb"] / dense["peak_mb"] if dense["peak_mb"] > 0 else None} for r in rows]}


def part_peft(plan: Plan, device: torch.device) -> dict:
    from bench import peft

    argv = ["--device", device.type, "--model", plan.peft_model, "--batch_size", str(plan.peft_batch),
            "--seq_len", str(plan.peft_len), "--configs", "full", "lora-r16"]
    if device.type == "cuda":  # a fresh subprocess per configuration: its peak memory is its own
        results = json.loads(Path(peft.main(argv + ["--steps", "3", "--warmup", "2"])).read_text())["results"]
    else:  # the dry run: the same measurement in this process (a subprocess costs ~10 s of imports per config)
        common = dict(device="cpu", model=plan.peft_model, batch_size=plan.peft_batch, seq_len=plan.peft_len,
                      steps=1, warmup=0, precision="fp32", lora_targets="attn")
        results = {c: peft.run_one(argparse.Namespace(child=c, **common)) for c in ("full", "lora-r16")}
    gb = {k: (r["peak_memory_bytes"] - r["baseline_bytes"]) / 1e9 for k, r in results.items()}
    return {"model": plan.peft_model, "batch": plan.peft_batch, "seq_len": plan.peft_len,
            "peak_memory_kind": results["full"]["peak_memory_kind"], "peak_gb": gb,
            "lora_vs_full": gb["lora-r16"] / gb["full"], "reference_gb": {"lora-r16": 3.36, "full": 12.78}}


def part_ddp(plan: Plan, device: torch.device, budget: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "bench.ddp_step", "--device", device.type, "--model", plan.model]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"torchrun exited {res.returncode}: {res.stderr[-1500:]}")
    return json.loads(lines[-1][len("RESULT "):])


PARTS = {"parity": part_parity, "train": part_train, "generation": part_generation, "attention": part_attention,
         "peft": part_peft, "ddp": part_ddp, "generation_compile": part_generation_compile,
         "train_compile": part_train_compile}


# ---- the run -------------------------------------------------------------------------------------
def run_plan(plan: Plan, device: torch.device, time_limit: float, budgets: dict[str, int],
             only: list[str]) -> dict:
    start = time.perf_counter()
    parts = {}
    for name, fn in PARTS.items():
        if only and name not in only:
            continue
        budget, elapsed = budgets[name], time.perf_counter() - start
        if elapsed + budget > time_limit:
            parts[name] = {"status": "skipped", "note": f"would overrun: {elapsed:.0f} s elapsed + budget {budget} s "
                                                        f"> limit {time_limit:.0f} s"}
            print(f"[gpu_check] {name}: skipped ({parts[name]['note']})", flush=True)
            continue
        print(f"[gpu_check] {name} (budget {budget} s) ...", flush=True)
        t0 = time.perf_counter()
        try:
            with time_budget(budget):
                result = fn(plan, device, budget) if name == "ddp" else fn(plan, device)
            parts[name] = {"status": "ok", **result}
        except BaseException as exc:  # noqa: BLE001 -- SystemExit from a benchmark's main too; the rest go on
            if isinstance(exc, KeyboardInterrupt):
                raise
            parts[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                           "traceback": traceback.format_exc()[-3000:]}
        parts[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] {name}: {parts[name]['status']} in {parts[name]['seconds']} s", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return parts


def _fmt(x, spec=".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def summary_rows(parts: dict) -> list[list[str]]:
    """One row per claim: part, what, ours, reference, verdict."""
    rows = []
    for name, p in parts.items():
        if p["status"] != "ok":
            rows.append([name, p["status"], p.get("note") or p.get("error", "")[:160], "", ""])
            continue
        if "skipped" in p:
            rows.append([name, "skipped", p["skipped"], "", ""])
        elif name == "parity":
            rows.append([name, "fp32 max abs diff logits vs transformers", _fmt(p["fp32_max_abs_diff"]), "< 1e-4",
                         "pass" if p["fp32_pass"] else "FAIL"])
            rows.append([name, "bf16: max abs diff vs transformers bf16 / top-1 agreement",
                         f"{_fmt(p['bf16_max_abs_diff_vs_transformers_bf16'])} / {p['bf16_top1_agreement']:.4f}",
                         f"bf16 error vs own fp32: ours {_fmt(p['bf16_error_ours_vs_own_fp32'])}, "
                         f"transformers {_fmt(p['bf16_error_transformers_vs_own_fp32'])}", ""])
        elif name in ("train", "train_compile"):
            t, m = p["tokens_per_s"], p["mfu"]
            rows.append([name, f"train step tok/s, {p['precision']}, {p['batch']} x {p['seq_len']}"
                               f"{', compiled' if p['compile'] else ''}",
                         f"{t['ours']:,.0f} (MFU {_fmt(m['ours'], '.1%')})",
                         f"transformers {t['transformers']:,.0f} (MFU {_fmt(m['transformers'], '.1%')})",
                         f"ours/HF {p['ratio_ours_vs_transformers']:.2f}"])
        elif name in ("generation", "generation_compile"):
            t, s = p["tokens_per_s"], p["speedup_vs_transformers"]
            ours = ", ".join(f"{k} {v:,.0f}" for k, v in t.items() if k != "transformers")
            rows.append([name, f"top-p tok/s, {p['prompts']} prompts x {p['new_tokens']}", ours,
                         f"transformers {t['transformers']:,.0f}",
                         ", ".join(f"{k} x{v:.2f}" for k, v in s.items() if k != "transformers")
                         + ("; " + "; ".join(p["notes"]) if p["notes"] else "")])
        elif name == "attention":
            for r in p["rows"]:
                rows.append([name, f"T={p['T']} {r['variant']} ({p['dtype']}, fwd+bwd)", f"{r['ms']:.1f} ms",
                             f"peak {r['peak_mb']:.0f} MB", f"time/dense {r['time_vs_dense']:.2f}, "
                                                            f"peak/dense {_fmt(r['peak_vs_dense'], '.2f')}"])
        elif name == "peft":
            g = p["peak_gb"]
            rows.append([name, f"peak GB, {p['model']} {p['batch']} x {p['seq_len']} ({p['peak_memory_kind']})",
                         f"LoRA r=16 {g['lora-r16']:.2f} vs full {g['full']:.2f} (x{p['lora_vs_full']:.2f})",
                         "report: 3.36 vs 12.78 (x0.26)", ""])
        elif name == "ddp":
            rows.append([name, "one-process torchrun DDP step", f"backend {p['backend']}, loss {p['loss']:.3f}",
                         f"world size {p['world_size']}", "ok" if p["grads_finite"] else "non-finite grads"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true", help="the same plan on the CPU with tiny shapes")
    p.add_argument("--time_limit", type=float, default=None, help="seconds for the whole run (default 480; dry 110)")
    p.add_argument("--parts", nargs="+", default=None, choices=list(PARTS), help="run only these parts")
    p.add_argument("--json", default=None, help="results file (default bench/results/gpu_check-<device>.json)")
    p.add_argument("--results_md", default=None,
                   help="markdown file the table is appended to (default bench/RESULTS.md; dry run: bench/results/)")
    a = p.parse_args(argv)
    plan = DRY_PLAN if a.dry_run else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_check: no CUDA device here; run it on a GPU machine, or --dry_run for the CPU rehearsal",
              file=sys.stderr)
        return 2
    device = torch.device(plan.device)
    budgets = DRY_BUDGETS if a.dry_run else BUDGETS
    limit = a.time_limit or (115.0 if a.dry_run else 480.0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = run_plan(plan, device, limit, budgets, a.parts or [])
    machine = machine_description(device)
    payload = {"machine": machine, "dry_run": a.dry_run, "plan": asdict(plan), "budgets_s": budgets,
               "time_limit_s": limit, "started": started, "parts": parts}
    name = "gpu_check-dry_run" if a.dry_run else f"gpu_check-{device.type}"
    out = Path(a.json) if a.json else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, **payload}, indent=2, default=str) + "\n")
    table = markdown_table(["part", "what", "ours", "reference", "verdict"], summary_rows(parts))
    md = Path(a.results_md) if a.results_md else (RESULTS_DIR / f"{name}.md" if a.dry_run else ROOT / "bench" / "RESULTS.md")
    heading = (f"\n## GPU check{' (dry run: CPU, tiny shapes, not GPU figures)' if a.dry_run else ''}: {machine}, "
               f"torch {torch.__version__}, {started}\n\n`python -m bench.gpu_check{' --dry_run' if a.dry_run else ''}`"
               f" ({sum(x['seconds'] for x in parts.values() if 'seconds' in x):.0f} s); JSON: {out.name}\n\n")
    with md.open("a") as f:
        f.write(heading + table + "\n")
    print(table)
    print(f"wrote {out} and appended the table to {md}")
    return 0 if all(x["status"] != "error" for x in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
