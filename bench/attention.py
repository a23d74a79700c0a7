"""Benchmark: sparse attention patterns vs dense causal SDPA, forward + backward.

For each sequence length T and each variant -- dense causal SDPA (`is_causal=True`, the
reference), and every sparse pattern on each path (SDPA with a boolean mask; block-sparse
FlexAttention) -- it times one attention forward + backward on (B, heads, T, head_dim) inputs
through `modules.attention.attend` (the function the model calls), with the mask built once
beforehand (a model builds it once per forward for all its layers; its build time is reported
apart).  It also reports the fraction of (query, key) pairs each pattern attends to and the
fraction of 128x128 blocks FlexAttention visits, both relative to causal attention.

Timing: median of `--repeats` runs after one warm-up; every sparse variant is timed
alternately with the dense reference in the same process, and the ratio is taken there.
Peak memory:
  cuda -- `torch.cuda.max_memory_allocated` during one forward + backward, minus what was
          allocated before it (inputs, gradients of the output, the mask);
  cpu  -- every variant runs in a fresh subprocess whose allocations of 64 KiB and more are
          mmapped and unmapped on free (MALLOC_MMAP_THRESHOLD_); after the inputs and the mask
          exist and one warm-up run, the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`
          = 5) and the peak RSS (`VmHWM`) of one forward + backward minus the RSS before it is
          reported.  This counts pages the process touched (library workspace included), at page
          granularity, measured the same way for every variant.
FlexAttention has no backward on CPU (torch 2.13), so CPU runs cover the SDPA paths only.

    python -m bench.attention --device cpu
    python -m bench.attention --device cuda            # T = 512 .. 16384, bf16, 12 heads
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

from bench.common import machine_description, median, sync, time_interleaved, write_results
from modules.attention import attend, build_attention_mask
from modules.attention_patterns import pattern_allows

ROOT = Path(__file__).resolve().parents[1]
SPARSE = ("logsparse", "local", "hybrid")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=str, default=None,
                   help="comma-separated T values (default cpu: 512,1024,2048,4096; cuda: 512..16384)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default: 2 on cpu (to fit in minutes), 12 (GPT-2 small) on cuda")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--window", type=int, default=64, help="window of the local and hybrid patterns")
    p.add_argument("--patterns", type=str, default=",".join(SPARSE))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default cpu 3, cuda 10)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (cpu device); 1 by default: on a shared machine a second thread mostly waits")
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.lengths = [int(t) for t in (args.lengths or ("512,1024,2048,4096,8192,16384" if cuda
                                                      else "512,1024,2048,4096")).split(",")]
    args.heads = args.heads or (12 if cuda else 2)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (10 if cuda else 3)
    args.patterns = [s for s in args.patterns.split(",") if s]
    for s in args.patterns:
        if s not in SPARSE:
            p.error(f"--patterns: unknown pattern {s!r}; choose from {', '.join(SPARSE)}")
    return args


# ---- one variant ---------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Variant:
    """Inputs, mask and one forward + backward of one (T, pattern, path)."""

    def __init__(self, T: int, pattern: str, path: str, args, device: torch.device, seed: int = 0):
        dtype = getattr(torch, args.dtype)
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (args.batch, args.heads, T, args.head_dim)
        self.q, self.k, self.v = [torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_()
                                  for _ in range(3)]
        self.grad_out = torch.randn(shape, generator=g, device=device, dtype=dtype)
        self.device = device
        for _ in range(2):  # the second build is timed: the first pays one-time set-up costs
            sync(device)
            start = time.perf_counter()
            if pattern == "dense":
                self.mask, self.is_causal = build_attention_mask(None, T, 0, device)
            else:
                self.mask, self.is_causal = build_attention_mask(None, T, 0, device, pattern=pattern,
                                                                 window=args.window, block_sparse=path == "flex")
            sync(device)
            self.mask_build_ms = 1e3 * (time.perf_counter() - start)
        self.mask_mb = mask_bytes(self.mask) / 2**20
        self.block_density = block_density(self.mask, T) if path == "flex" else None

    def step(self) -> None:
        y = attend(self.q, self.k, self.v, self.mask, self.is_causal)
        y.backward(self.grad_out)
        self.q.grad = self.k.grad = self.v.grad = None

    def peak_mb(self) -> float:
        """Extra memory of one forward + backward over what already exists (after a warm-up run,
        which also compiles FlexAttention on CUDA)."""
        self.step()
        sync(self.device)
        if self.device.type == "cuda":
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        base = _rss_kib("VmRSS")
        self.step()
        return (_rss_kib("VmHWM") - base) / 1024


def mask_bytes(mask) -> int:
    if mask is None:
        return 0
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()  # the (1, 1, T, T) boolean mask
    return sum(t.numel() * t.element_size() for t in mask.as_tuple() if isinstance(t, torch.Tensor))


def block_density(block_mask, T: int) -> float:
    """Key blocks FlexAttention visits (partial + full) / the blocks of causal attention."""
    visited = int(block_mask.kv_num_blocks.sum())
    if block_mask.full_kv_num_blocks is not None:
        visited += int(block_mask.full_kv_num_blocks.sum())
    n = -(-T // block_mask.BLOCK_SIZE[0])
    return visited / (n * (n + 1) / 2)


def pair_density(pattern: str, T: int, window: int, device: torch.device) -> float:
    """Attended (query, key) pairs / causal pairs T(T+1)/2, counted with the pattern function."""
    k = torch.arange(T, device=device, dtype=torch.int32)[None, :]
    total = 0
    for lo in range(0, T, 1024):
        q = torch.arange(lo, min(T, lo + 1024), device=device, dtype=torch.int32)[:, None]
        total += int((pattern_allows(pattern, q, k, window) & (k <= q)).sum())
    return total / (T * (T + 1) / 2)


def run_variant(T: int, pattern: str, path: str, args, device: torch.device) -> dict:
    """Memory first (fresh process on CPU), then timing interleaved with the dense reference."""
    v = Variant(T, pattern, path, args, device)
    peak = v.peak_mb()
    fns = {"variant": v.step}
    if pattern != "dense":
        fns["dense"] = Variant(T, "dense", "sdpa", args, device, seed=1).step
    times = time_interleaved(fns, device, steps=args.repeats, warmup=1)
    ms = 1e3 * median(times["variant"])
    return dict(T=T, pattern=pattern, path=path, ms=ms,
                ratio_vs_dense=median(times["variant"]) / median(times["dense"]) if "dense" in times else 1.0,
                peak_mb=peak, mask_build_ms=v.mask_build_ms, mask_mb=v.mask_mb,
                block_density=v.block_density)


def variants(args) -> list[tuple[int, str, str]]:
    paths = ("sdpa", "flex") if args.device == "cuda" else ("sdpa",)
    return [(T, "dense", "sdpa") for T in args.lengths] + \
           [(T, p, path) for T in args.lengths for p in args.patterns for path in paths]


# ---- driver --------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.worker:
        T, pattern, path = json.loads(args.worker)
        print(json.dumps(run_variant(T, pattern, path, args, device)))
        return
    rows = []
    for T, pattern, path in variants(args):
        if device.type == "cpu":  # a fresh process per variant, so its peak RSS is its own
            cmd = [sys.executable, "-m", "bench.attention", *(sys.argv[1:] if argv is None else argv),
                   "--worker", json.dumps([T, pattern, path])]
            # Allocations of 64 KiB and more straight from mmap and back to the kernel when freed
            # (no dynamic threshold), so that the RSS follows what the tensors use.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"worker for T={T} {pattern}/{path} failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
        else:
            try:
                row = run_variant(T, pattern, path, args, device)
            except torch.OutOfMemoryError:
                row = dict(T=T, pattern=pattern, path=path, oom=True)
            torch.cuda.empty_cache()
        row["pair_density"] = pair_density(pattern, T, args.window, device)
        if pattern != "dense" and row.get("block_density") is None:  # what FlexAttention would visit
            row["block_density"] = block_density(build_attention_mask(
                None, T, 0, device, pattern=pattern, window=args.window, block_sparse=True)[0], T)
        rows.append(row)
        print(f"  T={T:>6} {pattern:>9}/{path:<4} " + (
            "out of memory" if row.get("oom") else
            f"{row['ms']:9.2f} ms  x{row['ratio_vs_dense']:.2f}  peak {row['peak_mb']:8.1f} MB"), flush=True)
    dense_peak = {r["T"]: r.get("peak_mb") for r in rows if r["pattern"] == "dense"}
    for r in rows:
        if r.get("peak_mb") is not None and dense_peak.get(r["T"]):
            r["peak_vs_dense"] = r["peak_mb"] / dense_peak[r["T"]]
    meta = dict(device=args.device, machine=machine_description(device), cpus=os.cpu_count(),
                batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
                window=args.window, repeats=args.repeats)
    out = write_results(f"attention_{args.device}", dict(meta=meta, rows=rows))
    print()
    print(table(rows, {**meta, "date": json.loads(out.read_text())["date"]}))
    print(f"\nwrote {out}")


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"attention forward+backward, {meta['device']} ({meta['machine']}), B={meta['batch']} "
             f"heads={meta['heads']} head_dim={meta['head_dim']} {meta['dtype']}, window={meta['window']}, "
             f"torch {torch.__version__}, {meta['date']}", "",
             "| T | pattern | path | fwd+bwd ms | time / dense | peak MB | peak / dense | mask MB | mask build ms "
             "| pairs / causal | blocks / causal |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["T"], r["pattern"] != "dense", r["pattern"], r["path"])):
        if r.get("oom"):
            lines.append(f"| {r['T']} | {r['pattern']} | {r['path']} | OOM | | | | | | {r['pair_density']:.4f} | |")
            continue
        path = "sdpa is_causal" if r["pattern"] == "dense" else ("sdpa + mask" if r["path"] == "sdpa" else "flex")
        bd = "" if r["block_density"] is None else f"{r['block_density']:.3f}"
        lines.append(f"| {r['T']} | {r['pattern']} | {path} | {r['ms']:.1f} | {r['ratio_vs_dense']:.2f} | "
                     f"{r['peak_mb']:.1f} | {r.get('peak_vs_dense', float('nan')):.2f} | {r['mask_mb']:.1f} | "
                     f"{r['mask_build_ms']:.1f} | {r['pair_density']:.4f} | {bd} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
