"""Sonnet generation with GPT-2 (CS224N "Build GPT-2"): fine-tune on Shakespeare, complete held-out sonnets.

Training: causal language modelling on every sonnet of `--sonnet_path` (padding masked out of the
loss).  After every epoch the dev prompts (first 3 lines of sonnets 132-143) are scored: the LM loss
on their gold sonnets, and with `--select_by chrf` (default) also the chrF of completions against the
gold sonnets, exactly as the starter (`evaluation.sonnets.chrf`).  The best epoch by `--select_by`
is kept.  Then every prompt of `--held_out_sonnet_path` is completed and written to `--sonnet_out`
in the starter's format (tasks/sonnets.py).

Generation goes through `model.generate` (models/generation.py, via tasks/completion.py): top-p
sampling with temperature 1.2 and p 0.9 by default; each row stops at the end of its 14th line, at
EOS, or after `--max_new_tokens`.  `--num_beams` with a sampling decoding is beam sampling,
`--assistant_model PATH` speculative decoding (acceptance rate reported), `--compile_generation` a
compiled decode step (training/cli.py add_decoding_args).  Every decoding flag is checked at start-up, and may change on
`--resume` when the best epoch is chosen by loss (with `--select_by chrf` it decides the best epoch).

    python sonnet_generation.py --use_gpu --model_size gpt2
    python sonnet_generation.py --model_size tiny --epochs 1 --limit 8     # smoke run, CPU
"""
from __future__ import annotations

import argparse
import sys


from common.errors import DataError
from evaluation.sonnets import chrf
from experiments.textgen import generation_kwargs
from lm.corpus import join_documents, pack_blocks
from models.gpt2 import GPT2LMHeadModel
from models.losses import next_token_loss
from modules import inference_weights
from tasks.completion import SonnetWriter
from tasks.leaderboard import SONNET_DEV_FILE, SONNET_TEST_FILE, default_path
from tasks.run_outputs import write_text_outputs
from tasks.sonnets import read_numbered_sonnets, sonnets_by_number, write_generated_sonnets
from training.batching import pad_right
from training.build import autocast
from training.cli import (DECODING_FLAGS, UsageError, add_common_args, add_decoding_args, check_file_flags, entry_point,
                          generation_config)
from training.distributed import is_main
from training.runner import ScriptRun
from training.task import Evaluation, TrainTask

OUTPUT_FLAGS = {"sonnet_out", "sonnet_dev_out", "held_out_sonnet_path"}  # may change on --resume
DATA_FLAGS = ("sonnet_path", "held_out_dev_path", "gold_dev_path")  # fingerprinted: must not change on --resume
INPUT_FLAGS = (*DATA_FLAGS, "held_out_sonnet_path")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sonnet_path", default="data/sonnets.txt", help="training sonnets")
    p.add_argument("--held_out_sonnet_path", default="data/sonnets_held_out.txt", help="test prompts to complete")
    p.add_argument("--sonnet_out", default=default_path(SONNET_TEST_FILE))
    p.add_argument("--held_out_dev_path", default="data/sonnets_held_out_dev.txt", help="dev prompts")
    p.add_argument("--gold_dev_path", default="data/TRUE_sonnets_held_out_dev.txt", help="dev gold sonnets")
    p.add_argument("--sonnet_dev_out", default=default_path(SONNET_DEV_FILE),
                   help="completions of the dev prompts by the best epoch")
    p.add_argument("--select_by", choices=["chrf", "loss"], default="chrf",
                   help="dev metric choosing the best epoch: chrF of completions (generates every epoch) "
                        "or LM loss on the gold dev sonnets")
    p.add_argument("--pack_sequences", action="store_true",
                   help="train on the sonnets concatenated (EOS between them) and cut into --max_length blocks: "
                        "no padding, fuller batches; attention crosses sonnet boundaries as in GPT-2 pre-training")
    add_decoding_args(p, max_new_tokens=256)
    add_common_args(p, epochs=10, batch_size=8, lr=1e-5)
    args = p.parse_args(argv)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    gen_cfg = generation_config(args)  # every decoding flag checked before any work
    check_file_flags({f"--{k}": getattr(args, k) for k in INPUT_FLAGS}, {f"--{k}": getattr(args, k) for k in
                                                                         ("sonnet_out", "sonnet_dev_out")})
    free = OUTPUT_FLAGS | (DECODING_FLAGS if args.select_by == "loss" else set())
    run = ScriptRun.start("sonnet", args, resume_free=free, data=DATA_FLAGS)
    train = [t for _, t in run.limit(read_numbered_sonnets(args.sonnet_path))]
    dev_prompts = run.limit(read_numbered_sonnets(args.held_out_dev_path))
    gold = sonnets_by_number(read_numbered_sonnets(args.gold_dev_path), args.gold_dev_path)
    missing = [n for n, _ in dev_prompts if n not in gold]
    if missing:
        raise DataError(f"{args.gold_dev_path}: no gold sonnet for dev prompt(s) {missing} of {args.held_out_dev_path}")
    dev_gold = [gold[n] for n, _ in dev_prompts]
    test_prompts = run.limit(read_numbered_sonnets(args.held_out_sonnet_path))

    model = run.build(GPT2LMHeadModel)
    max_length, tokenizer, device = run.max_length(model), run.tokenizer, run.device
    batch_size, precision = run.cfg.train.batch_size, run.cfg.train.precision
    decoding = generation_kwargs(gen_cfg, model, tokenizer, device)  # loads --assistant_model's draft
    writer = SonnetWriter(tokenizer, device, batch_size=batch_size, max_new_tokens=gen_cfg.max_new_tokens,
                          seed=run.cfg.train.seed, precision=precision, generate_kwargs=decoding, report=run.say)
    if writer.prompt_budget(model.config.max_position_embeddings) < 1:
        raise UsageError(f"--max_new_tokens {gen_cfg.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{model.config.max_position_embeddings} positions")
    writer.encode([p for _, p in dev_prompts + test_prompts], model.config.max_position_embeddings)  # reports long ones
    encode = lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    train_ids, dev_ids = encode(train), encode(dev_gold)
    truncated = {"train": sum(len(s) > max_length for s in train_ids), "dev": sum(len(s) > max_length for s in dev_ids)}
    train_ids, dev_ids = [s[:max_length] for s in train_ids], [s[:max_length] for s in dev_ids]
    run.log.write("truncation", truncated=truncated, max_length=max_length)
    if truncated["train"] or truncated["dev"]:
        run.say(f"[sonnet] {truncated['train']} training and {truncated['dev']} dev sonnets longer than {max_length} "
                f"tokens; kept their start")
    pad_id = tokenizer.eos_token_id
    if args.pack_sequences:
        n_sonnets = len(train_ids)
        blocks, tail = pack_blocks(join_documents(train_ids, tokenizer.eos_token_id), max_length, allow_empty=True)
        train_ids = blocks.tolist() + ([tail] if len(tail) >= 2 else [])  # the short last block trains too
        run.say(f"[sonnet] packed {n_sonnets} training sonnets into {len(train_ids)} blocks of <= {max_length} tokens")
        run.log.write("packing", sonnets=n_sonnets, blocks=len(train_ids), block_size=max_length)

    def make_batch(indices):
        ids, mask = pad_right([train_ids[i] for i in indices], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "tokens": int(mask.sum())}

    def loss_fn(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])
        return next_token_loss(logits, batch["input_ids"], batch["attention_mask"]), batch["tokens"]

    def evaluate(model):
        total, count = 0.0, 0
        for start in range(0, len(dev_ids), batch_size):
            ids, mask = pad_right(dev_ids[start:start + batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with autocast(device, precision):
                total += next_token_loss(model(ids, mask), ids, mask, reduction="sum").item()
            count += int(mask[:, 1:].sum())
        metrics = {"loss": total / count}
        if args.select_by == "chrf":
            texts = writer.complete(model, [p for _, p in dev_prompts])
            inference_weights.clear(model.parameters())  # stale after the next step: not held until then
            metrics["chrf"] = chrf(texts, dev_gold)
            return Evaluation(metrics, {"dev_sonnets": texts})  # the best epoch's need no regeneration
        return metrics

    task = TrainTask("sonnet", [len(s) for s in train_ids], make_batch, loss_fn, evaluate,
                     metric=args.select_by, higher_is_better=args.select_by == "chrf")
    result = run.fit(model, task)
    if result.interrupted:
        return None
    model.eval()
    dev_texts = result.best_outputs.get("dev_sonnets")  # chrF selection kept the best epoch's completions
    if dev_texts is None:
        dev_texts = writer.complete(model, [p for _, p in dev_prompts])
    dev_chrf = chrf(dev_texts, dev_gold)
    test_texts = writer.complete(model, [p for _, p in test_prompts])
    if is_main():  # every rank generates the same sonnets (same seed and weights); rank 0 writes
        # numbered 0, 1, ... in prompt order, as the starter writes them (not by sonnet number)
        write_generated_sonnets(args.sonnet_dev_out, dev_texts)
        write_generated_sonnets(args.sonnet_out, test_texts)
        # for ensemble.py: the prompts' sonnet numbers identify them (in the same prompt order)
        write_text_outputs(run.run_dir, "sonnet", "dev", SONNET_DEV_FILE, [n for n, _ in dev_prompts], dev_texts,
                           dev_gold)
        write_text_outputs(run.run_dir, "sonnet", "test", SONNET_TEST_FILE, [n for n, _ in test_prompts], test_texts)
    metrics = {"loss": result.best_metrics["loss"], "chrf": dev_chrf}
    run.log.write("final", best_epoch=result.best_epoch, dev=metrics)
    run.say(f"[sonnet] best epoch {result.best_epoch} (by dev {args.select_by}): dev loss {metrics['loss']:.4f}, "
            f"dev chrF {dev_chrf:.2f}; wrote {len(dev_texts)} dev sonnets to {args.sonnet_dev_out} and "
            f"{len(test_texts)} test sonnets to {args.sonnet_out}")
    return metrics


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
