"""Benchmark: one step of our AdamW (optimizer.py) vs torch.optim.AdamW(foreach=True).

The parameter set has the shapes of GPT-2 small (124M parameters, the tied lm_head excluded),
with fixed random gradients. Both optimizers step the same tensors, alternating, so machine noise
hits both alike; the reported number is the median over the timed steps after a warm-up.

Run: python -m bench.optimizer --device cpu
Writes bench/results/optimizer-<device>.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from optimizer import AdamW

RESULTS_DIR = Path(__file__).parent / "results"


def gpt2_small_shapes(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12):
    """Parameter shapes of GPT-2 small: embeddings, 12 transformer layers, final LayerNorm."""
    shapes = [(vocab_size, n_embd), (n_positions, n_embd)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (n_embd, 3 * n_embd), (3 * n_embd,),  # attention qkv projection
            (n_embd, n_embd), (n_embd,),  # attention output projection
            (n_embd, 4 * n_embd), (4 * n_embd,),  # MLP up
            (4 * n_embd, n_embd), (n_embd,),  # MLP down
            (n_embd,), (n_embd,), (n_embd,), (n_embd,),  # ln_1 and ln_2 weight, bias
        ]
    shapes += [(n_embd,), (n_embd,)]  # ln_f weight, bias
    return shapes


def make_params(device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in gpt2_small_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=g, device=device, dtype=dtype) * 0.02)
        p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype) * 1e-3
        params.append(p)
    return params


def time_step(opt, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device to benchmark on")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameter dtype")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per optimizer (default 10 on cpu, 50 otherwise)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer")
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    steps = args.steps or (10 if device.type == "cpu" else 50)

    # Both optimizers update the same parameters and gradients (their own moment buffers): the
    # values drift, the work per step does not, and memory stays at one model's worth.
    params = make_params(device, dtype)
    hyper = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizers = {
        "ours (AdamW, foreach)": AdamW(params, **hyper),
        "torch.optim.AdamW (foreach=True)": torch.optim.AdamW(params, foreach=True, **hyper),
    }
    times = {name: [] for name in optimizers}
    for i in range(args.warmup + steps):
        for name, opt in optimizers.items():
            ms = time_step(opt, device)
            if i >= args.warmup:
                times[name].append(ms)

    median = {name: statistics.median(t) for name, t in times.items()}
    ours, ref = median.values()
    ratio = ref / ours
    n_params = sum(p.numel() for p in params)

    print(f"AdamW step, GPT-2 small shapes ({n_params / 1e6:.1f}M params, {args.dtype}), "
          f"{device}, median of {steps} steps after {args.warmup} warm-up")
    print()
    print("| optimizer | ms/step |")
    print("|---|---:|")
    for name, ms in median.items():
        print(f"| {name} | {ms:.1f} |")
    print(f"| ratio torch/ours | {ratio:.2f} |")

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"optimizer-{device.type}.json"
    out.write_text(json.dumps({
        "benchmark": "optimizer_step",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "n_params": n_params,
        "n_tensors": len(params),
        "steps": steps,
        "warmup": args.warmup,
        "median_ms": median,
        "all_ms": times,
        "ratio_torch_over_ours": ratio,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
