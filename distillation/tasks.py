"""The two tasks `distill.py` distils on, as the shared trainer's `TrainTask`s with `Distiller.loss`
plugged in as the task loss and the Distiller as the task's callback (its critics' state lives in the
run's checkpoint):

* `lm`: next-token prediction on a text corpus cut into blocks (`lm.corpus`); dev metric =
  perplexity by `evaluation.perplexity.sliding_window_nll`.  KL over every position's logits.
* `para`: the cloze paraphrase detector of `paraphrase_detection.py` (same prompt, same answer
  tokens, `tasks/paraphrase.py`); dev metric = accuracy.  KL over the two answer logits at the last
  real token.

Each builder returns (TrainTask, evaluate_any) where `evaluate_any(model)` scores any model (the
teacher too, for the side-by-side report) and also returns the tokens it processed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distillation.models import Distiller
from training.task import TrainTask


@dataclass
class DistillData:
    """Where the data comes from and how it is cut (the data flags of distill.py)."""
    train_file: Optional[str] = None  # lm
    valid_file: Optional[str] = None  # lm (default: split off valid_fraction)
    valid_fraction: float = 0.1
    block_size: int = 128  # lm: tokens per training block and eval window
    eval_stride: Optional[int] = None  # lm: eval window stride (default block_size)
    max_valid_tokens: Optional[int] = None
    para_train: Optional[str] = None  # para
    para_dev: Optional[str] = None
    max_length: int = 128  # para: prompt tokens
    limit: Optional[int] = None
    batch_size: int = 8
    precision: str = "fp32"
    seed: int = 0


def _timed(fn: Callable[[], dict]) -> dict:
    t0 = time.perf_counter()
    out = fn()
    out["eval_seconds"] = time.perf_counter() - t0
    out["eval_tokens_per_s"] = out["eval_tokens"] / max(out["eval_seconds"], 1e-9)
    return out


def lm_task(data: DistillData, tokenizer, distiller: Distiller, device, say=print) -> tuple[TrainTask, Callable]:
    from evaluation.perplexity import perplexity, sliding_window_nll
    from lm.corpus import join_documents, pack_blocks, read_documents, split_documents
    from models.losses import next_token_loss

    docs = read_documents(data.train_file)
    if data.valid_file:
        train_docs, valid_docs = docs, read_documents(data.valid_file)
    else:
        train_docs, valid_docs = split_documents(docs, data.valid_fraction, data.seed)
    encode = lambda ds: join_documents(tokenizer(ds, add_special_tokens=False, verbose=False)["input_ids"],  # noqa: E731
                                       tokenizer.eos_token_id)
    blocks, _ = pack_blocks(encode(train_docs), data.block_size)  # (N, T)
    valid = torch.tensor(encode(valid_docs), dtype=torch.long)
    if data.limit:
        blocks, valid = blocks[: data.limit], valid[: data.limit * data.block_size + 1]
    if data.max_valid_tokens:
        valid = valid[: data.max_valid_tokens]
    say(f"[distill] lm: {blocks.size(0)} training blocks of {data.block_size} tokens, {valid.numel()} valid tokens")

    def logits_fn(model, final, batch):
        return model.backbone.hidden_state_to_token(final), None  # (B, T, V), every position

    def hard_loss(logits, batch):
        return next_token_loss(logits, batch["input_ids"])

    def make_batch(indices):
        ids = blocks[indices]
        return {"input_ids": ids, "tokens": ids.numel()}

    def loss(model, batch):
        total, parts = distiller.loss(model, batch, logits_fn, hard_loss)
        return total, batch["tokens"], parts

    def evaluate_any(model) -> dict:
        def run():
            nll, n = sliding_window_nll(model, valid, data.block_size, data.eval_stride or data.block_size,
                                        data.batch_size)
            return {"perplexity": perplexity(nll, n), "nll": nll / n, "eval_tokens": n}
        return _timed(run)

    task = TrainTask("distill-lm", [data.block_size] * blocks.size(0), make_batch, loss,
                     lambda model: evaluate_any(model.student), metric="perplexity", higher_is_better=False,
                     callbacks=[distiller])
    return task, evaluate_any


def para_task(data: DistillData, tokenizer, distiller: Distiller, device, say=print) -> tuple[TrainTask, Callable]:
    import torch.nn.functional as F

    from evaluation.metrics import accuracy_binary_f1
    from models.gpt2 import last_token_index
    from tasks.data import read_paraphrase
    from tasks.paraphrase import answer_logits, encode_pairs, two_way_logits
    from training.batching import pad_right
    from training.inference import batched_inference

    train = [e for e in read_paraphrase(data.para_train) if e.label is not None]
    dev = [e for e in read_paraphrase(data.para_dev) if e.label is not None]
    if data.limit:
        train, dev = train[: data.limit], dev[: data.limit]
    train_seqs, _ = encode_pairs(tokenizer, [(e.sentence1, e.sentence2) for e in train], data.max_length)
    dev_seqs, _ = encode_pairs(tokenizer, [(e.sentence1, e.sentence2) for e in dev], data.max_length)
    labels = torch.tensor([e.label for e in train])
    pad = tokenizer.eos_token_id
    say(f"[distill] para: {len(train)} training pairs, {len(dev)} dev pairs")

    def logits_fn(model, final, batch):
        mask = batch["attention_mask"]
        B, T, _ = final.shape
        last = final[torch.arange(B, device=final.device), last_token_index(mask, B, T, final.device)]  # (B, D)
        return answer_logits(last, model.backbone.word_embedding.weight), None  # (B, 2)

    def hard_loss(logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"])

    def make_batch(indices):
        ids, mask = pad_right([train_seqs[i] for i in indices], pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[indices], "tokens": int(mask.sum())}

    def loss(model, batch):
        total, parts = distiller.loss(model, batch, logits_fn, hard_loss)
        return total, batch["tokens"], parts

    def evaluate_any(model) -> dict:
        def run():
            logits = batched_inference(dev_seqs, data.batch_size, pad, device, data.precision,
                                       lambda ids, mask: two_way_logits(model, ids, mask))
            out = accuracy_binary_f1(logits.argmax(-1).tolist(), [e.label for e in dev])
            out["eval_tokens"] = sum(len(s) for s in dev_seqs)
            return out
        return _timed(run)

    task = TrainTask("distill-para", [len(s) for s in train_seqs], make_batch, loss,
                     lambda model: evaluate_any(model.student), metric="accuracy", callbacks=[distiller])
    return task, evaluate_any
