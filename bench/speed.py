"""Training-step speed of GPT-2 small, ours vs transformers' GPT2LMHeadModel, with tokens/s and MFU.

    python -m bench.speed                                   # CPU, fp32, T = 128 and 1024, batch 1
    python -m bench.speed --device cuda --precision bf16 --compile --batch_sizes 16 8
    python -m bench.speed --profile                         # + torch.profiler table of our step

A step is forward + next-token cross-entropy + backward + AdamW step (ours, foreach, for both
models), in train mode with GPT-2's dropout, from identical random weights.  Ours and transformers'
calls are interleaved (bench.common.time_interleaved) so machine noise falls on both alike.  MFU =
tokens/s x training FLOPs per token (6N + 12·n_layer·T·d, training/speed.py) / the device's peak for
the dtype (`--peak_flops`, else the table of known GPUs; none on a CPU).  Writes
bench/results/speed-<device>-<precision>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import machine_description, markdown_table, median, time_interleaved, write_results
from models.losses import next_token_loss
from bench.model import build_pair
from optimizer import AdamW
from training.build import autocast
from training.speed import enable_tf32, flops_per_token, matmul_params, peak_flops


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--model", default="gpt2", help="preset shape (random weights)")
    p.add_argument("--seq_lens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                   help="one per --seq_lens (default: 2 and 1 on CPU, 64 and 8 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak_flops", type=float, default=None, help="peak FLOP/s of the device for MFU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of ours")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        enable_tf32()
    cpu = device.type == "cpu"
    batch_sizes = a.batch_sizes or ([2, 1] if cpu else [64, 8])[: len(a.seq_lens)]
    if len(batch_sizes) != len(a.seq_lens):
        raise SystemExit(f"--batch_sizes needs one value per --seq_lens ({len(a.seq_lens)}), got {batch_sizes}")
    steps = a.steps or (3 if cpu else 20)
    ours, hf = build_pair(a.model, device)
    cfg = ours.config
    n_params = matmul_params(ours)
    peak = peak_flops(device, a.precision, a.peak_flops)
    models = {"ours": ours, "transformers": hf}
    fwd = {"ours": ours, "transformers": hf}
    if a.compile:
        fwd = {k: torch.compile(m) for k, m in models.items()}
    opts = {k: AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    machine = machine_description(device)
    rows, results = [], []
    for T, B in zip(a.seq_lens, batch_sizes):
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)

        def step_of(name):
            def step():
                models[name].train()
                with autocast(device, a.precision):
                    out = fwd[name](ids) if name == "ours" else fwd[name](input_ids=ids).logits
                    loss = next_token_loss(out, ids)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
            return step

        times = time_interleaved({n: step_of(n) for n in models}, device, steps, warmup=2 if a.compile else 1)
        fpt = flops_per_token(n_params, cfg.num_hidden_layers, T, cfg.hidden_size)
        tps = {n: B * T / median(t) for n, t in times.items()}
        ratio = tps["ours"] / tps["transformers"]
        # On a shared machine noise only ever adds time: the fastest step is the other estimate.
        ratio_best = min(times["transformers"]) / min(times["ours"])
        util = {n: (v * fpt / peak if peak else None) for n, v in tps.items()}
        results.append({"seq_len": T, "batch_size": B, "tokens_per_s": tps, "ratio": ratio,
                        "ratio_fastest_steps": ratio_best, "mfu": util,
                        "flops_per_token": fpt, "seconds": times})
        show = lambda u: f"{u:.1%}" if u is not None else "n/a"  # noqa: E731
        rows.append([T, B, f"{tps['ours']:,.0f}", f"{tps['transformers']:,.0f}", f"{ratio:.2f}", f"{ratio_best:.2f}",
                     show(util["ours"]), show(util["transformers"])])
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                step_of("ours")()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"\n{a.model} training step (forward + loss + backward + AdamW), {a.precision}"
          f"{', compiled' if a.compile else ''}, {machine}, median of {steps} interleaved steps\n")
    print(markdown_table(["T", "batch", "ours tok/s", "transformers tok/s", "ratio ours/HF (median)",
                          "ratio (fastest steps)", "MFU ours",
                          "MFU transformers"], rows))
    if peak is None:
        print("\nMFU: n/a (no peak FLOP/s known for this device; pass --peak_flops)")
    path = write_results(f"speed-{a.device}-{a.precision}{'-compiled' if a.compile else ''}-T{'-'.join(map(str, a.seq_lens))}",
                         {"machine": machine, "model": a.model, "precision": a.precision, "compile": a.compile,
                          "threads": torch.get_num_threads(), "peak_flops": peak, "steps": steps,
                          "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
