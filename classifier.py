"""Sentiment classification with GPT-2 (CS224N "Build GPT-2"): SST (5 classes) and CFIMDB (2 classes).

The classifier reads the final hidden state of each text's last non-pad token, applies dropout and a
linear layer.  `--fine-tune-mode last-linear-layer` trains only that layer; `full-model` trains all.
Texts longer than `--max_length` (default: the model's context) keep their END, because the
prediction reads the last token; the number of truncated examples is printed and logged.

    python classifier.py --fine-tune-mode full-model --lr 1e-5 --use_gpu
    python classifier.py --model_size tiny --epochs 1 --limit 64        # smoke run, CPU

Writes predictions/{mode}-{sst,cfimdb}-{dev,test}-out.csv in the starter's format.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt2 import GPT2Model
from tasks.data import read_sentiment, write_sentiment_predictions
from training.batching import pad_right
from training.build import build_model, load_tokenizer_for, seed_everything, select_device
from training.cli import add_common_args, check_common_args
from training.inference import batched_inference
from training.trainer import MetricsLog, Trainer, TrainTask, default_run_dir

DATASETS = {"sst": 5, "cfimdb": 2}


class GPT2SentimentClassifier(nn.Module):
    """GPT-2 backbone -> last non-pad token's hidden state -> dropout -> linear over the classes."""

    def __init__(self, gpt: GPT2Model, num_labels: int, hidden_dropout_prob: float, fine_tune_mode: str):
        super().__init__()
        self.gpt = gpt
        self.num_labels = num_labels
        if fine_tune_mode not in ("last-linear-layer", "full-model"):
            raise ValueError(f"--fine-tune-mode must be last-linear-layer or full-model, got {fine_tune_mode!r}")
        for p in self.gpt.parameters():
            p.requires_grad = fine_tune_mode == "full-model"
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.classifier_head = nn.Linear(gpt.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = self.gpt(input_ids, attention_mask)["last_token"]  # (B, D)
        return self.classifier_head(self.dropout(last))  # (B, C)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fine-tune-mode", dest="fine_tune_mode", choices=["last-linear-layer", "full-model"],
                   default="last-linear-layer",
                   help="last-linear-layer: train the classifier head only; full-model: train everything")
    p.add_argument("--hidden_dropout_prob", type=float, default=0.3, help="dropout before the classifier head")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS),
                   help="which datasets to train and predict, in order")
    for name in DATASETS:
        for split, file in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
            p.add_argument(f"--{name}_{split}", default=f"data/ids-{name}-{file}.csv", help=f"{name.upper()} {split} file")
    p.add_argument("--predictions_dir", default="predictions",
                   help="where {mode}-{dataset}-{dev,test}-out.csv are written")
    add_common_args(p, epochs=10, batch_size=8, lr=1e-3)
    args = p.parse_args(argv)
    check_common_args(args)
    if not 0 <= args.hidden_dropout_prob < 1:
        p.error(f"--hidden_dropout_prob must be in [0, 1), got {args.hidden_dropout_prob}")
    return args


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, keeping the last `max_length` tokens; (sequences, number truncated)."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    out, truncated = [], 0
    for seq in ids:
        if len(seq) > max_length:
            seq, truncated = seq[-max_length:], truncated + 1
        out.append(seq or [tokenizer.eos_token_id])  # an empty text still has one position to read
    return out, truncated


def accuracy_f1(preds: list[int], labels: list[int], num_labels: int) -> dict:
    """Accuracy and macro F1 (the starter reports both)."""
    from sklearn.metrics import f1_score

    acc = sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)
    return {"accuracy": acc, "f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                                         zero_division=0))}


def run_dataset(name: str, args: argparse.Namespace, tokenizer, device: torch.device, run_dir: Path) -> Optional[dict]:
    num_labels = DATASETS[name]
    splits = {}
    for split, labeled in (("train", True), ("dev", True), ("test", False)):
        examples = read_sentiment(getattr(args, f"{name}_{split}"), num_labels, labeled=labeled)
        splits[split] = examples[: args.limit] if args.limit else examples
    seed_everything(args.seed)
    backbone = build_model(GPT2Model, args)
    model = GPT2SentimentClassifier(backbone, num_labels, args.hidden_dropout_prob, args.fine_tune_mode).to(device)
    max_length = args.max_length or backbone.config.max_position_embeddings
    log = MetricsLog(run_dir / name / "metrics.jsonl")
    seqs = {}
    for split, examples in splits.items():
        seqs[split], truncated = encode_texts(tokenizer, [e.text for e in examples], max_length)
        if truncated:
            print(f"[{name}] {split}: {truncated} of {len(examples)} texts longer than {max_length} tokens; kept their end")
        log.write("truncation", split=split, truncated=truncated, examples=len(examples), max_length=max_length)
    pad_id = tokenizer.eos_token_id
    train_labels = torch.tensor([e.label for e in splits["train"]])

    def make_batch(indices):
        ids, mask = pad_right([seqs["train"][i] for i in indices], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": train_labels[indices], "tokens": int(mask.sum())}

    def loss_fn(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"]), batch["tokens"]

    def predict(model, split) -> list[int]:
        logits = batched_inference(seqs[split], args.batch_size, pad_id, device, args.precision, model)
        return logits.argmax(-1).tolist()

    def evaluate(model):
        return accuracy_f1(predict(model, "dev"), [e.label for e in splits["dev"]], num_labels)

    task = TrainTask(name, [len(s) for s in seqs["train"]], make_batch, loss_fn, evaluate, metric="accuracy")
    result = Trainer(model, task, args, device, run_dir / name, log, resume_dir=run_dir).fit()
    if result.interrupted:
        return None
    model.eval()
    for split in ("dev", "test"):
        preds = predict(model, split)
        path = Path(args.predictions_dir) / f"{args.fine_tune_mode}-{name}-{split}-out.csv"
        write_sentiment_predictions(path, [e.id for e in splits[split]], preds, expected_rows=len(splits[split]))
        print(f"[{name}] wrote {len(preds)} {split} predictions to {path}")
    dev = result.best_metrics
    print(f"[{name}] best epoch {result.best_epoch}: dev accuracy {dev['accuracy']:.4f}, dev macro F1 {dev['f1']:.4f}")
    return dev


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = select_device(args.use_gpu)
    tokenizer = load_tokenizer_for(args)
    run_dir = default_run_dir(args, "classifier")
    results = {}
    for name in args.datasets:
        dev = run_dataset(name, args, tokenizer, device, run_dir)
        if dev is None:  # --stop_after_epoch
            return results
        results[name] = dev
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
