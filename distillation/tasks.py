"""The two tasks `distill.py` distils on, as the shared trainer's `TrainTask`s with `Distiller.loss`
plugged in as the task loss:

* `lm`: next-token prediction on a text corpus cut into blocks (`lm.corpus`); dev metric =
  perplexity by `evaluation.perplexity.sliding_window_nll`.  KL over every position's logits.
* `para`: the cloze paraphrase detector of `paraphrase_detection.py` (same prompt, same answer
  tokens); dev metric = accuracy.  KL over the two answer logits at the last real token.

Each builder returns (TrainTask, evaluate_any) where `evaluate_any(model)` scores any model (the
teacher too, for the side-by-side report) and also returns the tokens it processed.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from distillation.models import Distiller
from training.trainer import TrainTask


def _timed(fn: Callable[[], dict]) -> dict:
    t0 = time.perf_counter()
    out = fn()
    out["eval_seconds"] = time.perf_counter() - t0
    out["eval_tokens_per_s"] = out["eval_tokens"] / max(out["eval_seconds"], 1e-9)
    return out


def lm_task(args: argparse.Namespace, tokenizer, distiller: Distiller, device) -> tuple[TrainTask, Callable]:
    from evaluation.perplexity import perplexity, sliding_window_nll
    from lm.corpus import join_documents, pack_blocks, read_documents, split_documents

    docs = read_documents(args.train_file)
    if args.valid_file:
        train_docs, valid_docs = docs, read_documents(args.valid_file)
    else:
        train_docs, valid_docs = split_documents(docs, args.valid_fraction, args.seed)
    encode = lambda ds: join_documents(tokenizer(ds, add_special_tokens=False, verbose=False)["input_ids"],
                                       tokenizer.eos_token_id)
    blocks, _ = pack_blocks(encode(train_docs), args.block_size)  # (N, T)
    valid = torch.tensor(encode(valid_docs), dtype=torch.long)
    if args.limit:
        blocks, valid = blocks[: args.limit], valid[: args.limit * args.block_size + 1]
    if args.max_valid_tokens:
        valid = valid[: args.max_valid_tokens]
    print(f"[distill] lm: {blocks.size(0)} training blocks of {args.block_size} tokens, {valid.numel()} valid tokens")

    def logits_fn(model, final, batch):
        return model.backbone.hidden_state_to_token(final), None  # (B, T, V), every position

    def hard_loss(logits, batch):
        ids = batch["input_ids"]
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    def make_batch(indices):
        ids = blocks[indices]
        return {"input_ids": ids, "tokens": ids.numel()}

    def loss(model, batch):
        total, _ = distiller.loss(model, batch, logits_fn, hard_loss)
        return total, batch["tokens"]

    def evaluate_any(model) -> dict:
        def run():
            nll, n = sliding_window_nll(model, valid, args.block_size, args.eval_stride or args.block_size,
                                        args.batch_size)
            return {"perplexity": perplexity(nll, n), "nll": nll / n, "eval_tokens": n}
        return _timed(run)

    def evaluate(model):
        out = evaluate_any(model.student)
        out.update({f"last_batch_{k}": v for k, v in distiller.last.items()})
        return out

    task = TrainTask("distill-lm", [args.block_size] * blocks.size(0), make_batch, loss, evaluate,
                     metric="perplexity", higher_is_better=False)
    return task, evaluate_any


def para_task(args: argparse.Namespace, tokenizer, distiller: Distiller, device) -> tuple[TrainTask, Callable]:
    from models.gpt2 import last_token_index
    from tasks.paraphrase import LABEL_TOKENS, accuracy_f1, encode_pairs, two_way_logits
    from tasks.data import read_paraphrase
    from training.batching import pad_right
    from training.inference import batched_inference

    train = [e for e in read_paraphrase(args.para_train) if e.label is not None]
    dev = [e for e in read_paraphrase(args.para_dev) if e.label is not None]
    if args.limit:
        train, dev = train[: args.limit], dev[: args.limit]
    max_length = args.max_length or 128
    train_seqs, _ = encode_pairs(tokenizer, [(e.sentence1, e.sentence2) for e in train], max_length)
    dev_seqs, _ = encode_pairs(tokenizer, [(e.sentence1, e.sentence2) for e in dev], max_length)
    labels = torch.tensor([e.label for e in train])
    pad = tokenizer.eos_token_id
    print(f"[distill] para: {len(train)} training pairs, {len(dev)} dev pairs")

    def logits_fn(model, final, batch):
        mask = batch["attention_mask"]
        B, T, _ = final.shape
        last = final[torch.arange(B, device=final.device), last_token_index(mask, B, T, final.device)]  # (B, D)
        return F.linear(last, model.backbone.word_embedding.weight[LABEL_TOKENS.to(last.device)]), None  # (B, 2)

    def hard_loss(logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"])

    def make_batch(indices):
        ids, mask = pad_right([train_seqs[i] for i in indices], pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[indices], "tokens": int(mask.sum())}

    def loss(model, batch):
        total, _ = distiller.loss(model, batch, logits_fn, hard_loss)
        return total, batch["tokens"]

    def evaluate_any(model) -> dict:
        def run():
            logits = batched_inference(dev_seqs, args.batch_size, pad, device, args.precision,
                                       lambda ids, mask: two_way_logits(model, ids, mask))
            out = accuracy_f1(logits.argmax(-1).tolist(), [e.label for e in dev])
            out["eval_tokens"] = sum(len(s) for s in dev_seqs)
            return out
        return _timed(run)

    def evaluate(model):
        out = evaluate_any(model.student)
        out.update({f"last_batch_{k}": v for k, v in distiller.last.items()})
        return out

    task = TrainTask("distill-para", [len(s) for s in train_seqs], make_batch, loss, evaluate, metric="accuracy")
    return task, evaluate_any
