"""Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model") on the shared trainer.

For a prompt x with a chosen response y_w and a rejected one y_l, the loss is exactly the handout's

    h    = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    loss = -log sigmoid(beta * h)

with sequence log-probabilities SUMMED over the response tokens only (`models.losses.sequence_logprob`
with the prompt and the padding masked out).  `label_smoothing` e > 0 is conservative DPO (Mitchell,
2023, "A note on DPO with noisy preferences"): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
`dpo_loss = "ipo"` is IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning
from Human Preferences"): (h - 1 / (2 beta))^2, on the same summed log-probabilities.

The implicit rewards are r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)) and r_l likewise; every step
logs `reward_accuracy` (share of pairs with r_w > r_l), `reward_margin` (mean r_w - r_l),
`chosen_reward` and `rejected_reward` to metrics.jsonl.

The reference is the starting checkpoint, frozen: the policy as training starts (with LoRA exactly
the checkpoint, B = 0; with ReFT its freshly initialised interventions, which are not the identity,
and with QAT the fake quantization are part of it, so the first loss is log 2).  It only ever enters
the loss through its log-probabilities of the fixed pairs, so they are computed ONCE, when the
trainer is made, by the policy before its first step and before DDP / FSDP wrap it
(`ReferenceLogprobs`, a trainer callback; eval mode, no gradient; under torchrun each rank scores a
shard of the pairs) and saved inside the run's last.pt: `--resume` reads them back instead of
recomputing them, no second model is held in memory, and no gradient can reach a reference.

A batch of B pairs is ONE forward pass over 2B rows: the B chosen sequences, then the B rejected ones
(prompt + response, right-padded; `PairBatch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.precision import autocast
from models.losses import IGNORE_INDEX, sequence_logprob
from training.batching import pad_right, sorted_batches
from training.distributed import sharded_inference
from training.task import Callback

DPOLoss = Literal["sigmoid", "ipo"]


@dataclass
class DPOConfig:
    beta: float = 0.1  # the KL strength: how far the policy may move from the reference
    label_smoothing: float = 0.0  # conservative DPO: probability that a preference label is flipped
    dpo_loss: DPOLoss = "sigmoid"  # sigmoid = DPO, ipo = IPO

    def validate(self) -> "DPOConfig":
        from training.config import check_choice, check_number

        check_number("beta", self.beta, low=0.0, low_open=True)
        check_number("label_smoothing", self.label_smoothing, low=0.0, high=0.5, high_open=True)
        check_choice("dpo_loss", self.dpo_loss, DPOLoss)
        if self.dpo_loss == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing", "is conservative DPO's; it has no meaning with dpo_loss ipo")
        return self


# ---- the loss ---------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected responses (B,), detached.
    Inputs are (B,) summed response log-probabilities."""
    chosen = policy_chosen.float() - ref_chosen.float()  # log pi(y_w|x) - log pi_ref(y_w|x)
    rejected = policy_rejected.float() - ref_rejected.float()
    h = chosen - rejected
    if cfg.dpo_loss == "ipo":
        losses = (h - 1.0 / (2.0 * cfg.beta)) ** 2
    else:
        e = cfg.label_smoothing
        losses = -(1.0 - e) * F.logsigmoid(cfg.beta * h) - e * F.logsigmoid(-cfg.beta * h)
    return losses, cfg.beta * chosen.detach(), cfg.beta * rejected.detach()


def preference_logs(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logged terms: detached scalar tensors (the trainer averages them on the device)."""
    return {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean()}


# ---- encoded pairs and their batches ------------------------------------------------------------
@dataclass
class EncodedPairs:
    """Token ids of each pair: the prompt, the chosen and the rejected response; `kinds` say how each
    pair was made (pairs.py) and break the dev metrics down."""
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def lengths(self) -> list[int]:
        """Tokens of each pair's longer row (for length bucketing)."""
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompts, self.chosen, self.rejected)]


def fit_to_length(prompt: list[int], longest_response: int, max_length: int) -> int:
    """How many of the prompt's LAST tokens to keep so that prompt + response fit `max_length`: all when
    they fit, else what the response leaves but at least half the budget (the response then keeps
    its start)."""
    if len(prompt) + longest_response <= max_length:
        return len(prompt)
    return min(len(prompt), max(max_length // 2, max_length - longest_response))


def encode_text_pairs(tokenizer, records: Sequence[dict], max_length: int,
                      append_eos: bool) -> tuple[EncodedPairs, int]:
    """Prompts and responses tokenised separately (the response's first token never merges with the
    prompt's last), each response + EOS when `append_eos`; (pairs, number truncated)."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id] if append_eos else []
    prompts = encode([r["prompt"] for r in records])
    chosen = [c + eos for c in encode([r["chosen"] for r in records])]
    rejected = [c + eos for c in encode([r["rejected"] for r in records])]
    return fit_pairs(prompts, chosen, rejected, [r.get("kind", "given") for r in records], max_length)


def fit_pairs(prompts, chosen, rejected, kinds, max_length: int) -> tuple[EncodedPairs, int]:
    """`EncodedPairs` within `max_length` tokens per row (`fit_to_length`, one prompt for both rows);
    (pairs, number truncated)."""
    out, truncated = EncodedPairs([], [], [], list(kinds)), 0
    for n, (p, c, r) in enumerate(zip(prompts, chosen, rejected), start=1):
        if not p or not c or not r:
            raise ValueError(f"pair {n}: a DPO pair needs a non-empty prompt and two non-empty responses")
        keep = fit_to_length(p, max(len(c), len(r)), max_length)
        budget = max_length - keep
        truncated += keep < len(p) or len(c) > budget or len(r) > budget
        out.prompts.append(p[len(p) - keep:])
        out.chosen.append(c[:budget])
        out.rejected.append(r[:budget])
    return out, truncated


def pair_rows(pairs: EncodedPairs, indices: Sequence[int], pad_id: int) -> dict:
    """The 2B rows of B pairs (chosen rows first, then rejected): input_ids, attention_mask (2B, T) and
    `targets` (2B, T): the next token at every position whose next token is a response token,
    IGNORE_INDEX elsewhere (prompt, padding), so that `sequence_logprob` sums over the response only."""
    rows, starts = [], []
    for side in (pairs.chosen, pairs.rejected):
        for i in indices:
            rows.append(pairs.prompts[i] + side[i])
            starts.append(len(pairs.prompts[i]))
    ids, mask = pad_right(rows, pad_id)  # (2B, T)
    targets = torch.full_like(ids, IGNORE_INDEX)
    for b, (row, start) in enumerate(zip(rows, starts)):
        targets[b, start - 1:len(row) - 1] = ids[b, start:len(row)]  # position t predicts token t + 1
    return {"input_ids": ids, "attention_mask": mask, "targets": targets, "tokens": int(mask.sum())}


def response_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed response log-probabilities of the chosen and of the rejected rows of `batch` (a
    GPT2LMHeadModel).  The output layer runs only at the K positions that predict a response token (the
    prompt's and the padding's logits are never made: for a one-token answer that is 1 of T positions)."""
    targets = batch["targets"]  # (2B, T)
    # forward(), not encode(): hooks that need the mask (ReFT's positions) see it there
    hidden = model.gpt(batch["input_ids"], batch["attention_mask"])["last_hidden_state"]  # (2B, T, D)
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # (K,) each: one host sync for the K positions
    logits = model.gpt.hidden_state_to_token(hidden[rows, cols])  # (K, V)
    per_position = sequence_logprob(logits[:, None], targets[rows, cols][:, None])  # (K,): each position its own row
    logp = per_position.new_zeros(targets.shape[0]).index_add(0, rows, per_position)  # (2B,)
    half = logp.shape[0] // 2
    return logp[:half], logp[half:]


@torch.no_grad()
def all_logprobs(model: nn.Module, pairs: EncodedPairs, batch_size: int, pad_id: int, device: torch.device,
                 precision: str) -> torch.Tensor:
    """(N, 2) summed response log-probabilities (chosen, rejected) of every pair, float32 on the CPU;
    under torchrun each rank scores a shard and all get every row."""
    lengths = pairs.lengths()

    def run(indices: list[int]) -> torch.Tensor:
        out = torch.empty(len(indices), 2)
        for batch in sorted_batches([lengths[i] for i in indices], batch_size):
            rows = pair_rows(pairs, [indices[j] for j in batch], pad_id)
            rows = {k: v.to(device) if torch.is_tensor(v) else v for k, v in rows.items()}
            with autocast(device, precision):
                chosen, rejected = response_logprobs(model, rows)
            out[batch] = torch.stack([chosen, rejected], dim=1).float().cpu()
        return out

    return sharded_inference(len(pairs), device, run)


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, kinds: Sequence[str], cfg: DPOConfig) -> dict:
    """Dev metrics of (N, 2) policy and reference log-probabilities: the DPO loss, the reward terms,
    `policy_accuracy` (share of pairs where the policy itself gives the chosen response the higher
    log-probability: for paraphrase pairs, the detector's accuracy) and reward accuracy by pair kind."""
    losses, cr, rr = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], cfg)
    out = {"loss": losses.mean().item(), **{k: v.item() for k, v in preference_logs(cr, rr).items()},
           "policy_accuracy": (policy[:, 0] > policy[:, 1]).float().mean().item()}
    names = sorted(set(kinds))
    if len(names) > 1:
        for name in names:
            rows = torch.tensor([k == name for k in kinds])
            out[f"reward_accuracy_{name}"] = (cr[rows] > rr[rows]).float().mean().item()
    return out


class ReferenceLogprobs(Callback):
    """The frozen reference's (N, 2) response log-probabilities of every split's pairs, computed once by
    `compute(model)` when the trainer is made -- the model is then still the starting checkpoint -- and
    kept in last.pt (restored by --resume, never recomputed from the trained weights)."""

    def __init__(self, compute: Callable[[nn.Module], dict[str, torch.Tensor]]):
        self.compute = compute
        self.values: Optional[dict[str, torch.Tensor]] = None

    def on_model_ready(self, trainer) -> None:
        """The starting model, before DDP / FSDP wrap it (FSDP runs no forward before its root's); a run
        resumed from its last.pt gets the saved values instead (`load_state_dict`)."""
        if self.values is None and not trainer.resuming:
            was_training = trainer.model.training
            trainer.model.eval()
            self.values = {k: v.detach().float().cpu() for k, v in self.compute(trainer.model).items()}
            trainer.model.train(was_training)

    def on_fit_start(self, trainer) -> None:
        if self.values is None:
            raise RuntimeError("a resumed run's last.pt holds no reference log-probabilities")

    def __getitem__(self, split: str) -> torch.Tensor:
        if self.values is None:
            raise RuntimeError("the reference log-probabilities are computed when the fit starts")
        return self.values[split]

    def state_dict(self) -> dict:
        return {"values": self.values}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"]
