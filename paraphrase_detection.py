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
Impossible Distillation's critic.  A pair longer than `--max_length` tokens keeps the whole template
and the answer slot and truncates the questions (the longer one first, each keeping its beginning);
the number of truncated pairs is printed and logged.  Impossible Distillation's synthetic pairs join
the training set with `--synthetic_train` (weight `--synthetic_weight`, a KL term to the initial
model with `--kl_lambda`, a margin or InfoNCE term ranking each synthetic positive above the hard
negatives of its source sentence with `--contrastive`; distillation/synthetic.py).

    python paraphrase_detection.py --use_gpu --model_size gpt2
    python paraphrase_detection.py --model_size tiny --epochs 1 --limit 64    # smoke run, CPU
"""
from __future__ import annotations

import argparse
import sys

import torch

from common.errors import DataError
from distillation import synthetic
from evaluation.metrics import accuracy_binary_f1
from models.gpt2 import GPT2LMHeadModel
from objectives.smart import smart_objective
from tasks.data import read_paraphrase, write_paraphrase_predictions
from tasks.leaderboard import default_path, paraphrase_file
from tasks.run_outputs import write_class_outputs
from tasks.paraphrase import LABEL_TOKENS, encode_pairs, two_way_logits
from training.batching import pad_right
from training.cli import UsageError, add_common_args, add_smart_args, check_file_flags, entry_point, smart_config
from training.distributed import is_main
from training.efficient import frozen_copy
from training.inference import batched_inference
from training.runner import ScriptRun
from training.task import TrainTask

OUTPUT_FLAGS = {"para_dev_out", "para_test_out"}  # may change on --resume
DATA_FLAGS = ("para_train", "para_dev", "synthetic_train")  # their files' fingerprints must not change on --resume


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--para_train", default="data/quora-train.csv")
    p.add_argument("--para_dev", default="data/quora-dev.csv")
    p.add_argument("--para_test", default="data/quora-test-student.csv")
    p.add_argument("--para_dev_out", default=default_path(paraphrase_file("dev")))
    p.add_argument("--para_test_out", default=default_path(paraphrase_file("test")))
    g = p.add_argument_group("Impossible Distillation (synthetic pairs from impossible_distillation.py)")
    g.add_argument("--synthetic_train", default=None, metavar="FILE",
                   help="Quora-format pairs written by `impossible_distillation.py build`, added to the training set "
                        "(--para_train none: train on them alone)")
    g.add_argument("--synthetic_weight", type=float, default=1.0,
                   help="loss weight of each synthetic pair (real pairs weigh 1)")
    g.add_argument("--kl_lambda", type=float, default=0.0,
                   help="weight of KL(model || frozen initial model) on the yes/no distribution (0: off)")
    g.add_argument("--contrastive", choices=synthetic.CONTRASTIVE, default="none",
                   help="rank each synthetic positive above the hard negatives of the same source sentence: "
                        "margin (hinge on the yes/no log-odds) or infonce")
    g.add_argument("--contrastive_weight", type=float, default=None, help="weight of the contrastive term (default 1)")
    g.add_argument("--contrastive_margin", type=float, default=None, help="margin of --contrastive margin (default 1)")
    add_smart_args(p)
    add_common_args(p, epochs=10, batch_size=8, lr=1e-5)
    args = p.parse_args(argv)
    if not 0 < args.synthetic_weight < float("inf"):
        raise UsageError(f"--synthetic_weight must be a finite number > 0, got {args.synthetic_weight}")
    if args.synthetic_weight != 1.0 and not args.synthetic_train:
        raise UsageError("--synthetic_weight needs --synthetic_train")
    if not 0 <= args.kl_lambda < float("inf"):
        raise UsageError(f"--kl_lambda must be a finite number >= 0, got {args.kl_lambda}")
    if args.contrastive == "none" and (args.contrastive_weight is not None or args.contrastive_margin is not None):
        raise UsageError("--contrastive_weight and --contrastive_margin need --contrastive margin or infonce")
    if args.contrastive != "none" and not args.synthetic_train:
        raise UsageError("--contrastive needs --synthetic_train (its positives and hard negatives form the groups)")
    if args.contrastive_margin is not None and args.contrastive != "margin":
        raise UsageError("--contrastive_margin goes with --contrastive margin")
    if args.contrastive_weight is not None and not args.contrastive_weight > 0:
        raise UsageError(f"--contrastive_weight must be > 0, got {args.contrastive_weight}")
    if args.para_train == "none" and not args.synthetic_train:
        raise UsageError("--para_train none needs --synthetic_train (there would be nothing to train on)")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    smart_config(args)  # checked before any work
    check_file_flags({"--para_train": None if args.para_train == "none" else args.para_train,
                      "--para_dev": args.para_dev, "--para_test": args.para_test,
                      "--synthetic_train": args.synthetic_train},
                     {"--para_dev_out": args.para_dev_out, "--para_test_out": args.para_test_out})
    run = ScriptRun.start("paraphrase", args, resume_free=OUTPUT_FLAGS, data=DATA_FLAGS)
    splits = {}
    splits["train"], train_weights, n_synth = synthetic.training_examples(
        args.para_train, args.synthetic_train, args.synthetic_weight, run.cfg.train.limit)
    if n_synth:
        run.say(f"[para] training on {len(splits['train']) - n_synth} real and {n_synth} synthetic pairs "
                f"(synthetic weight {args.synthetic_weight})")
    for split, labeled in (("dev", True), ("test", False)):
        splits[split] = run.limit(read_paraphrase(getattr(args, f"para_{split}"), labeled=labeled))
    dev_scored = [i for i, e in enumerate(splits["dev"]) if e.label is not None]
    if not dev_scored:
        raise DataError(f"{args.para_dev}: no labelled pair to score (every is_duplicate is empty); pass a dev file "
                        f"with labels")
    trainable = [i for i, e in enumerate(splits["train"]) if e.label is not None]
    if not trainable:
        raise DataError(f"{args.para_train}: no labelled training pair")
    model = run.build(GPT2LMHeadModel)
    reference = frozen_copy(model) if args.kl_lambda else None  # the initial model, for --kl_lambda
    max_length, tokenizer = run.max_length(model), run.tokenizer
    seqs, truncation = {}, {}
    for split, examples in splits.items():
        seqs[split], truncation[split] = encode_pairs(tokenizer, [(e.sentence1, e.sentence2) for e in examples],
                                                      max_length)
        if truncation[split]:
            run.say(f"[para] {split}: {truncation[split]} of {len(examples)} pairs longer than {max_length} tokens; "
                    f"questions truncated")
    run.log.write("truncation", truncated=truncation, max_length=max_length)
    pad_id, batch_size, precision = tokenizer.eos_token_id, run.cfg.train.batch_size, run.cfg.train.precision
    if len(trainable) < len(splits["train"]):
        run.say(f"[para] train: {len(splits['train']) - len(trainable)} unlabeled rows not trained on")
    train_labels = torch.tensor([splits["train"][i].label for i in trainable])
    train_weights = train_weights[trainable]
    groups = {}
    if args.contrastive != "none":
        n_real = len(splits["train"]) - n_synth
        groups = synthetic.contrastive_groups([splits["train"][i] for i in trainable], [i >= n_real for i in trainable])
        if not groups:
            raise DataError(f"{args.synthetic_train}: no positive with a hard negative of the same sentence1; "
                            f"--contrastive needs the file `impossible_distillation.py build` writes")
        run.say(f"[para] contrastive ({args.contrastive}): {len(groups)} positives with hard negatives")
    contrastive_weight = 1.0 if args.contrastive_weight is None else args.contrastive_weight
    margin = 1.0 if args.contrastive_margin is None else args.contrastive_margin

    def make_batch(indices):
        rows, pos, neg = synthetic.with_negatives(indices, groups)  # rows == indices without --contrastive
        ids, mask = pad_right([seqs["train"][trainable[i]] for i in rows], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": train_labels[indices], "tokens": int(mask.sum()),
                "weights": train_weights[indices], "pos": pos, "neg": neg}

    smart = smart_objective(smart_config(args), lambda m, b: two_way_logits(m, b["input_ids"], b["attention_mask"]))

    def loss_fn(model, batch):
        # SMART's terms (--smart_lambda / --bregman_mu) cover every row the model reads, contrastive
        # negatives included; the task loss takes the batch's own examples (the first n rows)
        if smart is not None:
            logits, penalty, logs = smart.forward(model, batch)
        else:
            logits, penalty, logs = two_way_logits(model, batch["input_ids"], batch["attention_mask"]), 0.0, {}
        n = batch["labels"].size(0)  # the batch's own examples; rows after them are contrastive negatives
        ref_logits = None
        if reference is not None:
            with torch.no_grad():
                ref_logits = two_way_logits(reference, batch["input_ids"][:n], batch["attention_mask"][:n])
        loss = synthetic.paraphrase_loss(logits[:n], batch["labels"], batch["weights"], ref_logits, args.kl_lambda)
        if groups:
            term = synthetic.contrastive_loss(logits, batch["pos"], batch["neg"], args.contrastive, margin)
            loss, logs = loss + contrastive_weight * term, {**logs, "contrastive": term.detach()}
        return loss + penalty, batch["tokens"], logs

    def answer_logits(model, split) -> torch.Tensor:  # (N, 2): "no", "yes"
        return batched_inference(seqs[split], batch_size, pad_id, run.device, precision,
                                 lambda ids, mask: two_way_logits(model, ids, mask))

    def predict(model, split) -> list[int]:
        return answer_logits(model, split).argmax(-1).tolist()

    def evaluate(model):
        preds = predict(model, "dev")
        return accuracy_binary_f1([preds[i] for i in dev_scored], [splits["dev"][i].label for i in dev_scored])

    task = TrainTask("para", [len(seqs["train"][i]) for i in trainable], make_batch, loss_fn, evaluate,
                     metric="accuracy", callbacks=[smart] if smart else [])
    result = run.fit(model, task)
    if result.interrupted:
        return None
    model.eval()
    for split, out in (("dev", args.para_dev_out), ("test", args.para_test_out)):
        logits = answer_logits(model, split)
        tokens = LABEL_TOKENS[logits.argmax(-1)].tolist()
        if is_main():  # under torchrun every rank holds all the gathered predictions; rank 0 writes
            write_paraphrase_predictions(out, [e.id for e in splits[split]], tokens, expected_rows=len(splits[split]))
            run.say(f"[para] wrote {len(tokens)} {split} predictions to {out}")
            write_class_outputs(run.run_dir, "para", split, paraphrase_file(split), [e.id for e in splits[split]],
                                logits.softmax(-1), [e.label for e in splits[split]])  # for ensemble.py
    dev = result.best_metrics
    run.say(f"[para] best epoch {result.best_epoch}: dev accuracy {dev['accuracy']:.4f}, dev F1 {dev['f1']:.4f}")
    return dev


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
