"""Generation throughput: our engine (eager, compiled, speculative) vs transformers' `generate` vs
the starter's loop, over decoding strategy x batch x length x next-token distribution.

Models: a `gpt2`-shaped model with random weights, the very same weights in transformers
(`bench.model.build_pair`).  "random": as initialised (near-uniform next-token distributions, a
top-p 0.9 nucleus of ~38,000 tokens).  "peaked": the final LayerNorm's gain multiplied by
`--peak` (7), which scales every logit by 7: distributions like a trained model's (a top-p 0.9
nucleus of median ~240 tokens, 1 to ~900, on the sonnet prompts; measured and printed).  Prompts: the 12 dev sonnet prompts (`--prompts`, synthetic
36-token prompts if missing), left-padded; batch 1 is the first one.  EOS is off, so every
engine generates exactly the requested tokens.

Engines per row: ours eager (`model.generate`), ours compiled (`compile=True`, compile time
excluded by a warm-up run), transformers (`top_k=0` so it filters what we filter), and the
starter's approach (no cache, the whole prefix through the model every step, one prompt at a
time; written here as the reference) on the first prompt, for 32-token greedy/top-p rows.
Speculative rows: greedy, batch 1, ours with `assistant_model=` vs transformers' assisted
generation with the same draft (constant `num_assistant_tokens`), vs our plain greedy.  The
"good draft": the target's first `--draft_layers` layers (shared embeddings, layers and final
LayerNorm) of a target whose later layers are near-identity (their residual projections scaled
by `--late_scale`), so most proposals are accepted; the acceptance rate is printed.

Timing: engines interleaved, `--repeats` runs each, medians.  Prints one markdown table and
writes bench/results/generation-<device>.json.  `--profile` instead prints torch.profiler's
per-decode-step time by op for ours and transformers (prefill subtracted).

    python -m bench.generation --threads 1                        # the whole table (CPU: long)
    python -m bench.generation --rows target --repeats 5          # the 12 x 64 peaked target rows
    python -m bench.generation --profile --mode greedy --batch 12 --new 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import machine_description, markdown_table, sync, write_results
from bench.model import build_pair
from models.generation import left_pad, top_p_filter_full
from models.generation.decoder import inference_copies
from models.gpt2 import GPT2LMHeadModel
from modules import inference_weights

TOP_P, TEMPERATURE, BEAMS = 0.9, 1.0, 4
MODES = {"greedy": dict(do_sample=False), "top-p": dict(do_sample=True, top_p=TOP_P, temperature=TEMPERATURE),
         "beam": dict(do_sample=False, num_beams=BEAMS)}
ROWS = {  # (distribution, mode, batch, new tokens)
    "target": [("peaked", m, 12, 64) for m in ("greedy", "top-p")],
}
ROWS["all"] = ROWS["target"] + [(d, m, b, n) for d in ("peaked", "random") for m in MODES for b in (1, 12)
                                for n in (32, 128)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model_size", default="gpt2", help="preset shape of the random model")
    p.add_argument("--prompts", default="data/sonnets_held_out_dev.txt", help="sonnets file: first 12 = prompts")
    p.add_argument("--rows", default="all", help="'all', 'target', or rows 'dist:mode:batch:new' comma-separated")
    p.add_argument("--engines", default="eager,compiled,transformers,starter,speculative",
                   help="subset of eager, compiled, transformers, starter, speculative")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median)")
    p.add_argument("--peak", type=float, default=7.0, help="logit scale of the peaked model")
    p.add_argument("--draft_layers", type=int, default=1, help="layers of the speculative draft")
    p.add_argument("--late_scale", type=float, default=0.05, help="residual scale of the target's later layers")
    p.add_argument("--assistant_tokens", type=int, default=4, help="draft tokens per speculative step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="profile one row instead (--mode, --batch, --new)")
    p.add_argument("--mode", default="greedy", choices=list(MODES))
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--out", default=None, help="JSON name under bench/results (default generation-<device>)")
    return p.parse_args(argv)


def load_prompts(path: str, device) -> tuple[torch.Tensor, torch.Tensor, str]:
    if Path(path).is_file():
        from tasks.sonnets import read_sonnets
        from models.tokenizer import load_tokenizer

        tok = load_tokenizer(None)
        seqs, source = [tok.encode(t) for t in read_sonnets(path)[:12]], path
    else:
        g = torch.Generator().manual_seed(0)
        seqs, source = [torch.randint(0, 50000, (36,), generator=g).tolist() for _ in range(12)], "synthetic"
    ids, mask = left_pad(seqs, pad_id=50256)
    return ids.to(device), mask.to(device), source


def peaked(ours, hf, scale: float) -> None:
    with torch.no_grad():
        ours.gpt.final_layer_norm.weight.mul_(scale)
        hf.transformer.ln_f.weight.mul_(scale)


def speculative_pair(ours: GPT2LMHeadModel, args, device):
    """(target, draft) ours and transformers': the target's layers >= draft_layers near-identity."""
    import tempfile

    import transformers

    target = GPT2LMHeadModel(ours.config).to(device).eval()
    target.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for layer in target.gpt.gpt_layers[args.draft_layers:]:
            for linear in (layer.attention_dense, layer.out_dense):
                linear.weight.mul_(args.late_scale)
                linear.bias.mul_(args.late_scale)
    config = type(ours.config)(**{**ours.config.to_dict(), "num_hidden_layers": args.draft_layers})
    draft = GPT2LMHeadModel(config).to(device).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    hf_models = []
    for model in (target, draft):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
            hf.generation_config.eos_token_id = None
            hf_models.append(hf)
    return target, draft, hf_models[0], hf_models[1]


@torch.no_grad()
def starter_loop(model, prompt: torch.Tensor, n: int, sample: bool, generator) -> torch.Tensor:
    """The reference: no cache, the whole prefix through the model every step, one prompt."""
    ids = prompt[None]
    for _ in range(n):
        logits = model(ids)[:, -1].float()
        if sample:
            nxt = torch.multinomial(top_p_filter_full(logits / TEMPERATURE, TOP_P).softmax(-1), 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def nucleus_sizes(model, ids, mask) -> tuple[float, int, int]:
    """Median, min, max top-p nucleus size over the prompt positions and 32 top-p sampled tokens."""
    with torch.no_grad():
        seqs = model.generate(ids, mask, max_new_tokens=32, generator=torch.Generator(ids.device).manual_seed(0),
                              **MODES["top-p"])
        full_mask = torch.cat([mask, torch.ones_like(seqs[:, mask.size(1):])], 1)
        logits = model(seqs, full_mask, (full_mask.cumsum(-1) - 1).clamp(min=0))[full_mask.bool()].float()
        probs = (logits / TEMPERATURE).softmax(-1).sort(-1, descending=True).values
        n = (probs.cumsum(-1) < TOP_P).sum(-1) + 1
    return float(n.float().median()), int(n.min()), int(n.max())


def run_row(engines: dict, device, repeats: int) -> dict[str, dict]:
    """Median wall and CPU (process) seconds of each engine, runs interleaved (round-robin), one
    untimed warm-up each; the per-round times are kept under "rounds" for per-round ratios.  With
    one torch thread the CPU time is what an engine costs on a shared machine; the wall time also
    counts the time other jobs held the core."""
    times = {name: {"wall": [], "cpu": []} for name in engines}
    for i in range(repeats + 1):
        for name, fn in engines.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if i:
                times[name]["wall"].append(time.perf_counter() - t0)
                times[name]["cpu"].append(time.process_time() - c0)
    return {name: {**{k: statistics.median(v) for k, v in t.items()}, "rounds": t} for name, t in times.items()}


def speedup(t: dict, a: str, b: str, key: str = "cpu") -> str:
    """How many times faster engine a is than b: the median over rounds of b's time / a's time
    (both ran in the same round, so load changes between rounds cancel)."""
    if a not in t or b not in t:
        return "-"
    return f"{statistics.median(tb / ta for ta, tb in zip(t[a]['rounds'][key], t[b]['rounds'][key])):.2f}"


def row_engines(row, models, ids, mask, wanted, device, args):
    dist, mode, batch, n = row
    ours, hf = models[dist]
    ids, mask = ids[:batch], mask[:batch]
    if batch == 1:
        keep = mask[0].bool()
        ids, mask = ids[:, keep], mask[:, keep]
    kw = MODES[mode]
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    engines = {"eager": lambda: ours.generate(ids, mask, max_new_tokens=n, generator=gen(), **kw),
               "compiled": lambda: ours.generate(ids, mask, max_new_tokens=n, generator=gen(), compile=True, **kw),
               "transformers": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=n, top_k=0,
                                                   pad_token_id=50256, use_cache=True, **kw)}
    if mode != "beam" and n == 32:
        engines["starter"] = lambda: starter_loop(ours, ids[0][mask[0].bool()], n, mode == "top-p", gen())
    # Compiled rows: greedy/top-p on the peaked model (a step compiles per model and shape; the
    # random model's step is the same computation).
    skip = {"compiled"} if mode == "beam" or dist != "peaked" else set()
    return {k: v for k, v in engines.items() if k in wanted and k not in skip}, batch * n


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dynamo = torch._dynamo.config  # one compiled step per (model, batch, cache length): more than the default 8
    setattr(dynamo, "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit", 64)
    ids, mask, source = load_prompts(args.prompts, device)
    rows = ROWS.get(args.rows) or [(d, m, int(b), int(n)) for d, m, b, n in (r.split(":") for r in args.rows.split(","))]
    wanted = set(args.engines.split(","))
    models = {}
    for dist in sorted({r[0] for r in rows} | ({"peaked"} if args.profile else set())):
        ours, hf = build_pair(args.model_size, device)
        ours.eval(), hf.eval()
        hf.generation_config.eos_token_id = None
        if dist == "peaked":
            peaked(ours, hf, args.peak)
        models[dist] = (ours, hf)
    if args.profile:
        return profile(models["peaked"], ids[:args.batch], mask[:args.batch], args)
    header = (f"{args.model_size} (random weights), prompts: {source}, {machine_description(device)}, "
              f"load average {os.getloadavg()[0]:.1f} at start")
    print(header)
    for dist, (ours, _) in models.items():
        print(f"{dist}: top-p {TOP_P} nucleus size median/min/max = {nucleus_sizes(ours, ids, mask)}")
    copies = copies_cost(next(iter(models.values()))[0])
    print("inference copies (modules/inference_weights.py), ms per generate() call: "
          + ", ".join(f"{k} {v:.0f}" for k, v in copies.items()))
    table, payload = [], {"header": header, "args": vars(args), "rows": [], "inference_copies_ms": copies}
    for row in rows:
        engines, tokens = row_engines(row, models, ids, mask, wanted, device, args)
        t = run_row(engines, device, args.repeats if row[2] * row[3] <= 12 * 64 or row[1] != "beam" else 1)
        if "starter" in t:  # one prompt at a time: the batch takes `batch` times as long
            st = t["starter"]
            t["starter"] = {"wall": st["wall"] * row[2], "cpu": st["cpu"] * row[2],
                            "rounds": {k: [x * row[2] for x in v] for k, v in st["rounds"].items()}}
        tps = {k: tokens / v["wall"] for k, v in t.items()}
        cpu = {k: tokens / v["cpu"] for k, v in t.items()}
        table.append([*map(str, row), *(f"{tps[e]:.1f}" if e in tps else "-" for e in ENGINES),
                      *(speedup(t, e, "transformers") for e in ("eager", "compiled")),
                      speedup(t, "eager", "transformers", "wall"), speedup(t, "eager", "starter")])
        payload["rows"].append({"row": row, "seconds": t, "tokens_per_s": tps, "tokens_per_cpu_s": cpu})
        print(markdown_table(HEADER, table[-1:]).splitlines()[-1], flush=True)
    if "speculative" in wanted:
        table += speculative_rows(models.get("peaked") or next(iter(models.values())), ids, mask, device, args, payload)
    print("\n" + header + f" ({os.getloadavg()[0]:.1f} at the end)\n")
    print(markdown_table(HEADER, table))
    print("wrote", write_results(args.out or f"generation-{args.device}", payload))


ENGINES = ("eager", "compiled", "transformers", "starter")
HEADER = ["dist", "decoding", "batch", "new", "eager tok/s", "compiled tok/s", "transformers tok/s",
          "starter tok/s", "eager / HF (CPU time)", "compiled / HF (CPU time)", "eager / HF (wall)",
          "eager / starter (CPU time)"]


def copies_cost(model) -> dict[str, float]:
    """What preparing the inference copies costs a generate() call: building them (first call, or
    after the weights changed) and checking cached ones (every other call), packed (two or more
    decode rows) and input-major (one row); median of 3, ms."""
    def prepare(rows: int, cold: bool) -> float:
        times = []
        for _ in range(3):
            if cold:
                inference_weights.clear()
            t0 = time.perf_counter()
            with inference_copies([model], rows):
                pass
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    out = {}
    for rows, kind in ((12, "packed"), (1, "input-major")):
        out[f"{kind} build"], out[f"{kind} check"] = prepare(rows, True), prepare(rows, False)
    inference_weights.clear()
    return out


def speculative_rows(pair, ids, mask, device, args, payload) -> list[list[str]]:
    target, draft, hf_target, hf_draft = speculative_pair(pair[0], args, device)
    prompt = ids[:1, mask[0].bool()]
    k = args.assistant_tokens
    # transformers takes the draft length from the ASSISTANT's generation config (default: 20 tokens,
    # "heuristic" schedule growing by 2 after a fully accepted round, confidence-threshold stops),
    # not from generate()'s kwargs: set it there, so both engines draft exactly k tokens per round.
    hf_draft.generation_config.num_assistant_tokens = k
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_draft.generation_config.assistant_confidence_threshold = 0.0
    rows = []
    for n in (32, 128):
        stats = {}
        engines = {
            "greedy": lambda: target.generate(prompt, max_new_tokens=n),
            "speculative": lambda: target.generate(prompt, max_new_tokens=n, assistant_model=draft,
                                                   num_assistant_tokens=k, stats=stats),
            "transformers assisted": lambda: hf_target.generate(
                prompt, max_new_tokens=n, assistant_model=hf_draft, num_assistant_tokens=k,
                num_assistant_tokens_schedule="constant", pad_token_id=50256, do_sample=False),
            "transformers": lambda: hf_target.generate(prompt, max_new_tokens=n, pad_token_id=50256, do_sample=False)}
        same = torch.equal(engines["speculative"](), engines["greedy"]())
        t = run_row(engines, device, args.repeats)
        tps = {name: n / v["wall"] for name, v in t.items()}
        cpu = {name: n / v["cpu"] for name, v in t.items()}
        label = (f"greedy + speculative (draft: {args.draft_layers} layer(s), k={k}, "
                 f"acceptance {stats['acceptance_rate']:.2f})")
        rows.append(["peaked*", label, "1", str(n), f"{tps['speculative']:.1f}", "-",
                     f"{tps['transformers assisted']:.1f} (assisted)", "-",
                     speedup(t, "speculative", "transformers assisted"), "-",
                     speedup(t, "speculative", "transformers assisted", "wall"),
                     f"{speedup(t, 'speculative', 'greedy')} x our greedy ({tps['greedy']:.1f} tok/s), "
                     f"{speedup(t, 'speculative', 'transformers')} x HF greedy; tokens == greedy: {same}"])
        payload["rows"].append({"row": ["speculative", n], "seconds": t, "tokens_per_s": tps, "tokens_per_cpu_s": cpu,
                                "stats": dict(stats), "identical_to_greedy": same})
        print(markdown_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    return rows


def profile(pair, ids, mask, args) -> None:
    """Self CPU time per decode step by op (the prefill-only run subtracted), ours vs transformers."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    ours, hf = pair
    kw = MODES[args.mode]
    runs = {"ours": lambda n: ours.generate(ids, mask, max_new_tokens=n, **kw),
            "transformers": lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, top_k=0,
                                                  pad_token_id=50256, **kw)}
    for name, run in runs.items():
        run(2)
        totals = []
        for n in (1, args.new):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                run(n)
            totals.append({e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()})
        steps = args.new - 1
        per_op = sorted(((t - totals[0].get(k, (0, 0))[0]) / steps / 1e3, k, c) for k, (t, c) in totals[1].items())[::-1]
        print(f"\n{name}: {args.mode}, batch {ids.size(0)}, {args.new} new tokens: "
              f"{sum(x[0] for x in per_op):.1f} ms per decode step (self CPU)")
        print(markdown_table(["op", "ms / step", "calls"], [[k, f"{ms:.2f}", c] for ms, k, c in per_op[:12]]))


if __name__ == "__main__":
    main()
