"""A tiny classifier trained with SMART's terms through the shared Trainer, used by tests/test_smart.py
both in one process and in each rank of a 2-process gloo group (DistributedDataParallel;
speed_worker.spawn_worker)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch.nn.functional as F

from speed_worker import tiny_data


def run(run_dir: str, argv: list[str], smart: dict) -> dict:
    """One fit with SmartConfig(**smart); returns the weights, the EMA copy and the logged terms."""
    from common.io import read_jsonl_log
    from config import GPT2Config
    from models.gpt2 import GPT2Model
    from objectives.smart import Smart, SmartConfig
    from tasks.sentiment import GPT2SentimentClassifier
    from training.batching import pad_right
    from training.build import seed_everything
    from training.cli import add_common_args, check_common_args, resolve_device
    from training.distributed import full_state_dict, is_main
    from training.trainer import Trainer, TrainTask

    args = add_common_args(argparse.ArgumentParser()).parse_args(["--no_progress", "--warmup_ratio", "0", *argv])
    train, device = check_common_args(args).train, resolve_device("cpu")
    seed_everything(0)
    cfg = GPT2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = GPT2SentimentClassifier(GPT2Model(cfg), 3, 0.0)
    seqs, labels = tiny_data()
    terms = Smart(SmartConfig(**smart), lambda m, b: m(b["input_ids"], b["attention_mask"]))

    def make_batch(idx):
        ids, mask = pad_right([seqs[i] for i in idx], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[idx], "tokens": int(mask.sum())}

    def loss_fn(m, b):
        logits, penalty, logs = terms.forward(m, b)
        return F.cross_entropy(logits.float(), b["labels"]) + penalty, b["tokens"], logs

    task = TrainTask("tiny", [len(s) for s in seqs], make_batch, loss_fn, lambda m: {"loss": 0.0}, metric="loss",
                     higher_is_better=False, callbacks=[terms])
    Trainer(model, task, train, device, Path(run_dir)).fit()
    state, _ = full_state_dict(model)
    epochs = [r for r in read_jsonl_log(Path(run_dir) / "metrics.jsonl") if r["event"] == "epoch"] if is_main() else []
    return {"state": {k: v.detach().clone() for k, v in state.items()}, "ema": terms.state_dict().get("ema", {}),
            "epochs": epochs}

