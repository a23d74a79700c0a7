"""Sentiment classification with GPT-2 (CS224N "Build GPT-2"): SST (5 classes) and CFIMDB (2 classes).

The classifier (tasks/sentiment.py) reads the final hidden state of each text's last non-pad token,
applies dropout and a linear layer.  `--fine-tune-mode last-linear-layer` trains only that layer (the
shared freezing mechanism's all-but-head mode); `full-model` trains all.  Texts longer than
`--max_length` (default: the model's context) keep their END, because the prediction reads the last
token; the number of truncated examples is printed and logged.

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

from evaluation.metrics import accuracy_macro_f1
from models.gpt2 import GPT2Model
from objectives.smart import smart_objective
from tasks.data import read_sentiment, write_sentiment_predictions
from tasks.leaderboard import PREDICTIONS_DIR, sentiment_file
from tasks.run_outputs import write_class_outputs
from tasks.sentiment import DATASETS, FINE_TUNE_MODES, GPT2SentimentClassifier, encode_texts
from training.batching import pad_right
from training.cli import UsageError, add_common_args, add_smart_args, check_file_flags, entry_point, smart_config
from training.distributed import is_main
from training.inference import batched_inference
from training.runner import ScriptRun
from training.task import TrainTask

OUTPUT_FLAGS = {"predictions_dir"}  # may change on --resume


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fine-tune-mode", dest="fine_tune_mode", choices=FINE_TUNE_MODES, default="last-linear-layer",
                   help="last-linear-layer: train the classifier head only; full-model: train everything")
    p.add_argument("--hidden_dropout_prob", type=float, default=0.3, help="dropout before the classifier head")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS),
                   help="which datasets to train and predict, in order")
    for name in DATASETS:
        for split, file in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
            p.add_argument(f"--{name}_{split}", default=f"data/ids-{name}-{file}.csv", help=f"{name.upper()} {split} file")
    p.add_argument("--predictions_dir", default=PREDICTIONS_DIR,
                   help="where {mode}-{dataset}-{dev,test}-out.csv are written")
    add_smart_args(p)
    add_common_args(p, epochs=10, batch_size=8, lr=1e-3)
    args = p.parse_args(argv)
    if args.fine_tune_mode == "last-linear-layer":
        if args.peft != "none" or args.freeze != "none":
            raise UsageError("--fine-tune-mode last-linear-layer (the default) already freezes all but the classifier "
                             "head; with --peft or --freeze pass --fine-tune-mode full-model")
        args.freeze = "all-but-head"  # the starter's mode is the shared freezing mechanism's
    if not 0 <= args.hidden_dropout_prob < 1:
        raise UsageError(f"--hidden_dropout_prob must be in [0, 1), got {args.hidden_dropout_prob}")
    return args


def file_flags(args: argparse.Namespace) -> tuple[dict, dict]:
    """(inputs, outputs) of the selected datasets, for `check_file_flags`."""
    inputs = {f"--{name}_{split}": getattr(args, f"{name}_{split}") for name in args.datasets
              for split in ("train", "dev", "test")}
    outputs = {f"--predictions_dir ({name} {split})": Path(args.predictions_dir) /
               sentiment_file(args.fine_tune_mode, name, split) for name in args.datasets for split in ("dev", "test")}
    return inputs, outputs


def read_splits(name: str, run: ScriptRun, args: argparse.Namespace) -> dict:
    return {split: run.limit(read_sentiment(getattr(args, f"{name}_{split}"), DATASETS[name], labeled=split != "test"))
            for split in ("train", "dev", "test")}


def run_dataset(name: str, run: ScriptRun, args: argparse.Namespace, splits: dict) -> Optional[dict]:
    num_labels = DATASETS[name]
    backbone = run.build(GPT2Model)
    model = GPT2SentimentClassifier(backbone, num_labels, args.hidden_dropout_prob).to(run.device)
    max_length, tokenizer, precision = run.max_length(backbone), run.tokenizer, run.cfg.train.precision
    seqs, truncation = {}, {}
    for split, examples in splits.items():
        seqs[split], truncated = encode_texts(tokenizer, [e.text for e in examples], max_length)
        truncation[split] = truncated
        if truncated:
            run.say(f"[{name}] {split}: {truncated} of {len(examples)} texts longer than {max_length} tokens; kept their end")
    pad_id = tokenizer.eos_token_id
    train_labels = torch.tensor([e.label for e in splits["train"]])

    def make_batch(indices):
        ids, mask = pad_right([seqs["train"][i] for i in indices], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": train_labels[indices], "tokens": int(mask.sum())}

    smart = smart_objective(smart_config(args), lambda m, b: m(b["input_ids"], b["attention_mask"]))

    def loss_fn(model, batch):
        if smart is not None:  # --smart_lambda / --bregman_mu: SMART's terms on the same clean logits
            logits, penalty, logs = smart.forward(model, batch)
            return F.cross_entropy(logits.float(), batch["labels"]) + penalty, batch["tokens"], logs
        logits = model(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"]), batch["tokens"]

    def class_logits(model, split) -> torch.Tensor:
        return batched_inference(seqs[split], run.cfg.train.batch_size, pad_id, run.device, precision, model)

    def predict(model, split) -> list[int]:
        return class_logits(model, split).argmax(-1).tolist()

    def evaluate(model):
        return accuracy_macro_f1(predict(model, "dev"), [e.label for e in splits["dev"]], num_labels)

    task = TrainTask(name, [len(s) for s in seqs["train"]], make_batch, loss_fn, evaluate, metric="accuracy",
                     callbacks=[smart] if smart else [])
    trainer = run.trainer(model, task, sub=name)
    trainer.log.write("truncation", truncated=truncation, max_length=max_length)
    result = run.fit(model, task, sub=name, trainer=trainer)  # + --export_hf DIR/{name}
    if result.interrupted:
        return None
    model.eval()
    for split in ("dev", "test"):
        logits = class_logits(model, split)
        preds = logits.argmax(-1).tolist()
        path = Path(args.predictions_dir) / sentiment_file(args.fine_tune_mode, name, split)
        if is_main():  # under torchrun every rank holds all the gathered predictions; rank 0 writes
            write_sentiment_predictions(path, [e.id for e in splits[split]], preds, expected_rows=len(splits[split]))
            run.say(f"[{name}] wrote {len(preds)} {split} predictions to {path}")
            write_class_outputs(run.run_dir, name, split, path.name, [e.id for e in splits[split]],
                                logits.softmax(-1), [e.label for e in splits[split]])  # for ensemble.py
    dev = result.best_metrics
    run.say(f"[{name}] best epoch {result.best_epoch}: dev accuracy {dev['accuracy']:.4f}, dev macro F1 {dev['f1']:.4f}")
    return dev


def main(argv=None) -> dict:
    args = parse_args(argv)
    smart_config(args)  # checked before any work
    check_file_flags(*file_flags(args))
    run = ScriptRun.start("classifier", args, resume_free=OUTPUT_FLAGS,
                          data=[f"{name}_{split}" for name in args.datasets for split in ("train", "dev")])
    data = {name: read_splits(name, run, args) for name in args.datasets}  # every file read before training
    results = {}
    for name in args.datasets:
        dev = run_dataset(name, run, args, data[name])
        if dev is None:  # --stop_after_epoch
            return results
        results[name] = dev
    return results


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
