"""What a script hands the shared trainer: a `TrainTask` and, optionally, `Callback`s.

A task says how to batch its training examples, the loss of a batch, how to evaluate on dev and
which dev metric picks the best epoch.  Everything else a new objective needs goes through the
explicit extension points of `Callback` (never by patching the task or saving files next to the
run's checkpoint):

    state_dict / load_state_dict   extra state saved atomically INSIDE the run's last.pt and restored
                                   on --resume (a critic and its optimiser, an EMA copy, counters)
    param_groups(model)            extra parameter groups for the main optimiser (parameters that
                                   live outside the model, or another learning rate)
    on_model_ready(trainer)        once, when the trainer is made: after LoRA / freezing, before the model
                                   is wrapped for several ranks (DDP / FSDP) or compiled, so forwards of
                                   the plain model may run here (a DPO reference's log-probabilities)
    on_fit_start(trainer)          once, after the optimiser exists and a resumed state is restored
    on_micro_batch_end(trainer, batch)
                                   after each micro-batch's backward (e.g. update a critic on the
                                   features the loss stashed; the model's gradients are untouched)
    on_step_end(trainer, step)     after each optimiser step
    on_epoch_end(trainer, epoch, metrics) -> bool
                                   after each epoch's evaluation and checkpoint; True ends training
                                   early (early stopping, a sweep's pruner)

A loss returns `(loss, tokens)` or `(loss, tokens, logs)` with `logs` a dict of detached scalar
tensors (e.g. a DPO reward margin): the trainer averages them on the device (no host sync per step)
and writes them to metrics.jsonl with the loss.  `evaluate` returns a dict of metrics, or an
`Evaluation` whose `outputs` (generated texts, probabilities) are kept for the best epoch, stored in
best.pt and returned by `fit`, never logged as metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from training.trainer import Trainer


@dataclass
class Evaluation:
    metrics: dict[str, float]
    outputs: dict[str, Any] = field(default_factory=dict)  # kept for the best epoch; not metrics


class Callback:
    """Extension points of a training run; every method is optional (see the module docstring)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but the checkpoint holds {sorted(state)}")

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []

    def on_model_ready(self, trainer: "Trainer") -> None:
        pass

    def on_fit_start(self, trainer: "Trainer") -> None:
        pass

    def on_micro_batch_end(self, trainer: "Trainer", batch: dict) -> None:
        pass

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> bool:
        return False


@dataclass
class TrainTask:
    name: str
    train_lengths: Sequence[int]  # token length of each training example (for bucketing)
    make_batch: Callable[[list[int]], dict]  # training indices -> dict of CPU tensors (other values passed as is)
    loss: Callable[[nn.Module, dict], tuple]  # batch on device -> (mean loss, tokens as int[, logs])
    evaluate: Callable[[nn.Module], "dict | Evaluation"]  # called in eval mode under no_grad
    metric: str  # key of the metrics that selects the best epoch
    higher_is_better: bool = True
    callbacks: Sequence[Callback] = ()


def split_loss(out) -> tuple[torch.Tensor, Any, dict]:
    """A task loss's return value -> (loss, tokens, logs)."""
    if len(out) == 2:
        return out[0], out[1], {}
    if len(out) == 3:
        return out
    raise ValueError(f"a task loss returns (loss, tokens) or (loss, tokens, logs), got {len(out)} values")


def as_evaluation(value) -> Evaluation:
    return value if isinstance(value, Evaluation) else Evaluation(dict(value))
