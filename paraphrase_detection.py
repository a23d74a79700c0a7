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

The template pieces and the questions are tokenized separately and concatenated, the same way for
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
import torch.nn.functional as F

from distillation import synthetic
from models.gpt2 import GPT2LMHeadModel
from tasks.data import NO_TOKEN_ID, YES_TOKEN_ID, read_paraphrase, write_paraphrase_predictions
from training.batching import pad_right
from training.build import build_model, load_tokenizer_for, seed_everything, select_device
from training.distributed import is_main
from training.cli import add_common_args, check_common_args
from training.inference import batched_inference
from training.trainer import MetricsLog, Trainer, TrainTask, default_run_dir

PROMPT = ('Question 1: "', '"\nQuestion 2: "', '"\nAre these two questions asking the same thing? Answer yes or no.\n')
LABEL_TOKENS = torch.tensor([NO_TOKEN_ID, YES_TOKEN_ID])  # class 0 = "no", class 1 = "yes"


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


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> tuple[list[list[int]], int]:
    """Prompt token ids of each pair, truncated to `max_length` as the module docstring says."""
    pre, mid, suf = (tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in PROMPT)
    budget = max_length - len(pre) - len(mid) - len(suf)
    if budget < 2:
        raise SystemExit(f"--max_length {max_length} leaves no room for the questions "
                         f"(the template alone takes {max_length - budget} tokens)")
    firsts = tokenizer([a for a, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    seconds = tokenizer([b for _, b in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    out, truncated = [], 0
    for a, b in zip(firsts, seconds):
        if len(a) + len(b) > budget:
            truncated += 1
            half = budget // 2
            if len(a) <= half:
                b = b[: budget - len(a)]
            elif len(b) <= budget - half:
                a = a[: budget - len(b)]
            else:
                a, b = a[:half], b[: budget - half]
        out.append(pre + a + mid + b + suf)
    return out, truncated


def two_way_logits(model: GPT2LMHeadModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of ("no", "yes") as the next token after each row's last non-pad position, (B, 2)."""
    last = model.gpt(input_ids, attention_mask)["last_token"]  # (B, D)
    return F.linear(last, model.lm_head_weight[LABEL_TOKENS.to(last.device)])  # (B, 2)


def accuracy_f1(preds: list[int], labels: list[int]) -> dict:
    """Accuracy and F1 of the paraphrase class (1 = yes)."""
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 0)
    fn = sum(1 for p, y in zip(preds, labels) if p == 0 and y == 1)
    acc = sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)
    return {"accuracy": acc, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}


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
