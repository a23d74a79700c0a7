"""Word-level language-model baselines on Penn Treebank: RNN (from scratch), LSTM, Transformer.

    python lm_baselines.py --epochs 3 --max_minutes 8 20 12 --hidden 200 --lr 2e-3 --dropout 0.1 --cross_max_words 20000 --threads 1 --out runs/lm_baselines/cpu_run

One vocabulary (PTB train + `<eos>`) for all models.  After every epoch: train and valid
perplexity; at the end: test perplexity, cross-domain perplexity on WikiText-2 and tiny
Shakespeare (brought to PTB's conventions, unknown words -> `<unk>`, OOV rate reported), and
greedy and temperature samples from the same prompts.  Writes results.md, results.json and
loss/perplexity PNGs to `--out`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import time
from pathlib import Path

import torch

from lm.baselines import TrainSettings, evaluate_ppl, sample_prompts, train_baseline
from lm.corpus import find_data_file
from lm.models import build_baseline
from lm.report import write_results
from lm.vocab import Vocabulary, read_english_sentences, read_ptb_sentences
from training.cli import UsageError, add_device_args, check_file_flags, entry_point, resolve_device

DEFAULT_PROMPTS = ["the company said", "in the first quarter", "the president of the"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["rnn", "lstm", "transformer"],
                   choices=["rnn", "lstm", "transformer"], help="baselines to train, in this order")
    p.add_argument("--ptb_dir", type=Path, default=None,
                   help="directory with ptb.{train,valid,test}.txt (default: data/ptb, else ../shared/data/ptb)")
    p.add_argument("--wikitext", type=Path, default=None, help="WikiText-2 file for cross-domain perplexity "
                   "(default: wikitext-2/test.txt under data/ or ../shared/data)")
    p.add_argument("--shakespeare", type=Path, default=None, help="tiny Shakespeare file (default: "
                   "tinyshakespeare/input.txt under data/ or ../shared/data)")
    p.add_argument("--cross_max_words", type=int, default=None,
                   help="score only the first N words of each cross-domain corpus (default: all)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per model (upper bound, see --max_minutes)")
    p.add_argument("--max_minutes", type=float, nargs="+", default=None,
                   help="training-time budget per model (one value for all, or one per --models entry); "
                        "an epoch in progress is cut short when it runs out")
    p.add_argument("--max_steps_per_epoch", type=int, default=None, help="debug: cap the steps of every epoch")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (halved when valid ppl stalls)")
    p.add_argument("--batch_size", type=int, default=32, help="BPTT columns (RNN/LSTM) or blocks (Transformer)")
    p.add_argument("--bptt", type=int, default=35, help="truncated-BPTT length for the recurrent models")
    p.add_argument("--clip", type=float, default=0.5, help="gradient-norm clipping")
    p.add_argument("--hidden", type=int, default=256, help="embedding = hidden size of every model")
    p.add_argument("--layers", type=int, default=2, help="recurrent layers (RNN, LSTM)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout of every model")
    p.add_argument("--tf_layers", type=int, default=4, help="transformer layers")
    p.add_argument("--tf_heads", type=int, default=4, help="transformer attention heads")
    p.add_argument("--tf_context", type=int, default=64, help="transformer context (training block) in words")
    p.add_argument("--tf_batch_size", type=int, default=16, help="transformer blocks per step")
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS, help="sampling prompts (PTB-style words)")
    p.add_argument("--sample_words", type=int, default=25, help="words sampled per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled continuation")
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids thread thrashing on a CPU shared with other jobs)")
    p.add_argument("--out", type=Path, default=Path("runs/lm_baselines/latest"), help="results directory")
    args = p.parse_args(argv)
    if args.max_minutes is not None:
        if len(args.max_minutes) == 1:
            args.max_minutes = args.max_minutes * len(args.models)
        if len(args.max_minutes) != len(args.models):
            p.error(f"--max_minutes: give one value or one per model ({len(args.models)}), got {len(args.max_minutes)}")
    for flag in ("epochs", "batch_size", "bptt", "hidden", "layers", "tf_layers", "tf_heads", "tf_context",
                 "tf_batch_size", "sample_words"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("cross_max_words", "max_steps_per_epoch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    for flag, low in (("lr", 0.0), ("clip", 0.0)):
        if not (getattr(args, flag) > low and math.isfinite(getattr(args, flag))):
            raise UsageError(f"--{flag} must be a finite number > {low:g}, got {getattr(args, flag)}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.max_minutes is not None and not all(m > 0 and math.isfinite(m) for m in args.max_minutes):
        raise UsageError(f"--max_minutes must be finite numbers > 0, got {args.max_minutes}")
    args.device = str(resolve_device("cuda" if args.use_gpu else args.device))
    check_files(args)
    return args


def check_files(args: argparse.Namespace) -> None:
    """Every corpus file exists (the defaults resolved under data/ or ../shared/data) and --out is
    a directory to write into, before any model trains."""
    try:
        for split in ("train", "valid", "test"):
            path = args.ptb_dir / f"ptb.{split}.txt" if args.ptb_dir else find_data_file(f"ptb/ptb.{split}.txt")
            check_file_flags({"--ptb_dir": path})
        args.wikitext = args.wikitext or find_data_file("wikitext-2/test.txt")
        args.shakespeare = args.shakespeare or find_data_file("tinyshakespeare/input.txt")
    except FileNotFoundError as exc:
        raise UsageError(f"{exc}") from None
    check_file_flags({"--wikitext": args.wikitext, "--shakespeare": args.shakespeare})
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory for the results")


def load_streams(args, log):
    ptb = {split: read_ptb_sentences(args.ptb_dir / f"ptb.{split}.txt") if args.ptb_dir
           else read_ptb_sentences(find_data_file(f"ptb/ptb.{split}.txt")) for split in ("train", "valid", "test")}
    vocab = Vocabulary.from_sentences(ptb["train"])
    streams = {split: vocab.encode(sents)[0] for split, sents in ptb.items()}
    cross, oov = {}, {}
    for name, path in (("WikiText-2", args.wikitext or find_data_file("wikitext-2/test.txt")),
                       ("Shakespeare", args.shakespeare or find_data_file("tinyshakespeare/input.txt"))):
        sentences = read_english_sentences(path)
        if args.cross_max_words:
            kept, n = [], 0
            for s in sentences:
                if n >= args.cross_max_words:
                    break
                kept.append(s)
                n += len(s)
            sentences = kept
        ids, n_oov, n_words = vocab.encode(sentences)
        cross[name], oov[name] = ids, n_oov / max(1, n_words)
        log(f"{name}: {n_words} words from {path}, OOV rate {100 * oov[name]:.2f}%")
    ptb_test_oov = sum(w == "<unk>" for s in ptb["test"] for w in s) / sum(len(s) for s in ptb["test"])
    oov = {"PTB test (<unk> in the data)": ptb_test_oov, **oov}
    log(f"vocabulary {len(vocab)} words; train {streams['train'].numel()} tokens, "
        f"valid {streams['valid'].numel()}, test {streams['test'].numel()}")
    return vocab, streams, cross, oov


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "log.txt", "a", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    vocab, streams, cross, oov = load_streams(args, log)
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             bptt=args.bptt, clip=args.clip, max_steps_per_epoch=args.max_steps_per_epoch,
                             seed=args.seed)
    runs = []
    for i, kind in enumerate(args.models):
        torch.manual_seed(args.seed)
        if kind == "transformer":
            model = build_baseline(kind, len(vocab), hidden_size=args.hidden, num_layers=args.tf_layers,
                                   num_heads=args.tf_heads, context=args.tf_context, dropout=args.dropout)
        else:
            model = build_baseline(kind, len(vocab), hidden_size=args.hidden, num_layers=args.layers,
                                   dropout=args.dropout)
        model.to(args.device)
        model_settings = dataclasses.replace(
            settings, max_minutes=args.max_minutes[i] if args.max_minutes else None,
            batch_size=args.tf_batch_size if kind == "transformer" else args.batch_size)
        run = train_baseline(model, model.name, streams, model_settings, log)
        run.test_ppl = evaluate_ppl(model, streams["test"], settings)
        for name, ids in cross.items():
            run.cross_domain[name] = evaluate_ppl(model, ids, settings)
        run.samples = sample_prompts(model, vocab, args.prompts, args.sample_words, args.temperature, args.seed)
        log(f"{run.name}: best valid ppl {run.best_valid_ppl:.1f}, test ppl {run.test_ppl:.1f}, "
            + ", ".join(f"{k} {v:.1f}" for k, v in run.cross_domain.items()))
        runs.append(run)
        budget = f"up to {args.epochs} epochs per model" + (
            " or " + "/".join(f"{m:g}" for m in args.max_minutes) + f" min of training ({'/'.join(args.models)})"
            if args.max_minutes else "")
        settings_text = (f"Budget: {budget}; AdamW lr {args.lr:g} (halved when valid ppl stalls), batch "
                         f"{args.batch_size} (Transformer {args.tf_batch_size} blocks), BPTT {args.bptt}, clip {args.clip:g}, hidden {args.hidden}, "
                         f"RNN/LSTM {args.layers} layers, Transformer {args.tf_layers} layers x {args.tf_heads} heads, "
                         f"context {args.tf_context} (scored with stride {args.tf_context // 2}), dropout "
                         f"{args.dropout:g}, tied embeddings. 'minutes' = training + per-epoch validation.")
        machine = (f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
                   f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads "
                   f"({os.cpu_count()} cores, shared with other jobs).")
        paths = write_results(runs, oov, settings_text, machine, args.out)  # after every model: nothing lost
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    log_file.close()
    return runs


if __name__ == "__main__":
    entry_point(main)()
