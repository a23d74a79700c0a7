"""Training throughput of the shared trainer (training/trainer.py) on a gpt2-shaped random classifier.

    python -m bench.trainer                      # CPU, gpt2 shape, fp32
    python -m bench.trainer --device cuda --precision bf16 --batch_size 16

Three loops over the same batches, interleaved epoch by epoch so machine noise falls on all alike:
`trainer` = `Trainer.train_epoch` (autocast, accumulation bookkeeping, clipping, schedule, tqdm) on
our GPT2SentimentClassifier (full-model) with our AdamW; `plain` = a bare loop (forward, loss,
backward, step) on the same model and optimiser, i.e. the trainer's overhead; `transformers` = a
bare loop on transformers' GPT2Model (same random weights) + a linear head with torch.optim.AdamW.
Reports real (non-pad) tokens per second and ratios, and, separately, the padding that
length-bucketed batching leaves on the real SST training set compared with random batches.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from bench.common import machine_description, markdown_table, median, write_results
from config import GPT2Config
from models.gpt2 import GPT2Model
from tasks.sentiment import GPT2SentimentClassifier
from training.batching import bucketed_batches, pad_right
from training.build import autocast
from training.config import TrainConfig
from training.trainer import Trainer, TrainTask


def sst_lengths():
    from pathlib import Path

    from models.tokenizer import load_tokenizer
    from tasks.data import read_sentiment

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "cs224n" / "ids-sst-train.csv"
    if not path.is_file():
        return None
    texts = [e.text for e in read_sentiment(path, 5)]
    return [len(x) for x in load_tokenizer()(texts, add_special_tokens=False)["input_ids"]]


def padding_rows(lengths: list[int], batch_size: int) -> list[list]:
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    random_batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    bucketed = bucketed_batches(lengths, batch_size, torch.Generator().manual_seed(0))
    rows = []
    for name, batches in (("random batches", random_batches), ("length-bucketed", bucketed)):
        positions = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        rows.append([name, f"{1 - sum(lengths) / positions:.1%}", f"{positions / sum(lengths):.3f}"])
    return rows


class HFClassifier(nn.Module):
    def __init__(self, hf: transformers.GPT2Model, num_labels: int):
        super().__init__()
        self.gpt, self.head = hf, nn.Linear(hf.config.n_embd, num_labels)

    def forward(self, ids, mask):
        h = self.gpt(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        return self.head(h[torch.arange(len(ids)), last])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--model", default="gpt2", help="preset shape (random weights)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batches", type=int, default=3, help="batches per timed epoch")
    p.add_argument("--rounds", type=int, default=2, help="timed epochs per loop (after one warm-up epoch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    backbone = GPT2Model(GPT2Config.from_name(a.model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        backbone.save_pretrained(tmp)
        hf = transformers.GPT2Model.from_pretrained(tmp, attn_implementation="sdpa")
    ours = GPT2SentimentClassifier(backbone, 5, 0.0).to(device)
    ref = HFClassifier(hf, 5).to(device)
    n = a.batch_size * a.batches
    ids = torch.randint(0, 50000, (n, a.seq_len))
    labels = torch.randint(0, 5, (n,))
    cfg = TrainConfig(batch_size=a.batch_size, lr=1e-5, precision=a.precision, progress=False, warmup_ratio=0.0,
                      epochs=100)

    def make_batch(idx):
        x, mask = pad_right(ids[idx].tolist(), 50256)
        return {"input_ids": x, "attention_mask": mask, "labels": labels[idx], "tokens": int(mask.sum())}

    def loss_fn(model, b):
        return F.cross_entropy(model(b["input_ids"], b["attention_mask"]).float(), b["labels"]), b["tokens"]

    task = TrainTask("bench", [a.seq_len] * n, make_batch, loss_fn, lambda m: {"x": 0.0}, metric="x")
    trainer = Trainer(ours, task, cfg, device, run_dir=tempfile.mkdtemp())
    state = trainer._make_state()  # the trainer's own optimiser, schedule and scaler
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-5, weight_decay=0.0)

    def plain(model, optimiser):
        model.train()
        t0, tokens = time.perf_counter(), 0
        for j in range(0, n, a.batch_size):
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_batch(list(range(j, j + a.batch_size))).items()}
            with autocast(device, a.precision):
                loss, t = loss_fn(model, b)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            tokens += t
        float(loss.detach())  # sync
        return tokens / (time.perf_counter() - t0)

    loops = {"trainer": lambda: trainer.train_epoch(state)["tokens_per_s"],
             "plain": lambda: plain(ours, state.optimizer),
             "transformers": lambda: plain(ref, ref_opt)}
    speeds = {k: [] for k in loops}
    for r in range(a.rounds + 1):
        for name, fn in loops.items():
            s = fn()
            if r:
                speeds[name].append(s)
    med = {k: median(v) for k, v in speeds.items()}
    rows = [[k, f"{med[k]:.0f}", f"{med[k] / med['transformers']:.2f}"] for k in loops]
    print(f"\n{a.model} shape, batch {a.batch_size} x {a.seq_len} tokens, {a.precision}, full-model fine-tuning, "
          f"{machine_description(device)}\n")
    print(markdown_table(["loop", "tokens/s (median)", "ratio vs transformers"], rows))
    lengths = sst_lengths()
    pad = padding_rows(lengths, 8) if lengths else []
    if pad:
        print("\nPadding on SST train (8,544 sentences, batch 8):\n")
        print(markdown_table(["batching", "padded positions", "positions / real tokens"], pad))
    path = write_results("trainer", {"args": vars(a), "machine": machine_description(device),
                                     "tokens_per_s": med, "speeds": speeds, "sst_padding": pad})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
