"""Multi-task fine-tuning of one GPT-2 backbone on SST, CFIMDB and Quora paraphrase detection
(objectives/multitask.py: a head per task, one backbone, tasks mixed by `--task_sampling`).

Inputs are encoded exactly as the single-task scripts encode them: sentiment texts keep their end
(classifier.py), question pairs go into the detector's cloze prompt (paraphrase_detection.py), so the
predictions are directly comparable and the prediction files are the leaderboard's:
{predictions_dir}/full-model-{sst,cfimdb}-{dev,test}-out.csv and para-{dev,test}-output.csv (the
multi-task model trains the whole backbone: the full-model files), plus RUN_DIR/outputs/ for
ensemble.py.  The best epoch is the one with the best MEAN dev accuracy over the tasks; every task's
dev accuracy and F1 are logged each epoch.

    python multitask.py --use_gpu --model_size gpt2 --task_sampling sqrt --lr 2e-5 --epochs 3 \\
        --para_train data/quora-train.csv
    python multitask.py --model_size tiny --epochs 1 --limit 64      # smoke run, CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.errors import DataError
from evaluation.metrics import accuracy_binary_f1, accuracy_macro_f1
from models.gpt2 import GPT2Model
from objectives.multitask import NUM_CLASSES, SAMPLING, TASKS, MultiTaskModel, epoch_plan, multitask_loss
from tasks.data import read_paraphrase, read_sentiment, write_paraphrase_predictions, write_sentiment_predictions
from tasks.leaderboard import PREDICTIONS_DIR, paraphrase_file, sentiment_file
from tasks.paraphrase import LABEL_TOKENS, encode_pairs
from tasks.run_outputs import write_class_outputs
from tasks.sentiment import encode_texts
from training.batching import pad_right
from training.cli import UsageError, add_common_args, check_file_flags, entry_point
from training.distributed import is_main
from training.inference import batched_inference
from training.runner import ScriptRun
from training.task import Callback, TrainTask

OUTPUT_FLAGS = {"predictions_dir"}
FILES = {"sst": ("ids-sst-train.csv", "ids-sst-dev.csv", "ids-sst-test-student.csv"),
         "cfimdb": ("ids-cfimdb-train.csv", "ids-cfimdb-dev.csv", "ids-cfimdb-test-student.csv"),
         "para": ("quora-train.csv", "quora-dev.csv", "quora-test-student.csv")}
SPLITS = ("train", "dev", "test")


class EpochPlan(Callback):
    """The slots of the epoch being trained (`epoch_plan`), derived from the trainer's epoch count, so a
    resumed run continues every task's stream where it stopped.  The trainer's length buckets come from
    epoch 0's plan (the same tasks in the same shares, so the lengths are alike)."""

    def __init__(self, sizes: dict[str, int], sampling: str, seed: int):
        self.sizes, self.sampling, self.seed = sizes, sampling, seed
        self.plan = epoch_plan(sizes, sampling, seed, 0)

    def _set(self, epoch: int) -> None:
        self.plan = epoch_plan(self.sizes, self.sampling, self.seed, epoch)

    def on_fit_start(self, trainer) -> None:
        self._set(trainer.state.epoch)  # completed epochs: 0, or where a resumed run stopped

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> bool:
        self._set(epoch)  # `epoch` epochs are done: the next one is index `epoch`
        return False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="the tasks trained together")
    for task, names in FILES.items():
        for split, name in zip(SPLITS, names):
            p.add_argument(f"--{task}_{split}", default=f"data/{name}", help=f"{task} {split} file")
    p.add_argument("--task_sampling", choices=list(SAMPLING), default="sqrt",
                   help="each task's share of an epoch: proportional to its size, to the square root of its size "
                        "(small tasks upsampled, large ones downsampled), or uniform")
    p.add_argument("--hidden_dropout_prob", type=float, default=0.3, help="dropout before the sentiment heads")
    p.add_argument("--predictions_dir", default=PREDICTIONS_DIR, help="where the leaderboard files are written")
    add_common_args(p, epochs=10, batch_size=8, lr=1e-5)
    args = p.parse_args(argv)
    if len(set(args.tasks)) != len(args.tasks):
        raise UsageError("--tasks: a task is given twice")
    if not 0 <= args.hidden_dropout_prob < 1:
        raise UsageError(f"--hidden_dropout_prob must be in [0, 1), got {args.hidden_dropout_prob}")
    return args


def prediction_file(task: str, split: str) -> str:
    return paraphrase_file(split) if task == "para" else sentiment_file("full-model", task, split)


def read_task(task: str, run: ScriptRun, args) -> dict:
    out = {}
    for split in SPLITS:
        path = getattr(args, f"{task}_{split}")
        if task == "para":
            out[split] = run.limit(read_paraphrase(path, labeled=split != "test"))
        else:
            out[split] = run.limit(read_sentiment(path, NUM_CLASSES[task], labeled=split != "test"))
    if not any(e.label is not None for e in out["train"]) or not any(e.label is not None for e in out["dev"]):
        raise DataError(f"{task}: no labelled training or dev example in {getattr(args, f'{task}_train')} / "
                        f"{getattr(args, f'{task}_dev')}")
    return out


def encode(task: str, examples, tokenizer, max_length: int) -> tuple[list[list[int]], int]:
    if task == "para":
        return encode_pairs(tokenizer, [(e.sentence1, e.sentence2) for e in examples], max_length)
    return encode_texts(tokenizer, [e.text for e in examples], max_length)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    check_file_flags({f"--{t}_{s}": getattr(args, f"{t}_{s}") for t in args.tasks for s in SPLITS},
                     {f"--predictions_dir ({t} {s})": Path(args.predictions_dir) / prediction_file(t, s)
                      for t in args.tasks for s in ("dev", "test")})
    run = ScriptRun.start("multitask", args, resume_free=OUTPUT_FLAGS,
                          data=[f"{t}_{s}" for t in args.tasks for s in ("train", "dev")])
    data = {t: read_task(t, run, args) for t in args.tasks}
    backbone = run.build(GPT2Model)
    model = MultiTaskModel(backbone, args.tasks, args.hidden_dropout_prob).to(run.device)
    tokenizer, max_length, device = run.tokenizer, run.max_length(backbone), run.device
    batch_size, precision, pad_id = run.cfg.train.batch_size, run.cfg.train.precision, tokenizer.eos_token_id
    seqs, truncated = {}, {}
    for t in args.tasks:
        for split in SPLITS:
            seqs[t, split], truncated[f"{t}_{split}"] = encode(t, data[t][split], tokenizer, max_length)
    run.log.write("truncation", truncated=truncated, max_length=max_length)
    train = {t: [i for i, e in enumerate(data[t]["train"]) if e.label is not None] for t in args.tasks}
    sizes = {t: len(train[t]) for t in args.tasks}
    epochs = EpochPlan(sizes, args.task_sampling, run.cfg.train.seed)
    plan = epochs.plan  # epoch 0's; the others are the same shares of new slots of every task's stream
    shares = {t: sum(1 for task, _ in plan if task == t) for t in args.tasks}
    run.say(f"[multitask] an epoch holds {shares} examples ({args.task_sampling} sampling of "
            f"{ {t: len(train[t]) for t in args.tasks} })")
    run.log.write("sampling", schedule=args.task_sampling, epoch_examples=shares,
                  train_examples={t: len(train[t]) for t in args.tasks})

    def make_batch(indices):
        slots = [epochs.plan[i] for i in indices]
        rows = [seqs[t, "train"][train[t][j]] for t, j in slots]
        ids, mask = pad_right(rows, pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "tokens": int(mask.sum()),
                 "labels": torch.tensor([data[t]["train"][train[t][j]].label for t, j in slots])}
        for t in args.tasks:
            batch[f"rows_{t}"] = torch.tensor([k for k, (task, _) in enumerate(slots) if task == t], dtype=torch.long)
        return batch

    def logits_of(model, task, split) -> torch.Tensor:
        return batched_inference(seqs[task, split], batch_size, pad_id, device, precision,
                                 lambda ids, mask: model(ids, mask, task))

    def evaluate(model):
        metrics = {}
        for t in args.tasks:
            preds, labels = logits_of(model, t, "dev").argmax(-1).tolist(), [e.label for e in data[t]["dev"]]
            scored = [i for i, y in enumerate(labels) if y is not None]
            p, y = [preds[i] for i in scored], [labels[i] for i in scored]
            m = accuracy_binary_f1(p, y) if t == "para" else accuracy_macro_f1(p, y, NUM_CLASSES[t])
            metrics.update({f"{t}_{k}": v for k, v in m.items()})
        metrics["accuracy"] = sum(metrics[f"{t}_accuracy"] for t in args.tasks) / len(args.tasks)
        return metrics

    lengths = [len(seqs[t, "train"][train[t][j]]) for t, j in plan]
    result = run.fit(model, TrainTask("multitask", lengths, make_batch, multitask_loss, evaluate, metric="accuracy",
                                      callbacks=[epochs]))
    if result.interrupted:
        return None
    model.eval()
    for t in args.tasks:
        for split in ("dev", "test"):
            logits, examples = logits_of(model, t, split), data[t][split]
            preds, ids = logits.argmax(-1), [e.id for e in examples]
            path = Path(args.predictions_dir) / prediction_file(t, split)
            if is_main():
                if t == "para":
                    write_paraphrase_predictions(path, ids, LABEL_TOKENS[preds].tolist(), expected_rows=len(ids))
                else:
                    write_sentiment_predictions(path, ids, preds.tolist(), expected_rows=len(ids))
                write_class_outputs(run.run_dir, t, split, path.name, ids, logits.softmax(-1),
                                    [e.label for e in examples])  # for ensemble.py
                run.say(f"[multitask] wrote {len(ids)} {t} {split} predictions to {path}")
    dev = result.best_metrics
    run.say(f"[multitask] best epoch {result.best_epoch}: mean dev accuracy {dev['accuracy']:.4f} ("
            + ", ".join(f"{t} {dev[f'{t}_accuracy']:.4f}" for t in args.tasks) + ")")
    return dev


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
