"""Continued generative pretraining of GPT-2 on a domain corpus (the causal LM objective).

The corpus is one or more files: plain text (one document per file), the Poetry Foundation CSV
(its `Poem` column, one document per poem; blank poems dropped) or a `sonnets.txt`-style file (one
document per sonnet).  Documents are split into train and valid (`--valid_fraction`, whole
documents when there are several), tokenised, each followed by `<|endoftext|>`, and packed into
blocks of `--max_length` tokens (`lm.corpus.pack_blocks`; the last partial block of each split is
dropped).  Training runs on the shared trainer (`training/`: AdamW, warm-up + linear decay,
precision, accumulation, checkpoints, `--resume`, metrics.jsonl); after every epoch the valid loss
and perplexity are reported and the best epoch is kept.  The best model is saved in Hugging Face
format to `RUN_DIR/model` (with the tokenizer files; with `--qat int8|int4` also the quantized model
to `RUN_DIR/model-int8|int4`), which every script loads with
`--init_checkpoint RUN_DIR/model` (or `--model_size RUN_DIR/model`) -- e.g. poetry pretraining, then sonnet fine-tuning:

    python pretrain.py --model_size gpt2 --corpus data/poetry/PoetryFoundationData.csv --run_dir runs/pretrain/poetry --use_gpu
    python sonnet_generation.py --init_checkpoint runs/pretrain/poetry/model --use_gpu

(Reference: pretraining on the Poetry Foundation poems before sonnet fine-tuning raised sonnet
chrF from 40.5 to 41.4 in the CS224N report this codebase follows.)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from common.errors import ConfigError
from evaluation.perplexity import perplexity
from lm.corpus import FORMATS, join_documents, pack_blocks, read_documents, split_documents
from models.gpt2 import GPT2LMHeadModel
from models.losses import block_loss_sum
from training.build import autocast
from training.cli import UsageError, add_common_args, entry_point
from training.runner import ScriptRun
from training.task import TrainTask

DEFAULT_BLOCK = 512
FIELD_FLAGS = {"block_size": "--max_length"}  # the library's block size is this script's --max_length


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
    if not 0 < args.valid_fraction < 1:
        raise UsageError(f"--valid_fraction must be in (0, 1), got {args.valid_fraction}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UsageError(f"--eval_batch_size must be >= 1, got {args.eval_batch_size}")
    for path in args.corpus:
        if not path.is_file():
            raise UsageError(f"--corpus {path}: no such file")
    if args.qat != "none" and args.peft == "lora":
        raise UsageError(f"--qat {args.qat} with --peft lora: the quantized model pretrain.py writes would round "
                         f"W + BA, which training never saw (it trained fake-quantized W plus a float BA); train "
                         f"with --qat alone, or with --peft lora and then run quantize.py on RUN_DIR/model")
    return args


def build_blocks(args, run: ScriptRun, block_size: int) -> dict[str, torch.Tensor]:
    tokenizer = run.tokenizer
    docs = [d for path in args.corpus for d in read_documents(path, args.format)]
    splits = dict(zip(("train", "valid"), split_documents(docs, args.valid_fraction, seed=run.cfg.train.seed)))
    blocks = {}
    for name, texts in splits.items():
        stream = join_documents([tokenizer.encode(t, verbose=False) for t in texts], tokenizer.eos_token_id)
        try:
            blocks[name], tail = pack_blocks(stream, block_size)
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{name} split: {exc.detail}") from None
        blocks[name] = blocks[name][: run.cfg.train.limit] if run.cfg.train.limit else blocks[name]
        run.say(f"{name}: {len(texts)} documents, {len(stream):,} tokens -> {blocks[name].shape[0]} blocks of "
                f"{block_size} ({len(tail)} tail tokens dropped)")
    return blocks


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = ScriptRun.start("pretrain", args, data=("corpus",))
    model = run.build(GPT2LMHeadModel)
    block_size = min(run.cfg.model.max_length or DEFAULT_BLOCK, model.config.max_position_embeddings)
    blocks = build_blocks(args, run, block_size)
    eval_bs, device, precision = args.eval_batch_size or run.cfg.train.batch_size, run.device, run.cfg.train.precision

    def evaluate(m) -> dict:
        total, count = 0.0, 0
        for i in range(0, blocks["valid"].shape[0], eval_bs):
            with autocast(device, precision):
                nll, n = block_loss_sum(m, blocks["valid"][i:i + eval_bs].to(device))
            total, count = total + nll.item(), count + n
        return {"valid_loss": total / count, "valid_ppl": perplexity(total, count)}

    def loss_fn(m, batch) -> tuple[torch.Tensor, int]:
        nll, n = block_loss_sum(m, batch["input_ids"])
        return nll / n, n

    task = TrainTask("pretrain", [block_size] * blocks["train"].shape[0],
                     lambda idx: {"input_ids": blocks["train"][idx]}, loss_fn, evaluate,
                     metric="valid_loss", higher_is_better=False)
    result = run.fit(model, task)
    if result.interrupted:
        print_epochs(run)
        run.say(f"stopped early; continue with --resume {run.run_dir}")
        return {"run_dir": run.run_dir, "interrupted": True}
    import copy

    from training.efficient import lora_settings, merge_lora

    lora = lora_settings(model) is not None  # a complete model: the adapters merged, on a copy
    model_dir = (merge_lora(copy.deepcopy(model)) if lora else model).save_pretrained(
        run.run_dir / "model", tokenizer=run.tokenizer)  # before anything else can fail
    if lora:
        run.say(f"LoRA adapters merged into {model_dir}; the adapters alone are in {run.run_dir / 'best.pt'}")
    if run.cfg.efficiency.peft == "reft":  # the base is frozen: the trained part lives in best.pt only
        run.say(f"{model_dir} is the frozen base; the trained interventions are in {run.run_dir / 'best.pt'}: "
                f"use both, e.g. generate.py --model_size {model_dir} --checkpoint {run.run_dir}")
    out = {"run_dir": run.run_dir, "model_dir": model_dir, "best": result.best_metrics}
    if run.cfg.efficiency.qat != "none":  # the deployable model: the very weights training computed with
        from models.quant.qat import convert_qat

        out["quantized_dir"] = convert_qat(copy.deepcopy(model)).save_pretrained(
            run.run_dir / f"model-{run.cfg.efficiency.qat}", tokenizer=run.tokenizer)
        run.say(f"saved the quantized model (--qat {run.cfg.efficiency.qat}) to {out['quantized_dir']}: "
                f"load it with --model_size {out['quantized_dir']}")
    out["epochs"] = print_epochs(run)
    run.say(f"best epoch {result.best_epoch}: valid ppl {result.best_metrics['valid_ppl']:.2f}; "
            f"saved {model_dir} (start a task script from it with --init_checkpoint {model_dir})")
    return out


def print_epochs(run: ScriptRun) -> list[dict]:
    """The per-epoch table from the run's metrics log (a torn last line of the log is skipped)."""
    epochs = run.log.records("epoch")
    run.say("\n| epoch | train loss | train ppl | valid loss | valid ppl |\n|---:|---:|---:|---:|---:|")
    for h in epochs:
        run.say(f"| {h['epoch']} | {h['train_loss']:.4f} | {math.exp(min(h['train_loss'], 700)):.2f} | "
                f"{h['dev']['valid_loss']:.4f} | {h['dev']['valid_ppl']:.2f} |")
    return epochs


if __name__ == "__main__":
    entry_point(main, FIELD_FLAGS)(sys.argv[1:])
