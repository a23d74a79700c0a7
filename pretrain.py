"""Continued generative pretraining of GPT-2 on a domain corpus (the causal LM objective).

The corpus is one or more files: plain text (one document per file), the Poetry Foundation CSV
(its `Poem` column, one document per poem; blank poems dropped) or a `sonnets.txt`-style file (one
document per sonnet).  Documents are split into train and valid (`--valid_fraction`, whole
documents when there are several), tokenised, each followed by `<|endoftext|>`, and packed into
blocks of `--max_length` tokens (`lm.corpus.pack_blocks`; the last partial block of each split is
dropped).  Training runs on the shared trainer (`training/`: AdamW, warm-up + linear decay,
precision, accumulation, checkpoints, `--resume`, metrics.jsonl); after every epoch the valid loss
and perplexity are reported and the best epoch is kept.  The best model is saved in Hugging Face
format to `RUN_DIR/model` (with the tokenizer files), which every script loads with
`--init_checkpoint RUN_DIR/model` (or `--model_size RUN_DIR/model`) -- e.g. poetry pretraining, then sonnet fine-tuning:

    python pretrain.py --model_size gpt2 --corpus data/poetry/PoetryFoundationData.csv --run_dir runs/pretrain/poetry --use_gpu
    python sonnet_generation.py --init_checkpoint runs/pretrain/poetry/model --use_gpu

(Reference: pretraining on the Poetry Foundation poems before sonnet fine-tuning raised sonnet
chrF from 40.5 to 41.4 in the CS224N report this codebase follows.)
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.perplexity import perplexity
from lm.corpus import FORMATS, join_documents, pack_blocks, read_documents, split_documents
from models.gpt2 import GPT2LMHeadModel
from models.tokenizer import TOKENIZER_FILES, resolve_tokenizer_dir
from training.build import autocast, build_model, load_tokenizer_for, seed_everything, select_device
from training.cli import add_common_args, check_common_args
from training.trainer import MetricsLog, Trainer, TrainTask, default_run_dir

DEFAULT_BLOCK = 512


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", required=True, type=Path,
                   help="corpus files: plain text, Poetry Foundation CSV, or sonnets.txt-style")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="how to read every --corpus file (auto: *.csv = poetry_csv, sonnets* = sonnets, else text)")
    p.add_argument("--valid_fraction", type=float, default=0.1, help="share of the documents held out for valid")
    p.add_argument("--eval_batch_size", type=int, default=None, help="valid blocks per forward (default --batch_size)")
    add_common_args(p, epochs=3, batch_size=8, lr=5e-5, model_size="gpt2")
    args = p.parse_args(argv)
    check_common_args(args)
    if not 0 < args.valid_fraction < 1:
        p.error(f"--valid_fraction must be in (0, 1), got {args.valid_fraction}")
    for path in args.corpus:
        if not path.is_file():
            p.error(f"--corpus {path}: no such file")
    return args


def lm_loss_sum(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of full blocks (B, T) and the number of targets."""
    logits = model(input_ids)[:, :-1]  # (B, T-1, V)
    targets = input_ids[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"), \
        targets.numel()


def build_blocks(args, tokenizer, block_size: int) -> dict[str, torch.Tensor]:
    docs = [d for path in args.corpus for d in read_documents(path, args.format)]
    splits = dict(zip(("train", "valid"), split_documents(docs, args.valid_fraction, seed=args.seed)))
    blocks = {}
    for name, texts in splits.items():
        stream = join_documents([tokenizer.encode(t, verbose=False) for t in texts], tokenizer.eos_token_id)
        try:
            blocks[name], tail = pack_blocks(stream, block_size)
        except ValueError as exc:
            raise SystemExit(f"{name} split: {exc}") from exc
        if args.limit:
            blocks[name] = blocks[name][:args.limit]
        print(f"{name}: {len(texts)} documents, {len(stream):,} tokens -> {blocks[name].shape[0]} blocks of "
              f"{block_size} ({len(tail)} tail tokens dropped)")
    return blocks


def copy_tokenizer_files(args, model_dir: Path) -> None:
    """vocab.json + merges.txt next to the weights, so the saved directory is self-contained
    (`models.tokenizer` looks in the model directory when no tokenizer is given)."""
    source = resolve_tokenizer_dir(args.tokenizer, None if args.random_init else args.model_size)
    if Path(source).is_dir():
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(source) / name, Path(model_dir) / name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = select_device(args.use_gpu)
    run_dir = default_run_dir(args, "pretrain")
    seed_everything(args.seed)
    model = build_model(GPT2LMHeadModel, args).to(device)
    tokenizer = load_tokenizer_for(args)
    block_size = min(args.max_length or DEFAULT_BLOCK, model.config.max_position_embeddings)
    blocks = build_blocks(args, tokenizer, block_size)
    eval_bs = args.eval_batch_size or args.batch_size

    def evaluate(m) -> dict:
        total, count = 0.0, 0
        for i in range(0, blocks["valid"].shape[0], eval_bs):
            with autocast(device, args.precision):
                nll, n = lm_loss_sum(m, blocks["valid"][i:i + eval_bs].to(device))
            total, count = total + nll.item(), count + n
        return {"valid_loss": total / count, "valid_ppl": perplexity(total, count)}

    def loss_fn(m, batch) -> tuple[torch.Tensor, int]:
        nll, n = lm_loss_sum(m, batch["input_ids"])
        return nll / n, n

    task = TrainTask("pretrain", [block_size] * blocks["train"].shape[0],
                     lambda idx: {"input_ids": blocks["train"][idx]}, loss_fn, evaluate,
                     metric="valid_loss", higher_is_better=False)
    log = MetricsLog(run_dir / "metrics.jsonl")
    result = Trainer(model, task, args, device, run_dir, log).fit()

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in history if h["event"] == "epoch"]
    print("\n| epoch | train loss | train ppl | valid loss | valid ppl |\n|---:|---:|---:|---:|---:|")
    for h in epochs:
        print(f"| {h['epoch']} | {h['train_loss']:.4f} | {math.exp(h['train_loss']):.2f} | "
              f"{h['dev']['valid_loss']:.4f} | {h['dev']['valid_ppl']:.2f} |")
    if result.interrupted:
        print(f"stopped early; continue with --resume {run_dir}")
        return {"run_dir": run_dir, "interrupted": True}
    model_dir = model.save_pretrained(run_dir / "model")
    copy_tokenizer_files(args, model_dir)
    print(f"best epoch {result.best_epoch}: valid ppl {result.best_metrics['valid_ppl']:.2f}; "
          f"saved {model_dir} (start a task script from it with --init_checkpoint {model_dir})")
    return {"run_dir": run_dir, "model_dir": model_dir, "best": result.best_metrics, "epochs": epochs}


if __name__ == "__main__":
    main()
