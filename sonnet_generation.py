"""Sonnet generation with GPT-2 (CS224N "Build GPT-2"): fine-tune on Shakespeare, complete held-out sonnets.

Training: causal language modelling on every sonnet of `--sonnet_path` (padding masked out of the
loss).  After every epoch the dev prompts (first 3 lines of sonnets 132-143) are scored: the LM loss
on their gold sonnets, and with `--select_by chrf` (default) also the chrF of completions against the
gold sonnets, exactly as the starter (`evaluation.sonnets.chrf`).  The best epoch by `--select_by`
is kept.  Then every prompt of `--held_out_sonnet_path` is completed and written to `--sonnet_out`
in the starter's format (`--Generated Sonnets-- `, then `\\n{number}\\n{text}\\n\\n`, numbered by the
sonnet numbers of the prompt file).

Generation goes through `model.generate` (models/generation.py): top-p sampling with temperature 1.2
and p 0.9 by default; each row stops at the end of its 14th line (its continuation holds
14 - prompt lines + 1 newlines), at EOS, or after `--max_new_tokens`.

    python sonnet_generation.py --use_gpu --model_size gpt2
    python sonnet_generation.py --model_size tiny --epochs 1 --limit 8     # smoke run, CPU
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from evaluation.sonnets import chrf, read_numbered_sonnets, write_generated_sonnets
from models.generation import left_pad, newline_counts
from models.gpt2 import GPT2LMHeadModel
from training.batching import pack_sequences, pad_right
from training.build import autocast, build_model, load_tokenizer_for, seed_everything, select_device
from training.distributed import is_main
from training.cli import add_common_args, check_common_args
from training.trainer import MetricsLog, Trainer, TrainTask, default_run_dir

SONNET_LINES = 14
DECODING = ("greedy", "sample", "top-k", "top-p", "top-k-p", "beam")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sonnet_path", default="data/sonnets.txt", help="training sonnets")
    p.add_argument("--held_out_sonnet_path", default="data/sonnets_held_out.txt", help="test prompts to complete")
    p.add_argument("--sonnet_out", default="predictions/generated_sonnets.txt")
    p.add_argument("--held_out_dev_path", default="data/sonnets_held_out_dev.txt", help="dev prompts")
    p.add_argument("--gold_dev_path", default="data/TRUE_sonnets_held_out_dev.txt", help="dev gold sonnets")
    p.add_argument("--sonnet_dev_out", default="predictions/generated_sonnets_dev.txt",
                   help="completions of the dev prompts by the best epoch")
    p.add_argument("--select_by", choices=["chrf", "loss"], default="chrf",
                   help="dev metric choosing the best epoch: chrF of completions (generates every epoch) "
                        "or LM loss on the gold dev sonnets")
    p.add_argument("--pack_sequences", action="store_true",
                   help="train on the sonnets concatenated (EOS between them) and cut into --max_length blocks: "
                        "no padding, fuller batches; attention crosses sonnet boundaries as in GPT-2 pre-training")
    g = p.add_argument_group("decoding (arguments of model.generate)")
    g.add_argument("--decoding", choices=DECODING, default="top-p")
    g.add_argument("--temperature", type=float, default=1.2, help="sampling temperature (sampling modes)")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus mass (top-p, top-k-p)")
    g.add_argument("--top_k", type=int, default=None, help="tokens kept (required by top-k, top-k-p)")
    g.add_argument("--num_beams", type=int, default=None, help="beams (required by beam, >= 2)")
    g.add_argument("--max_new_tokens", type=int, default=256,
                   help="cap on new tokens per sonnet (rows stop at the end of line 14 before that)")
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--no_repeat_ngram_size", type=int, default=0)
    add_common_args(p, epochs=10, batch_size=8, lr=1e-5)
    args = p.parse_args(argv)
    check_common_args(args)
    uses_k, uses_beams = args.decoding in ("top-k", "top-k-p"), args.decoding == "beam"
    if uses_k != (args.top_k is not None):
        p.error(f"--top_k is {'required' if uses_k else 'unused'} with --decoding {args.decoding}")
    if uses_beams != (args.num_beams is not None) or (uses_beams and args.num_beams < 2):
        p.error(f"--num_beams (>= 2) is {'required' if uses_beams else 'unused'} with --decoding {args.decoding}")
    return args


def generation_kwargs(args: argparse.Namespace) -> dict:
    """`--decoding` and friends -> keyword arguments of `model.generate`."""
    kw = dict(repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    if args.decoding == "greedy":
        return {**kw, "do_sample": False}
    if args.decoding == "beam":
        return {**kw, "do_sample": False, "num_beams": args.num_beams}
    kw.update(do_sample=True, temperature=args.temperature)
    if args.decoding in ("top-k", "top-k-p"):
        kw["top_k"] = args.top_k
    if args.decoding in ("top-p", "top-k-p"):
        kw["top_p"] = args.top_p
    return kw


class SonnetWriter:
    """Completes sonnet prompts with `model.generate`, in batches, reproducibly (own seeded generator)."""

    def __init__(self, tokenizer, args: argparse.Namespace, device: torch.device):
        self.tokenizer, self.args, self.device = tokenizer, args, device
        self.newlines = newline_counts(tokenizer).to(device)
        self.kwargs = generation_kwargs(args)

    @torch.no_grad()
    def complete(self, model: GPT2LMHeadModel, prompts: list[str]) -> list[str]:
        args, tok = self.args, self.tokenizer
        generator = torch.Generator(self.device).manual_seed(args.seed)
        out = []
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            seqs = tok(chunk, add_special_tokens=False)["input_ids"]
            ids, mask = left_pad(seqs, tok.eos_token_id)
            room = model.config.max_position_embeddings - ids.shape[1]
            stops = torch.tensor([max(1, SONNET_LINES - p.count("\n")) for p in chunk], device=self.device)
            with autocast(self.device, args.precision):
                result = model.generate(ids.to(self.device), mask.to(self.device),
                                        max_new_tokens=min(args.max_new_tokens, room), eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.eos_token_id, generator=generator, stop_newlines=stops,
                                        newline_counts=self.newlines, **self.kwargs)
            for prompt, row in zip(chunk, result[:, ids.shape[1]:].tolist()):
                new = tok.decode([t for t in row if t != tok.eos_token_id])
                out.append((prompt + new).rstrip())
        return out


def lm_loss(model: GPT2LMHeadModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over real (non-pad) targets only.

    The targets are shifted (the last position gets none, -100) instead of the logits, so the
    (B, T, V) logits are never sliced into a copy, nor their gradient scattered back into zeros."""
    logits = model(input_ids, attention_mask)  # (B, T, V)
    targets = F.pad(input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100), (0, 1), value=-100)  # (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)


def encode_sonnets(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [s[:max_length] for s in ids], sum(len(s) > max_length for s in ids)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    device = select_device(args.use_gpu)
    tokenizer = load_tokenizer_for(args)
    run_dir = default_run_dir(args, "sonnet")
    limit = slice(None, args.limit)
    train = [t for _, t in read_numbered_sonnets(args.sonnet_path)][limit]
    dev_prompts = read_numbered_sonnets(args.held_out_dev_path)[limit]
    gold = dict(read_numbered_sonnets(args.gold_dev_path))
    missing = [n for n, _ in dev_prompts if n not in gold]
    if missing:
        raise SystemExit(f"{args.gold_dev_path}: no gold sonnet for dev prompt(s) {missing} of {args.held_out_dev_path}")
    dev_gold = [gold[n] for n, _ in dev_prompts]
    test_prompts = read_numbered_sonnets(args.held_out_sonnet_path)[limit]

    seed_everything(args.seed)
    model = build_model(GPT2LMHeadModel, args).to(device)
    max_length = args.max_length or model.config.max_position_embeddings
    log = MetricsLog(run_dir / "metrics.jsonl")
    train_ids, truncated = encode_sonnets(tokenizer, train, max_length)
    dev_ids, dev_truncated = encode_sonnets(tokenizer, dev_gold, max_length)
    log.write("truncation", train_truncated=truncated, dev_truncated=dev_truncated, max_length=max_length)
    if truncated or dev_truncated:
        print(f"[sonnet] {truncated} training and {dev_truncated} dev sonnets longer than {max_length} tokens; kept their start")
    pad_id = tokenizer.eos_token_id
    if args.pack_sequences:
        n_sonnets = len(train_ids)
        train_ids = pack_sequences(train_ids, tokenizer.eos_token_id, max_length)
        print(f"[sonnet] packed {n_sonnets} training sonnets into {len(train_ids)} blocks of <= {max_length} tokens")
        log.write("packing", sonnets=n_sonnets, blocks=len(train_ids), block_size=max_length)
    writer = SonnetWriter(tokenizer, args, device)

    def make_batch(indices):
        ids, mask = pad_right([train_ids[i] for i in indices], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "tokens": int(mask.sum())}

    def loss_fn(model, batch):
        return lm_loss(model, batch["input_ids"], batch["attention_mask"]), batch["tokens"]

    def evaluate(model):
        total, count = 0.0, 0
        for start in range(0, len(dev_ids), args.batch_size):
            ids, mask = pad_right(dev_ids[start:start + args.batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with autocast(device, args.precision):
                total += lm_loss(model, ids, mask, reduction="sum").item()
            count += int(mask[:, 1:].sum())
        metrics = {"loss": total / count}
        if args.select_by == "chrf":
            texts = writer.complete(model, [p for _, p in dev_prompts])
            # The texts travel with the metrics (log, checkpoint), so the best epoch's need no regeneration.
            metrics.update(chrf=chrf(texts, dev_gold), dev_sonnets=texts)
        return metrics

    task = TrainTask("sonnet", [len(s) for s in train_ids], make_batch, loss_fn, evaluate,
                     metric=args.select_by, higher_is_better=args.select_by == "chrf")
    result = Trainer(model, task, args, device, run_dir, log).fit()
    if result.interrupted:
        return None
    model.eval()
    dev_texts = result.best_metrics.get("dev_sonnets") or writer.complete(model, [p for _, p in dev_prompts])
    dev_chrf = chrf(dev_texts, dev_gold)
    if is_main():  # every rank generates the same sonnets (same seed and weights); rank 0 writes
        write_generated_sonnets(args.sonnet_dev_out, [(n, t) for (n, _), t in zip(dev_prompts, dev_texts)])
    test_texts = writer.complete(model, [p for _, p in test_prompts])
    if len(test_texts) != len(test_prompts):
        raise RuntimeError(f"{len(test_texts)} sonnets generated for {len(test_prompts)} prompts")
    if is_main():
        write_generated_sonnets(args.sonnet_out, [(n, t) for (n, _), t in zip(test_prompts, test_texts)])
    metrics = {"loss": result.best_metrics["loss"], "chrf": dev_chrf}
    log.write("final", best_epoch=result.best_epoch, dev=metrics)
    print(f"[sonnet] best epoch {result.best_epoch} (by dev {args.select_by}): dev loss {metrics['loss']:.4f}, "
          f"dev chrF {dev_chrf:.2f}; wrote {len(dev_texts)} dev sonnets to {args.sonnet_dev_out} and "
          f"{len(test_texts)} test sonnets to {args.sonnet_out}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
