"""A tiny classification run through the shared Trainer, used by tests/test_speed.py both in one
process and in each rank of a 2-process gloo group (torch.multiprocessing.spawn)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

N_EXAMPLES = 11  # not a multiple of the global batch: the last global batch is uneven over the ranks


def tiny_data():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (N_EXAMPLES,), generator=g).tolist()
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
    labels = torch.randint(0, 3, (N_EXAMPLES,), generator=g)
    return seqs, labels


def run(run_dir: str, argv: list[str]) -> dict:
    """Train a tiny classifier for one epoch; returns its weights, dev predictions and losses."""
    from config import GPT2Config
    from models.gpt2 import GPT2Model
    from tasks.sentiment import GPT2SentimentClassifier
    from training.batching import pad_right
    from training.build import seed_everything
    from training.cli import add_common_args, check_common_args, resolve_device
    from training.distributed import full_state_dict
    from training.inference import batched_inference
    from training.trainer import Trainer, TrainTask

    args = add_common_args(argparse.ArgumentParser()).parse_args(["--no_progress", "--warmup_ratio", "0", *argv])
    train = check_common_args(args).train
    device = resolve_device("cpu")
    seed_everything(0)
    cfg = GPT2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = GPT2SentimentClassifier(GPT2Model(cfg), 3, 0.0)
    seqs, labels = tiny_data()
    losses = []

    def make_batch(idx):
        ids, mask = pad_right([seqs[i] for i in idx], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[idx], "tokens": int(mask.sum())}

    def loss_fn(m, b):
        return F.cross_entropy(m(b["input_ids"], b["attention_mask"]).float(), b["labels"]), b["tokens"]

    def evaluate(m):
        logits = batched_inference(seqs, 3, 0, device, train.precision, m)
        losses.append(F.cross_entropy(logits, labels).item())
        return {"loss": losses[-1], "n_predictions": len(logits)}

    task = TrainTask("tiny", [len(s) for s in seqs], make_batch, loss_fn, evaluate, metric="loss",
                     higher_is_better=False)
    trainer = Trainer(model, task, train, device, Path(run_dir))
    result = trainer.fit()
    preds = batched_inference(seqs, 4, 0, device, train.precision, model)
    state, _ = full_state_dict(model)  # plain full tensors, also under FSDP
    return {"state": {k: v.detach().clone() for k, v in state.items()}, "preds": preds,
            "losses": losses, "best": result.best_metrics}


def spawn_worker(rank: int, world: int, port: int, out_dir: str, runs: dict, run_fn=None) -> None:
    """One rank of a torchrun-like group: every run of `runs` (name -> flags, or a tuple of `run_fn`'s
    arguments after the run directory) in turn, each writing to out_dir/name and saving its result to
    out_dir/name-rank{rank}.pt.  `run_fn` (default `run`): a module-level function, as spawn pickles it."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from training.distributed import shutdown

    try:
        for name, args in runs.items():
            args = args if isinstance(args, tuple) else (args,)
            result = (run_fn or run)(str(Path(out_dir) / name), *args)
            torch.save(result, Path(out_dir) / f"{name}-rank{rank}.pt")
    finally:
        shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
