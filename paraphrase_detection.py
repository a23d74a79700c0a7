"""Paraphrase detection on Quora as a cloze task (CS224N "Build GPT-2").

The model reads ONE prompt template (the same for train, dev and test):

    Question 1: "{sentence1}"
    Question 2: "{sentence2}"
    Are these two questions asking the same thing? Answer yes or no.
    <- the next token is read here

and the answer is its next token: "yes" (GPT-2 id 8505) or "no" (3919).  The prompt ends with a
newline, so the answer starts a line and is written without a leading space: exactly the tokens
8505 / 3919 the leaderboard uses (" yes" with a space would be another token, 3763).  Prediction is
the argmax over those two tokens' logits at the last non-pad position; the training loss is the
cross-entropy over the same two logits, so training optimises exactly the decision that is made.
(The starter used the cross-entropy over the full vocabulary; the two-way loss ignores the other
50,255 tokens, which never decide a prediction.)

The formulation (template, truncation, two-way logits) lives in `tasks/paraphrase.py`, shared with
Impossible Distillation's critic.  The template pieces and the questions are tokenized separately and concatenated, the same way for
every split.  A pair longer than `--max_length` tokens keeps the whole template and the answer slot
and truncates the questions (the longer one first, each keeping its beginning); the number of
truncated pairs is printed and logged.

    python paraphrase_detection.py --use_gpu --model_size gpt2
    python paraphrase_detection.py --model_size tiny --epochs 1 --limit 64    # smoke run, CPU
"""
from __future__ import annotations

import argparse
import sys

import torch

from distillation import synthetic
from models.gpt2 import GPT2LMHeadModel
from tasks.data import read_paraphrase, write_paraphrase_predictions
from tasks.paraphrase import LABEL_TOKENS, accuracy_f1, encode_pairs, two_way_logits
from training.batching import pad_right
from training.build import build_model, load_tokenizer_for, seed_everything, select_device
from training.distributed import is_main
from training.cli import add_common_args, check_common_args
from training.inference import batched_inference
from training.trainer import MetricsLog, Trainer, TrainTask, default_run_dir

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--para_train", default="data/quora-train.csv")
    p.add_argument("--para_dev", default="data/quora-dev.csv")
    p.add_argument("--para_test", default="data/quora-test-student.csv")
    p.add_argument("--para_dev_out", default="predictions/para-dev-output.csv")
    p.add_argument("--para_test_out", default="predictions/para-test-output.csv")
    add_common_args(p, epochs=10, batch_size=8, lr=1e-5)
    synthetic.add_synthetic_args(p)
    args = p.parse_args(argv)
    check_common_args(args)
    synthetic.check_synthetic_args(args)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    device = select_device(args.use_gpu)
    tokenizer = load_tokenizer_for(args)
    run_dir = default_run_dir(args, "paraphrase")
    splits = {}
    splits["train"], train_weights = synthetic.training_examples(args, read_paraphrase)
    for split, labeled in (("dev", True), ("test", False)):
        examples = read_paraphrase(getattr(args, f"para_{split}"), labeled=labeled)
        splits[split] = examples[: args.limit] if args.limit else examples
    seed_everything(args.seed)
    model = build_model(GPT2LMHeadModel, args).to(device)
    reference = synthetic.frozen_reference(model, args.kl_lambda)  # the initial model, for --kl_lambda
    max_length = args.max_length or model.config.max_position_embeddings
    log = MetricsLog(run_dir / "metrics.jsonl")
    seqs = {}
    for split, examples in splits.items():
        seqs[split], truncated = encode_pairs(tokenizer, [(e.sentence1, e.sentence2) for e in examples], max_length)
        if truncated:
            print(f"[para] {split}: {truncated} of {len(examples)} pairs longer than {max_length} tokens; questions truncated")
        log.write("truncation", split=split, truncated=truncated, examples=len(examples), max_length=max_length)
    pad_id = tokenizer.eos_token_id
    trainable = [i for i, e in enumerate(splits["train"]) if e.label is not None]
    if len(trainable) < len(splits["train"]):
        print(f"[para] train: {len(splits['train']) - len(trainable)} unlabeled rows not trained on")
    if not trainable:
        raise SystemExit(f"{args.para_train}: no labeled training pair")
    train_labels = torch.tensor([splits["train"][i].label for i in trainable])
    train_weights = train_weights[trainable]
    dev_scored = [i for i, e in enumerate(splits["dev"]) if e.label is not None]

    def make_batch(indices):
        ids, mask = pad_right([seqs["train"][trainable[i]] for i in indices], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": train_labels[indices], "tokens": int(mask.sum()),
                "weights": train_weights[indices]}

    def loss_fn(model, batch):
        logits = two_way_logits(model, batch["input_ids"], batch["attention_mask"])
        ref_logits = None
        if reference is not None:
            with torch.no_grad():
                ref_logits = two_way_logits(reference, batch["input_ids"], batch["attention_mask"])
        loss = synthetic.paraphrase_loss(logits, batch["labels"], batch["weights"], ref_logits, args.kl_lambda)
        return loss, batch["tokens"]

    def predict(model, split) -> list[int]:
        logits = batched_inference(seqs[split], args.batch_size, pad_id, device, args.precision,
                                   lambda ids, mask: two_way_logits(model, ids, mask))
        return logits.argmax(-1).tolist()

    def evaluate(model):
        preds = predict(model, "dev")
        return accuracy_f1([preds[i] for i in dev_scored], [splits["dev"][i].label for i in dev_scored])

    task = TrainTask("para", [len(seqs["train"][i]) for i in trainable], make_batch, loss_fn, evaluate, metric="accuracy")
    result = Trainer(model, task, args, device, run_dir, log).fit()
    if result.interrupted:
        return None
    model.eval()
    for split, out in (("dev", args.para_dev_out), ("test", args.para_test_out)):
        tokens = LABEL_TOKENS[torch.tensor(predict(model, split))].tolist()
        if is_main():  # under torchrun every rank holds all the gathered predictions; rank 0 writes
            write_paraphrase_predictions(out, [e.id for e in splits[split]], tokens, expected_rows=len(splits[split]))
            print(f"[para] wrote {len(tokens)} {split} predictions to {out}")
    dev = result.best_metrics
    print(f"[para] best epoch {result.best_epoch}: dev accuracy {dev['accuracy']:.4f}, dev F1 {dev['f1']:.4f}")
    return dev


if __name__ == "__main__":
    main(sys.argv[1:])
