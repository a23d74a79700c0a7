"""Perplexity of a GPT-2 checkpoint on a text file, or a cross-domain table over several corpora.

    python perplexity.py --model tiny --text_file data/sonnets.txt --stride 256
    python perplexity.py --model tiny --model runs/pretrain/poetry/best --corpora --max_tokens 20000

`--model` takes what `--model_size` takes in every script: `tiny` (random), a preset with
`--random_init`, a hub name (`gpt2`, `gpt2-medium`, ...) or a local Hugging Face directory (for
example one written by `pretrain.py`).  Scoring uses `evaluation.perplexity.sliding_window_nll`
(windows of `--window` tokens every `--stride` tokens).  A file is read as documents
(`lm.corpus.read_documents`: a plain text file is one document, a `sonnets*` file one per
sonnet, a CSV one per poem) joined with `<|endoftext|>`, the format `pretrain.py` trains on.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


from evaluation.perplexity import perplexity, score_windows
from lm.corpus import find_data_file, tokenize_corpus_file
from models.gpt2 import GPT2LMHeadModel
from models.tokenizer import load_tokenizer
from training.cli import UsageError, add_attention_args, add_device_args, entry_point, resolve_device
from training.config import ModelConfig

DEFAULT_CORPORA = {
    "ptb": "ptb/ptb.test.txt",
    "wikitext2": "wikitext-2/test.txt",
    "shakespeare": "tinyshakespeare/input.txt",
    "sonnets": "sonnets.txt",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None,
                   help="checkpoint to score (repeat for several rows): tiny, a preset, a hub name or a local HF dir "
                        "(default: tiny)")
    p.add_argument("--random_init", action="store_true",
                   help="build presets / directories with random weights (architecture only)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text_file", type=Path, help="score this file")
    what.add_argument("--corpora", nargs="*", metavar="NAME[=PATH]",
                      help=f"cross-domain table over these corpora; known names: {', '.join(DEFAULT_CORPORA)} "
                           f"(no names = all of them); NAME=PATH adds any file")
    p.add_argument("--window", type=int, default=None,
                   help="tokens of context per window (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window // 2)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max_tokens", type=int, default=None,
                   help="score only the first N tokens of each text (keeps CPU runs short)")
    p.add_argument("--tokenizer", default=None, help="directory with vocab.json and merges.txt")
    add_device_args(p)
    add_attention_args(p)
    args = p.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError(f"--max_tokens must be >= 2, got {args.max_tokens}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    for flag in ("window", "stride"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    args.model = args.model or ["tiny"]
    return args


def corpus_paths(specs: list[str]) -> dict[str, Path]:
    """NAME -> file for the `--corpora` entries (known names resolve through lm.corpus.find_data_file)."""
    out: dict[str, Path] = {}
    for spec in specs or list(DEFAULT_CORPORA):
        if "=" in spec:
            name, path = spec.split("=", 1)
            out[name] = Path(path)
        elif spec in DEFAULT_CORPORA:
            out[spec] = find_data_file(DEFAULT_CORPORA[spec])
        else:
            raise UsageError(f"--corpora: unknown corpus {spec!r}; use one of {list(DEFAULT_CORPORA)} or NAME=PATH")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    files = {args.text_file.name: args.text_file} if args.text_file else corpus_paths(args.corpora)
    for name, path in files.items():
        if not path.is_file():
            raise UsageError(f"{name}: no such file {path}")
    overrides = ModelConfig(attention=args.attention, attention_window=args.attention_window,
                            sparse_layers=args.sparse_layers, attention_backend=args.attention_backend,
                            attention_global_tokens=args.attention_global_tokens)
    overrides.validate()
    device = resolve_device("cuda" if args.use_gpu else args.device)
    results: dict[str, dict[str, dict]] = {}
    for spec in args.model:
        model = GPT2LMHeadModel.from_name_or_path(spec, random_init=args.random_init,
                                                  **overrides.overrides()).to(device).eval()
        tokenizer = load_tokenizer(args.tokenizer, model_dir=spec)
        results[spec] = {}
        for name, path in files.items():
            ids = tokenize_corpus_file(path, tokenizer, args.max_tokens)
            t0 = time.time()
            nll, n = score_windows(model, ids, args.window, args.stride, args.batch_size)
            row = {"tokens": n, "mean_nll": nll / n, "perplexity": perplexity(nll, n), "seconds": time.time() - t0}
            results[spec][name] = row
            print(f"{spec} on {path}: tokens={n} mean_nll={row['mean_nll']:.4f} "
                  f"perplexity={row['perplexity']:.2f} ({row['seconds']:.1f}s)", flush=True)
        del model
    if args.corpora is not None:
        print()
        print(markdown_table(results, list(files)))
    return results


def markdown_table(results: dict[str, dict[str, dict]], names: list[str]) -> str:
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for spec, row in results.items():
        cells = [f"{row[n]['perplexity']:.1f}" if math.isfinite(row[n]["perplexity"]) else "inf" for n in names]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    tokens = [str(next(iter(results.values()))[n]["tokens"]) for n in names]
    lines.append("| (scored tokens) | " + " | ".join(tokens) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    entry_point(main)()
