"""Throughput of sonnet-style batched generation: our engine vs transformers vs the starter's loop.

Workload (issue 4): 12 prompts of 3 sonnet lines (the dev prompts, `sonnets_held_out_dev.txt`;
synthetic 36-token prompts if the file is missing), 128 new tokens each, top-p sampling with the
starter's defaults (temperature 1.2, top_p 0.9), on a `gpt2`-shaped model with random weights.
transformers runs on the very same weights (saved by us, loaded by `from_pretrained`).

* ours: `GPT2LMHeadModel.generate`, one left-padded batch, KV cache.
* transformers: `generate(do_sample=True, temperature, top_p, top_k=0, use_cache=True)` on the same
  batch (`top_k=0` switches off its default top_k=50, so both do the same work).
* starter: no cache, one prompt at a time, the whole prefix through the model at every step (the
  loop of the CS224N starter, written here as the reference).  It is slow, so it runs on the first
  `--starter_prompts` prompts only; its tokens/s is per generated token like the others.

EOS is disabled so that every row generates exactly 128 tokens in every engine.  Prints a
markdown table and writes `bench/results/generation.json`.

    python -m bench.generation --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from config import GPT2Config
from tasks.sonnets import read_sonnets
from models.generation import left_pad, top_p_filter
from models.gpt2 import GPT2LMHeadModel

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model_size", default="gpt2", help="preset whose shape the random model takes")
    p.add_argument("--prompts", default="data/sonnets_held_out_dev.txt",
                   help="sonnets.txt-style file whose first 12 sonnets are the prompts (synthetic if missing)")
    p.add_argument("--tokenizer", default=None, help="GPT-2 tokenizer directory (default: $GPT2_TOKENIZER_DIR)")
    p.add_argument("--num_prompts", type=int, default=12)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.2)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine (best is reported)")
    p.add_argument("--starter_prompts", type=int, default=2, help="prompts the slow no-cache loop runs on")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load_prompts(args) -> tuple[list[list[int]], str]:
    path = Path(args.prompts)
    if path.is_file():
        from models.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        texts = read_sonnets(path)[: args.num_prompts]
        if len(texts) < args.num_prompts:
            raise SystemExit(f"--prompts {path}: {len(texts)} sonnets, --num_prompts asks for {args.num_prompts}")
        return [tok.encode(t) for t in texts], str(path)
    g = torch.Generator().manual_seed(args.seed)
    return [torch.randint(0, 50000, (36,), generator=g).tolist() for _ in range(args.num_prompts)], "synthetic (36 tokens)"


@torch.no_grad()
def starter_loop(model, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float,
                 generator: torch.Generator, device) -> list[int]:
    """The reference: no cache, whole prefix every step, one prompt."""
    ids = torch.tensor([prompt], device=device)
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1].float() / temperature
        probs = top_p_filter(logits, top_p).softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids[0].tolist()


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    ours = GPT2LMHeadModel(GPT2Config.from_name(args.model_size)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    ours.to(device)
    hf.to(device)
    hf.generation_config.eos_token_id = None  # exactly max_new_tokens per row everywhere

    prompts, source = load_prompts(args)
    ids, mask = left_pad(prompts, pad_id=ours.config.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    n = args.max_new_tokens
    sample = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, max_new_tokens=n)

    def run_ours():
        out = ours.generate(ids, mask, generator=torch.Generator(device=device).manual_seed(args.seed), **sample)
        assert out.shape == (len(prompts), ids.size(1) + n)

    def run_hf():
        out = hf.generate(ids, attention_mask=mask, top_k=0, pad_token_id=ours.config.pad_token_id,
                          use_cache=True, **sample)
        assert out.shape == (len(prompts), ids.size(1) + n)

    def run_starter():
        g = torch.Generator(device=device).manual_seed(args.seed)
        for prompt in prompts[: args.starter_prompts]:
            starter_loop(ours, prompt, n, args.temperature, args.top_p, g, device)

    timed(lambda: ours.generate(ids[:2], mask[:2], **{**sample, "max_new_tokens": 4}), device)  # warm-up
    timed(lambda: hf.generate(ids[:2], attention_mask=mask[:2], top_k=0, pad_token_id=ours.config.pad_token_id,
                              **{**sample, "max_new_tokens": 4}), device)
    times = {"ours": [], "transformers": [], "starter": []}
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits every engine alike
        times["ours"].append(timed(run_ours, device))
        times["transformers"].append(timed(run_hf, device))
    times["starter"].append(timed(run_starter, device))
    tokens = {"ours": len(prompts) * n, "transformers": len(prompts) * n,
              "starter": min(args.starter_prompts, len(prompts)) * n}
    tps = {k: tokens[k] / min(v) for k, v in times.items()}

    rows = [("ours (KV cache, batched)", "ours"), ("transformers generate", "transformers"),
            ("starter loop (no cache, 1 prompt)", "starter")]
    print(f"\nsonnet-style generation: {len(prompts)} prompts ({source}, {ids.size(1)} tokens padded), "
          f"{n} new tokens, top_p={args.top_p}, T={args.temperature}, model {args.model_size} (random), "
          f"device {device}, torch threads {torch.get_num_threads()}\n")
    print("| engine | generated tokens | best time (s) | tokens/s | ours is x faster |")
    print("|---|---|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {tokens[key]} | {min(times[key]):.2f} | {tps[key]:.1f} | {tps['ours'] / tps[key]:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(), "args": vars(args), "prompt_source": source,
        "prompt_tokens_padded": ids.size(1), "times_s": times, "tokens": tokens, "tokens_per_s": tps,
        "speedup_vs_transformers": tps["ours"] / tps["transformers"], "speedup_vs_starter": tps["ours"] / tps["starter"],
    }
    out = RESULTS / "generation.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
