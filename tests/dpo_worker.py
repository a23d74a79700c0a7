"""A tiny DPO fit (objectives/dpo.py) through the shared Trainer, used by tests/test_dpo.py both in one
process and in each rank of a 2-process gloo group (DDP and FSDP; speed_worker.spawn_worker)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

N_PAIRS = 11  # not a multiple of the global batch: the last global batch is uneven over the ranks


def toy_pairs():
    from objectives.dpo import EncodedPairs

    g = torch.Generator().manual_seed(0)
    rnd = lambda k: torch.randint(1, 97, (k,), generator=g).tolist()  # noqa: E731
    return EncodedPairs([rnd(2 + i % 3) for i in range(N_PAIRS)], [rnd(2 + i % 2) for i in range(N_PAIRS)],
                        [rnd(1 + i % 4) for i in range(N_PAIRS)], ["a", "b"] * 5 + ["a"])


def run(run_dir: str, argv: list[str]) -> dict:
    """DPO on the toy pairs; returns the weights, the reference log-probs and the dev metrics per epoch."""
    from config import GPT2Config
    from models.gpt2 import GPT2LMHeadModel
    from objectives.dpo import (DPOConfig, ReferenceLogprobs, all_logprobs, dpo_loss, pair_rows, preference_logs,
                                preference_metrics, response_logprobs)
    from training.build import seed_everything
    from training.cli import add_common_args, check_common_args, resolve_device
    from training.distributed import full_state_dict
    from training.trainer import Trainer, TrainTask

    args = add_common_args(argparse.ArgumentParser()).parse_args(["--no_progress", "--warmup_ratio", "0", *argv])
    train, device = check_common_args(args).train, resolve_device("cpu")
    seed_everything(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       max_position_embeddings=16, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))
    pairs, cfg, dev = toy_pairs(), DPOConfig(beta=0.5), []
    reference = ReferenceLogprobs(lambda m: {"all": all_logprobs(m, pairs, 3, 0, device, "fp32")})

    def make_batch(idx):
        ref = reference["all"][idx]
        return {**pair_rows(pairs, idx, 0), "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}

    def loss_fn(m, b):
        losses, cr, rr = dpo_loss(*response_logprobs(m, b), b["ref_chosen"], b["ref_rejected"], cfg)
        return losses.mean(), len(cr), preference_logs(cr, rr)

    def evaluate(m):
        dev.append(preference_metrics(all_logprobs(m, pairs, 3, 0, device, "fp32"), reference["all"], pairs.kinds, cfg))
        return dev[-1]

    task = TrainTask("dpo", pairs.lengths(), make_batch, loss_fn, evaluate, metric="loss", higher_is_better=False,
                     callbacks=[reference])
    Trainer(model, task, train, device, Path(run_dir)).fit()
    state, _ = full_state_dict(model)
    return {"state": {k: v.detach().clone() for k, v in state.items()}, "reference": reference["all"], "dev": dev}

