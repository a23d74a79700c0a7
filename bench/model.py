"""Our GPT2LMHeadModel against transformers' on identical random weights: training step and eval forward.

    python -m bench.model --device cpu                 # gpt2 shape, fp32
    python -m bench.model --device cuda --dtype bf16   # on a GPU

A training step is forward + cross-entropy + backward + our AdamW step, in train mode (dropout
on, same probabilities in both models); the eval forward runs under `torch.no_grad()`.  Both
models get the same batch, dtype and optimizer; their calls are interleaved so machine noise
falls on both alike.  Prints tokens/s and the ratio ours / transformers, writes JSON.
"""
from __future__ import annotations

import argparse
import tempfile
from contextlib import nullcontext

import torch
import transformers

from bench.common import machine_description, markdown_table, median, time_interleaved, write_results
from models.losses import next_token_loss
from config import GPT2Config
from models import GPT2LMHeadModel
from optimizer import AdamW

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_pair(preset: str, device: torch.device):
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(GPT2Config.from_name(preset))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa")
    return ours.to(device), hf.to(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (fp32 = none)")
    parser.add_argument("--model", default="gpt2", help="preset shape (random weights)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch_size or (2 if device.type == "cpu" else 16)
    steps = args.steps or (5 if device.type == "cpu" else 20)
    ours, hf = build_pair(args.model, device)
    amp = (torch.autocast(device.type, dtype=DTYPES[args.dtype]) if args.dtype != "fp32" else nullcontext())
    ids = torch.randint(0, 50257, (batch, args.seq_len), device=device)
    logits_of = {"ours": lambda x: ours(x), "transformers": lambda x: hf(input_ids=x).logits}
    models = {"ours": ours, "transformers": hf}
    opts = {name: AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}

    def train_step(name):
        def step():
            models[name].train()
            with amp:
                logits = logits_of[name](ids)
                loss = next_token_loss(logits, ids)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return step

    def eval_step(name):
        @torch.no_grad()
        def step():
            models[name].eval()
            with amp:
                logits_of[name](ids)
        return step

    tokens = batch * args.seq_len
    rows, payload = [], {"device": machine_description(device), "model": args.model, "dtype": args.dtype,
                         "batch_size": batch, "seq_len": args.seq_len, "steps": steps, "results": {}}
    for kind, make in [("train step", train_step), ("eval forward", eval_step)]:
        times = time_interleaved({n: make(n) for n in models}, device, steps)
        tps = {n: tokens / median(t) for n, t in times.items()}
        ratio = tps["ours"] / tps["transformers"]
        rows.append([kind, f"{tps['ours']:,.0f}", f"{tps['transformers']:,.0f}", f"{ratio:.2f}"])
        payload["results"][kind] = {"tokens_per_s": tps, "ratio": ratio}
    print(f"{args.model}, {args.dtype}, batch {batch} x {args.seq_len} tokens, {payload['device']}, "
          f"median of {steps} steps")
    print(markdown_table(["", "ours tok/s", "transformers tok/s", "ratio ours/HF"], rows))
    print("wrote", write_results(f"model-{args.device}-{args.dtype}", payload))


if __name__ == "__main__":
    main()
