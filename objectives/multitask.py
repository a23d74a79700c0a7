"""Multi-task fine-tuning of ONE GPT-2 backbone on SST, CFIMDB and Quora (the CS224N report's future
work; the recipe of MT-DNN, Liu et al., 2019, "Multi-Task Deep Neural Networks for Natural Language
Understanding"): a shared backbone, a head per task, examples of every task mixed by a sampling schedule.

Heads read the hidden state of each input's last non-pad token:
    sst, cfimdb   dropout + a linear layer over the classes (the classifier's head, tasks/sentiment.py)
    para          the cloze answer logits: the "no" / "yes" rows of the tied output embedding
                  (tasks/paraphrase.py), exactly the paraphrase detector's decision on its prompt

Sampling schedule (`epoch_plan`): an epoch is a fixed, seeded multiset of N = sum_t n_t examples in
which task t has round(N p_t) slots, p_t proportional to n_t^alpha: `proportional` (alpha 1: every
example once), `sqrt` (alpha 1/2, Stickland & Murray, 2019, "BERT and PALs": small tasks upsampled,
large ones downsampled) or `uniform` (alpha 0: the same share for every task).  A task's slots walk a
seeded permutation of its examples, repeated when it is upsampled, cut when downsampled.  Batches mix
tasks (length-bucketed by the trainer); the loss is the mean over the batch's examples of each
example's own task cross-entropy, so every example weighs the same.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt2 import GPT2Model
from tasks.paraphrase import answer_logits
from tasks.sentiment import DATASETS

TASKS = ("sst", "cfimdb", "para")
NUM_CLASSES = {**DATASETS, "para": 2}
SAMPLING = {"proportional": 1.0, "sqrt": 0.5, "uniform": 0.0}


class MultiTaskModel(nn.Module):
    """A GPT-2 backbone with one head per task in `tasks`."""

    def __init__(self, gpt: GPT2Model, tasks: Sequence[str], hidden_dropout_prob: float):
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be some of {TASKS}, got {list(tasks)}")
        self.gpt, self.tasks = gpt, tuple(tasks)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        for t in self.tasks:
            if t != "para":  # para's head is the tied embedding's answer rows
                setattr(self, f"{t}_head", nn.Linear(gpt.config.hidden_size, NUM_CLASSES[t]))
        # trained alongside LoRA adapters, kept by freeze all-but-head
        self.head_modules = tuple(f"{t}_head" for t in self.tasks if t != "para")

    @property
    def config(self):
        return self.gpt.config

    def last_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids, attention_mask)["last_token"]  # (B, D)

    def task_logits(self, task: str, last: torch.Tensor) -> torch.Tensor:
        """(B, D) last-token states of inputs of `task` -> (B, classes of task)."""
        if task == "para":
            return answer_logits(last, self.gpt.word_embedding.weight)
        return getattr(self, f"{task}_head")(self.dropout(last))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str) -> torch.Tensor:
        return self.task_logits(task, self.last_token(input_ids, attention_mask))


def task_shares(sizes: dict[str, int], sampling: str) -> dict[str, float]:
    """p_t proportional to n_t^alpha of the sampling schedule."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    alpha = SAMPLING[sampling]
    mass = {t: float(n) ** alpha for t, n in sizes.items()}
    total = sum(mass.values())
    return {t: m / total for t, m in mass.items()}


def epoch_plan(sizes: dict[str, int], sampling: str, seed: int, epoch: int = 0) -> list[tuple[str, int]]:
    """Epoch `epoch`'s examples as (task, index) slots: round(N p_t) per task (the rounding remainder goes
    to the tasks with the largest fractional parts).  Each task walks one seeded stream of permutations
    of its examples across the epochs (epoch e takes the stream's slots e*n_t .. (e+1)*n_t - 1), so a
    downsampled task still sees all its examples over several epochs and no example twice before then."""
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"every task needs training examples, got {sizes}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    shares, total = task_shares(sizes, sampling), sum(sizes.values())
    exact = {t: total * p for t, p in shares.items()}
    counts = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: counts[t] - exact[t])[: total - sum(counts.values())]:
        counts[t] += 1
    plan = []
    for t, n in sizes.items():
        rng, stream, end = random.Random(f"{seed}/{t}"), [], (epoch + 1) * counts[t]
        while len(stream) < end:
            perm = list(range(n))
            rng.shuffle(perm)
            stream += perm
        plan += [(t, i) for i in stream[epoch * counts[t]: end]]
    return plan


def multitask_loss(model: MultiTaskModel, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean over the batch's examples of their own task's cross-entropy.  One backbone pass for the whole
    mixed batch; every head runs (on no rows when its task is absent), so DDP sees every parameter used."""
    last = model.last_token(batch["input_ids"], batch["attention_mask"])  # (B, D)
    total = last.new_zeros((), dtype=torch.float32)
    for t in model.tasks:
        rows = batch[f"rows_{t}"]
        logits = model.task_logits(t, last[rows])  # (B_t, C_t)
        total = total + F.cross_entropy(logits.float(), batch["labels"][rows], reduction="sum")
    return total / last.shape[0], batch["tokens"]
