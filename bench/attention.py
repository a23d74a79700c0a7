"""Benchmark: sparse attention (each pattern, each execution path) vs dense, whole GPT2Model.

For every sequence length T and mode it runs a GPT2Model (default: 1 layer, 4 heads x 64, the
full GPT-2 vocabulary, attention and hidden dropout 0.1) on (1, T) random tokens:
  train -- model.train(), forward + backward (dropout active), the workload of fine-tuning;
  eval  -- model.eval() under torch.no_grad(), forward only.
Variants: dense (causal SDPA; with attention dropout on CPU that is SDPA's math kernel), and each
sparse pattern (Li et al., 2019 LogSparse; local window; hybrid) on each path of
`modules.attention_patterns.choose_path`: `sdpa` (boolean mask on dense SDPA: every pair),
`sparse` (modules/sparse_attention.py: gathered key blocks and points) and, on CUDA, `flex`
(compiled FlexAttention; it has no attention dropout, so its train rows run with attention
dropout 0).  The mask or layout is built inside the model's forward, as in training, so its
cost is in the time.  The `auto` column says which path `auto` takes there.

Timing: one subprocess per (mode, T) builds every variant and runs them round-robin (one
warm-up round, then `--repeats`); the ratio to dense is taken per round and its median
reported, with the median wall time and CPU time (process_time) of a step.
Peak memory, CPU: a fresh subprocess per variant whose allocations of 64 KiB and more are
mmapped and unmapped on free (MALLOC_MMAP_THRESHOLD_); after one warm-up step the kernel's
peak-RSS mark is reset (/proc/self/clear_refs = 5) and VmHWM - VmRSS of one step is reported
(pages touched, library workspace included).  CUDA: max_memory_allocated minus what was
allocated before the step.  Crossover: per pattern and mode, the shortest T from which the
sparse path is faster than dense at every longer T measured.

Utility (`--utility_epochs`, 0 to skip): sonnet_generation.py with each pattern, the same short
training from the same random init (`--model_size tiny`: no pretrained weights exist here),
packed 512-token blocks; its best dev loss goes into the trade-off table.

    python -m bench.attention --device cpu
    python -m bench.attention --device cpu --block_sizes 8,16,32,64 --lengths 2048,8192 --modes train --utility_epochs 0
    python -m bench.attention --device cuda            # bf16, T = 512 .. 16384
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine_description, markdown_table, median, sync, write_results
from config import GPT2Config
from models.gpt2 import GPT2Model
from modules import attention_patterns
from modules.attention_patterns import choose_path, estimated_keys_per_query

ROOT = Path(__file__).resolve().parents[1]
SPARSE = ("logsparse", "local", "hybrid")
BLOCK_SIZES = dict(attention_patterns.DEFAULT_BLOCK_SIZE)  # the defaults, before --block_sizes changes them


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=str, default=None,
                   help="comma-separated T (default cpu: 128,256,512,1024,2048,4096,8192; cuda: 512 .. 16384)")
    p.add_argument("--modes", type=str, default="train,eval", help="train (fwd+bwd, dropout) and/or eval (fwd)")
    p.add_argument("--patterns", type=str, default=",".join(SPARSE))
    p.add_argument("--paths", type=str, default=None, help="sparse-layer paths (default cpu: sdpa,sparse; cuda: +flex)")
    p.add_argument("--mask_max_len", type=int, default=4096,
                   help="run the sdpa + boolean mask path only up to this T (it is the O(T^2) reference)")
    p.add_argument("--block_sizes", type=str, default=None,
                   help="also run the sparse path at these block sizes C (tunes DEFAULT_BLOCK_SIZE)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--window", type=int, default=64, help="window of the local and hybrid patterns")
    p.add_argument("--attention_dropout", type=float, default=0.1)
    p.add_argument("--hidden_dropout", type=float, default=0.1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32 on cpu, bf16 autocast on cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default cpu 3, cuda 10)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: on a shared machine a second thread mostly waits)")
    p.add_argument("--utility_epochs", type=int, default=6, help="sonnet training epochs per pattern (0: no utility column)")
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    default_lengths = "512,1024,2048,4096,8192,16384" if cuda else "128,256,512,1024,2048,4096,8192"
    args.lengths = [int(t) for t in (args.lengths or default_lengths).split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    args.patterns = [s for s in args.patterns.split(",") if s]
    args.paths = [s for s in (args.paths or ("sdpa,sparse,flex" if cuda else "sdpa,sparse")).split(",") if s]
    args.block_sizes = [int(c) for c in args.block_sizes.split(",")] if args.block_sizes else []
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (10 if cuda else 3)
    for name, values, allowed in (("--modes", args.modes, ("train", "eval")), ("--patterns", args.patterns, SPARSE),
                                  ("--paths", args.paths, ("sdpa", "sparse", "flex"))):
        for value in values:
            if value not in allowed:
                p.error(f"{name}: unknown value {value!r}; choose from {', '.join(allowed)}")
    return args


# ---- one variant: a model and its step -----------------------------------------------------------
def variants(args, T: int) -> list[tuple[str, str, int | None]]:
    """(pattern, path, block size or None) of every variant measured at length T."""
    out = [("dense", "sdpa", None)]
    for pattern in args.patterns:
        for path in args.paths:
            if path == "sdpa" and T > args.mask_max_len:
                continue
            out.append((pattern, path, None))
        out += [(pattern, "sparse", c) for c in args.block_sizes]
    return out


class Variant:
    def __init__(self, spec, T: int, mode: str, args, device: torch.device):
        pattern, path, block_size = spec
        self.spec, self.mode, self.device = spec, mode, device
        dropout = 0.0 if path == "flex" else args.attention_dropout  # FlexAttention has no dropout
        torch.manual_seed(0)
        cfg = GPT2Config(hidden_size=args.heads * args.head_dim, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, max_position_embeddings=T,
                         hidden_dropout_prob=args.hidden_dropout, attention_probs_dropout_prob=dropout,
                         attention=pattern, attention_window=args.window,
                         attention_backend="auto" if pattern == "dense" else path)
        self.model = GPT2Model(cfg).to(device).train(mode == "train")
        self.ids = torch.randint(0, cfg.vocab_size, (1, T), device=device)
        self.grad = torch.randn(1, T, cfg.hidden_size, device=device)
        self.autocast = args.dtype == "bfloat16"

    def step(self) -> None:
        pattern, _, block_size = self.spec
        if pattern in BLOCK_SIZES:  # bench-only tuning (--block_sizes): the block size the sparse path reads
            attention_patterns.DEFAULT_BLOCK_SIZE[pattern] = block_size or BLOCK_SIZES[pattern]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.mode == "eval":
                with torch.no_grad():
                    self.model.encode(self.ids)
                return
            h = self.model.encode(self.ids)  # (1, T, D)
        h.float().backward(self.grad)
        self.model.zero_grad(set_to_none=True)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_mb(v: Variant) -> float:
    """Extra memory of one step over what exists after a warm-up step (weights, inputs)."""
    v.step()
    sync(v.device)
    if v.device.type == "cuda":
        base = torch.cuda.memory_allocated(v.device)
        torch.cuda.reset_peak_memory_stats(v.device)
        v.step()
        sync(v.device)
        return (torch.cuda.max_memory_allocated(v.device) - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _rss_kib("VmRSS")
    v.step()
    return (_rss_kib("VmHWM") - base) / 1024


def time_round_robin(vs: list[Variant], repeats: int) -> list[dict]:
    """Wall and CPU seconds of every variant's step, in rounds; ratio to dense (vs[0]) per round."""
    wall, cpu = [[] for _ in vs], [[] for _ in vs]
    for r in range(1 + repeats):
        for i, v in enumerate(vs):
            sync(v.device)
            t0, c0 = time.perf_counter(), time.process_time()
            v.step()
            sync(v.device)
            if r > 0:
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
    return [dict(spec=list(v.spec), ms=1e3 * median(w), cpu_ms=1e3 * median(c),
                 ratio_vs_dense=median([a / b for a, b in zip(w, wall[0])]),
                 cpu_ratio_vs_dense=median([a / b for a, b in zip(c, cpu[0])]))
            for v, w, c in zip(vs, wall, cpu)]


def run_worker(job: dict, args, device: torch.device) -> object:
    T, mode = job["T"], job["mode"]
    if job["kind"] == "time":
        return time_round_robin([Variant(s, T, mode, args, device) for s in variants(args, T)], args.repeats)
    return peak_mb(Variant(tuple(job["spec"]), T, mode, args, device))


def in_subprocess(job: dict, argv: list[str], memory: bool) -> object:
    cmd = [sys.executable, "-m", "bench.attention", *argv, "--worker", json.dumps(job)]
    env = dict(os.environ)
    if memory:  # allocations >= 64 KiB straight from mmap and back when freed: RSS follows the tensors
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- utility: sonnet dev loss after the same short training --------------------------------------
def utility(pattern: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "sonnet_generation.py", "--model_size", "tiny", "--attention", pattern,
               "--attention_window", str(args.window), "--epochs", str(args.utility_epochs), "--batch_size", "4",
               "--lr", "2e-3", "--select_by", "loss", "--pack_sequences", "--max_length", "512",
               "--max_new_tokens", "8", "--seed", "11711", "--run_dir", tmp, "--no_progress",
               "--sonnet_out", f"{tmp}/test.txt", "--sonnet_dev_out", f"{tmp}/dev.txt"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"utility run for {pattern} failed:\n{res.stderr[-3000:]}")
        records = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in records if r["event"] == "final")
    return dict(pattern=pattern, dev_loss=final["dev"]["loss"], best_epoch=final["best_epoch"],
                train_s=time.perf_counter() - start)


# ---- driver --------------------------------------------------------------------------------------
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker), args, device)))
        return
    cpu = device.type == "cpu"
    rows = []
    for mode in args.modes:
        for T in args.lengths:
            job = dict(kind="time", T=T, mode=mode)
            timed = in_subprocess(job, argv, memory=False) if cpu else run_worker(job, args, device)
            for r in timed:
                spec = tuple(r["spec"])
                job = dict(kind="memory", T=T, mode=mode, spec=list(spec))
                r["peak_mb"] = in_subprocess(job, argv, memory=True) if cpu else run_worker(job, args, device)
                pattern, path, block_size = spec
                r.update(mode=mode, T=T, pattern=pattern, path=path, block_size=block_size,
                         auto=choose_path("auto", pattern, device, T, T, args.window, 0,
                                          dropout_active=mode == "train" and args.attention_dropout > 0, cached=False),
                         keys_per_query=T if pattern == "dense" or path != "sparse" else
                         estimated_keys_per_query(pattern, args.window, 0, T, block_size))
                rows.append(r)
                print(f"  {mode:>5} T={T:>5} {pattern:>9}/{path:<6}{'' if block_size is None else f' C={block_size}':<6}"
                      f" {r['ms']:9.1f} ms  x{r['ratio_vs_dense']:.3f}  peak {r['peak_mb']:8.1f} MB", flush=True)
            dense_peak = next(r["peak_mb"] for r in rows if (r["mode"], r["T"], r["pattern"]) == (mode, T, "dense"))
            for r in rows:
                if (r["mode"], r["T"]) == (mode, T):
                    r["peak_vs_dense"] = r["peak_mb"] / dense_peak if dense_peak > 0 else float("nan")
    crossover = {f"{mode}/{pattern}": [crossover_length(rows, mode, pattern, against)
                                       for against in ("dense", "sdpa")]
                 for mode in args.modes for pattern in args.patterns}
    utilities = [utility(p, args) for p in ("dense", *args.patterns)] if args.utility_epochs > 0 else []
    meta = dict(device=args.device, machine=machine_description(device), cpus=os.cpu_count(),
                load=os.getloadavg() if cpu else None, layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                window=args.window, attention_dropout=args.attention_dropout, hidden_dropout=args.hidden_dropout,
                dtype=args.dtype, repeats=args.repeats, threads=args.threads, utility_epochs=args.utility_epochs)
    out = write_results(f"attention_{args.device}", dict(meta=meta, rows=rows, crossover=crossover, utility=utilities))
    print("\n" + report(rows, crossover, utilities, {**meta, "date": json.loads(out.read_text())["date"]}, args))
    print(f"\nwrote {out}")


def crossover_length(rows: list[dict], mode: str, pattern: str, against: str = "dense"):
    """Shortest measured T from which the sparse path is faster than `against` -- dense causal
    attention, or the pattern's own masked SDPA path (what `auto` chooses between) -- at every
    longer T where both ran (None: never)."""
    def ratios(path):
        return {r["T"]: r["ratio_vs_dense"] for r in rows
                if (r["mode"], r["pattern"], r["path"], r["block_size"]) == (mode, pattern, path, None)}
    sparse = ratios("sparse")
    other = {T: 1.0 for T in sparse} if against == "dense" else ratios(against)
    best = None
    for T in sorted(set(sparse) & set(other), reverse=True):
        if sparse[T] >= other[T]:
            break
        best = T
    return best


def report(rows, crossover, utilities, meta, args) -> str:
    head = (f"{meta['device']} ({meta['machine']}), GPT2Model {meta['layers']} layer(s), {meta['heads']} heads x "
            f"{meta['head_dim']}, W={meta['window']}, attention dropout {meta['attention_dropout']}, hidden dropout "
            f"{meta['hidden_dropout']}, {meta['dtype']}, {meta['repeats']} rounds, torch {torch.__version__}, "
            f"{meta['date']}" + (f", load {meta['load'][0]:.1f}" if meta.get("load") else ""))
    parts = [head]
    for mode in args.modes:
        table = []
        for r in sorted((r for r in rows if r["mode"] == mode),
                        key=lambda r: (r["T"], r["pattern"] != "dense", r["pattern"], r["path"], r["block_size"] or 0)):
            path = "sdpa causal" if r["pattern"] == "dense" else r["path"] + (f" C={r['block_size']}" if r["block_size"] else "")
            table.append([r["T"], r["pattern"], path, r["auto"] if r["pattern"] != "dense" else "", f"{r['ms']:.1f}",
                          f"{r['ratio_vs_dense']:.3f}", f"{r['cpu_ratio_vs_dense']:.3f}", f"{r['peak_mb']:.1f}",
                          f"{r['peak_vs_dense']:.2f}", r["keys_per_query"]])
        parts += ["", f"{mode} ({'forward + backward' if mode == 'train' else 'forward, no grad'}):", "",
                  markdown_table(["T", "pattern", "path", "auto picks", "ms", "time / dense", "CPU time / dense",
                                  "peak MB", "peak / dense", "keys / query"], table)]
    parts += ["", "crossover: the sparse path is faster from T = ... at every longer T measured:", "",
              markdown_table(["mode", "pattern", "than dense", "than the masked sdpa path"],
                             [[*k.split("/"), *["never" if x is None else x for x in v]] for k, v in crossover.items()])]
    if utilities:
        longest = max(args.lengths)
        at = [T for T in (4096, longest) if T in args.lengths]

        def ratio(pattern, T, key):
            r = [r for r in rows if (r["mode"], r["T"], r["pattern"], r["block_size"]) == ("train", T, pattern, None)
                 and (r["path"] == "sparse" or pattern == "dense")]
            return f"{r[0][key]:.3f}" if r else ""
        table = [[u["pattern"], f"{u['dev_loss']:.4f}", u["best_epoch"], f"{u['train_s']:.0f}",
                  *[ratio(u["pattern"], T, k) for T in at for k in ("ratio_vs_dense", "peak_vs_dense")]] for u in utilities]
        parts += ["", f"time / utility trade-off (utility: sonnet dev loss after {args.utility_epochs} epochs of "
                      f"sonnet_generation.py --model_size tiny, packed 512-token blocks, lr 2e-3; lower is better):", "",
                  markdown_table(["pattern", "dev loss", "best epoch", "train s",
                                  *[f"{k} T={T}" for T in at for k in ("time / dense", "peak / dense")]], table)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
