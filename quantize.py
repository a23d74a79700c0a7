"""Post-training weight quantization of a GPT-2 checkpoint, with a report of memory, speed and quality.

    python quantize.py --model runs/wt2-tiny/model --methods bf16 int8 int4 gptq \\
        --eval_corpus ../shared/data/wikitext-2/test.txt --max_tokens 20000 --out runs/quant/wt2-tiny \\
        --calib_corpus ../shared/data/wikitext-2/train.txt --calib_tokens 16384 --group_size 64 --window 128

Every linear layer of every block (query, key, value, attention_dense, interm_dense, out_dense)
is quantized, weights only (activations stay in floating point):

  bf16   every weight rounded to bfloat16 and run in bfloat16 (the half-precision baseline)
  int8   8-bit, one scale per output channel, round-to-nearest
  int4   4-bit, one scale per --group_size input columns, round-to-nearest
  gptq   --gptq_bits (4: groups of --group_size, 8: per channel) with GPTQ (Frantar et al., 2022)
         on --calib_tokens tokens of --calib_corpus

`--quantize_embedding` also quantizes the tied token-embedding / output matrix (round-to-nearest,
the method's bits and groups): it is one tensor, so the input embeddings and the output layer
change together.  Each model is written to OUT/<method>/ (quantized formats: models/quant/io.py; bf16: a
Hugging Face checkpoint with bf16 tensors), loadable with `--model_size OUT/<method>` by every
script (`perplexity.py --model OUT/int8`, generation, the task scripts' prediction with --epochs 0).
OUT/report.json holds, per method, the linear-layer weight bytes (scales included, biases not),
all model bytes, the sliding-window perplexity of --eval_corpus (evaluation/perplexity.py) and the
forward-pass tokens/s, each next to fp32's, measured in this process with calls interleaved.
See docs/quantization.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import machine_description, markdown_table, median, time_interleaved
from evaluation.perplexity import perplexity, score_windows
from models.gpt2 import GPT2LMHeadModel
from models.hf_io import read_hf_config
from models.tokenizer import load_tokenizer, resolve_tokenizer_dir
from lm.corpus import tokenize_corpus_file
from models.quant import (QuantSpec, gptq_quantize_model, linear_bytes, model_bytes, quantize_embedding, quantize_linears,
                   save_quantized)
from models.quant.modules import LINEAR_LAYERS
from training.checkpoint import atomic_write_text

METHODS = ("bf16", "int8", "int4", "gptq")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face GPT-2 checkpoint directory to quantize "
                                                  "(config.json + model.safetensors), e.g. a pretrain.py RUN_DIR/model")
    p.add_argument("--methods", nargs="+", required=True, choices=METHODS, help="what to produce (fp32 is the reference)")
    p.add_argument("--eval_corpus", type=Path, required=True, help="text file scored for perplexity")
    p.add_argument("--max_tokens", type=int, required=True, help="score the first N tokens of --eval_corpus")
    p.add_argument("--out", type=Path, required=True, help="directory for <method>/ models and report.json")
    p.add_argument("--group_size", type=int, default=128,
                   help="input columns per scale for int4 and 4-bit GPTQ (must divide the layers' input widths; "
                        "64 for the tiny model)")
    p.add_argument("--quantize_embedding", action="store_true",
                   help="also quantize the tied embedding / output matrix (round-to-nearest)")
    g = p.add_argument_group("GPTQ")
    g.add_argument("--calib_corpus", type=Path, default=None, help="calibration text (required by gptq)")
    g.add_argument("--calib_tokens", type=int, default=16384, help="calibration tokens, cut into --window blocks")
    g.add_argument("--gptq_bits", type=int, default=4, choices=(4, 8), help="4: groups of --group_size; 8: per channel")
    g.add_argument("--gptq_damp", type=float, default=0.01, help="dampening, as a fraction of the mean Hessian diagonal")
    g.add_argument("--gptq_block_size", type=int, default=128, help="columns per lazy batch update")
    e = p.add_argument_group("evaluation")
    e.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window // 2)")
    e.add_argument("--batch_size", type=int, default=8, help="windows (and calibration blocks) per forward pass")
    e.add_argument("--speed_repeats", type=int, default=7, help="timed forward passes per model (median)")
    e.add_argument("--speed_batch", type=int, default=4, help="sequences of --window tokens per timed forward")
    e.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives steadier timings on a shared machine)")
    p.add_argument("--tokenizer", default=None, help="directory with vocab.json and merges.txt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked before any work (the model's config.json is read for the shapes)."""
    if len(set(args.methods)) != len(args.methods):
        p.error(f"--methods lists a method twice: {args.methods}")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        p.error(f"--model {args.model}: expected a checkpoint directory holding config.json")
    if (model_dir / "quantization.json").is_file():
        p.error(f"--model {args.model} is already quantized; give the full-precision checkpoint")
    if not args.eval_corpus.is_file():
        p.error(f"--eval_corpus {args.eval_corpus}: no such file")
    if args.max_tokens < 2:
        p.error(f"--max_tokens must be >= 2, got {args.max_tokens}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a directory")
    for flag in ("batch_size", "speed_repeats", "speed_batch", "gptq_block_size", "calib_tokens", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.gptq_damp < 0:
        p.error(f"--gptq_damp must be >= 0, got {args.gptq_damp}")
    config = read_hf_config(model_dir)
    args.window = args.window or config.max_position_embeddings
    if not 2 <= args.window <= config.max_position_embeddings:
        p.error(f"--window must be in [2, {config.max_position_embeddings}] (the model's context), got {args.window}")
    args.stride = args.stride or max(1, args.window // 2)
    if not 1 <= args.stride <= args.window:
        p.error(f"--stride must be in [1, --window {args.window}], got {args.stride}")
    widths = {config.hidden_size, config.intermediate_size}
    needs_groups = "int4" in args.methods or ("gptq" in args.methods and args.gptq_bits == 4)
    if needs_groups and (args.group_size < 2 or any(w % args.group_size for w in widths)):
        p.error(f"--group_size {args.group_size} must divide every quantized layer's input width "
                f"({sorted(widths)}); e.g. {max(d for d in (128, 64, 32, 16) if all(w % d == 0 for w in widths))}")
    if "gptq" in args.methods:
        if args.calib_corpus is None:
            p.error("--methods gptq needs --calib_corpus (calibration text, not the evaluation text)")
        if not args.calib_corpus.is_file():
            p.error(f"--calib_corpus {args.calib_corpus}: no such file")
        if args.calib_tokens < args.window:
            p.error(f"--calib_tokens ({args.calib_tokens}) must be at least one --window ({args.window}) block")
        if args.calib_corpus.resolve() == args.eval_corpus.resolve():
            print("warning: --calib_corpus is the --eval_corpus: GPTQ then sees the text it is scored on")
    else:
        unused = [f"--{f}" for f in ("calib_corpus", "calib_tokens", "gptq_bits", "gptq_damp", "gptq_block_size")
                  if getattr(args, f) != p.get_default(f)]
        if unused:
            p.error(f"{', '.join(unused)}: only used by --methods gptq; add gptq to --methods or drop them")
    if not needs_groups and args.group_size != p.get_default("group_size"):
        p.error("--group_size is only used by --methods int4 and 4-bit gptq; add one of them or drop it")


def method_spec(method: str, args) -> QuantSpec:
    if method == "int8" or (method == "gptq" and args.gptq_bits == 8):
        return QuantSpec(8, None)
    return QuantSpec(4, args.group_size)


def build(method: str, fp32: GPT2LMHeadModel, calibration, args) -> GPT2LMHeadModel:
    model = copy.deepcopy(fp32)
    if method == "bf16":
        return model.to(torch.bfloat16)
    spec = method_spec(method, args)
    if method == "gptq":
        gptq_quantize_model(model, calibration, spec, damp=args.gptq_damp, block_size=args.gptq_block_size,
                            batch_size=args.batch_size)
    else:
        quantize_linears(model, spec)
    if args.quantize_embedding:
        quantize_embedding(model, spec)
    return model


def save(method: str, model: GPT2LMHeadModel, args) -> Path:
    directory = args.out / method
    tokenizer_dir = resolve_tokenizer_dir(args.tokenizer, args.model)
    if method == "bf16":
        return model.save_pretrained(directory, tokenizer=tokenizer_dir)
    return save_quantized(model, directory, tokenizer_dir)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fp32 = GPT2LMHeadModel.from_name_or_path(args.model).to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer, model_dir=args.model)
    eval_ids = tokenize_corpus_file(args.eval_corpus, tokenizer, args.max_tokens)
    calibration = None
    if "gptq" in args.methods:
        stream = tokenize_corpus_file(args.calib_corpus, tokenizer, args.calib_tokens)
        blocks = stream.numel() // args.window
        if blocks < 1:
            raise SystemExit(f"--calib_corpus {args.calib_corpus}: only {stream.numel()} tokens, fewer than one "
                             f"--window ({args.window})")
        calibration = stream[:blocks * args.window].view(blocks, args.window)  # (num_blocks, window)

    models, rows = {"fp32": fp32}, {}
    for method in args.methods:
        t0 = time.perf_counter()
        models[method] = build(method, fp32, calibration, args).eval()
        rows[method] = {"quantize_seconds": round(time.perf_counter() - t0, 2),
                        "dir": str(save(method, models[method], args))}
        print(f"[quantize] {method}: built in {rows[method]['quantize_seconds']:.1f}s, wrote {rows[method]['dir']}",
              flush=True)

    # Speed first (same inputs for every model, calls interleaved), then quality.
    x = eval_ids[:args.speed_batch * args.window]
    x = (x.repeat(args.speed_batch * args.window // x.numel() + 1)[:args.speed_batch * args.window]
         .view(args.speed_batch, args.window).to(device))  # (B, window)
    with torch.no_grad():
        times = time_interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, device,
                                 steps=args.speed_repeats, warmup=2)
    speed = {name: x.numel() / median(t) for name, t in times.items()}
    quality = {}
    for name, m in models.items():
        nll, n = score_windows(m, eval_ids, args.window, args.stride, args.batch_size)
        quality[name] = (perplexity(nll, n), n)
    lin32, mod32 = linear_bytes(fp32), model_bytes(fp32)
    for method, m in models.items():
        if method == "fp32":
            continue
        lin = linear_bytes(m)
        rows[method].update({
            "linear_bytes": lin[0], "linear_bytes_fp32": lin32[0], "linear_ratio": lin[0] / lin32[0],
            "model_bytes": model_bytes(m), "model_bytes_fp32": mod32, "model_ratio": model_bytes(m) / mod32,
            "ppl": quality[method][0], "ppl_fp32": quality["fp32"][0], "ppl_ratio": quality[method][0] / quality["fp32"][0],
            "tokens_per_s": speed[method], "tokens_per_s_fp32": speed["fp32"], "speed_ratio": speed[method] / speed["fp32"],
            "quantization": getattr(m.backbone, "quantization", None),
        })
    report = {
        "model": str(args.model), "eval_corpus": str(args.eval_corpus), "scored_tokens": quality["fp32"][1],
        "window": args.window, "stride": args.stride, "group_size": args.group_size,
        "quantize_embedding": args.quantize_embedding, "linear_layers": list(LINEAR_LAYERS),
        "fp32": {"linear_bytes": lin32[0], "model_bytes": mod32, "ppl": quality["fp32"][0], "tokens_per_s": speed["fp32"]},
        "methods": rows,
        "speed": {"batch": list(x.shape), "repeats": args.speed_repeats, "seconds": times},
        "machine": {"device": machine_description(device), "platform": platform.platform(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if "gptq" in args.methods:
        report["calibration"] = {"corpus": str(args.calib_corpus), "tokens": calibration.numel(),
                                 "blocks": list(calibration.shape)}
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=2) + "\n")
    print(markdown_table(*table(report)))
    print(f"[quantize] wrote {args.out / 'report.json'}")
    return report


def table(report: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of the memory / speed / quality table of a report."""
    header = ["method", "linear weight bytes", "vs fp32", "model bytes", "vs fp32", "perplexity", "vs fp32",
              "forward tokens/s", "vs fp32"]
    fp = report["fp32"]
    rows = [["fp32", f"{fp['linear_bytes']:,}", "1.000", f"{fp['model_bytes']:,}", "1.000", f"{fp['ppl']:.2f}",
             "1.000", f"{fp['tokens_per_s']:,.0f}", "1.00"]]
    for method, r in report["methods"].items():
        rows.append([method, f"{r['linear_bytes']:,}", f"{r['linear_ratio']:.3f}", f"{r['model_bytes']:,}",
                     f"{r['model_ratio']:.3f}", f"{r['ppl']:.2f}", f"{r['ppl_ratio']:.3f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['speed_ratio']:.2f}"])
    return header, rows


if __name__ == "__main__":
    main()
