"""The student paraphrase GENERATOR of Impossible Distillation (Jung et al., 2023, arXiv 2305.16635,
Section 3): a GPT-2 fine-tuned on the filtered pairs (x, y') with

    L = E_{(x, y') ~ D_filtered} [ CE(S_theta(y' | x)) + lambda * KL(S_theta || P_T) ]

where P_T is the frozen initial (pretrained) model, the KL taken token by token on the same y'
positions as the cross-entropy.

The paraphrase format (one line of input, the separator, the paraphrase, end of text):

    {x}\\nIn other words: {y'}<|endoftext|>

    prompt  = tokens(x) + tokens("\\nIn other words:")      the generator's input; nothing is learnt here
    target  = tokens(" " + y') + [<|endoftext|>]             the loss covers these tokens only

Prompt and target are tokenised separately and concatenated, so training and generation
(`paraphrase_prompt_ids`, used by `distillation.impossible` for rounds >= 2) see the very same
prompt tokens.  A pair longer than `max_length` keeps the separator and the end-of-text token and
cuts x and y' (the longer one first, each keeping its beginning); the count is reported.

Loss (`generator_loss`): CE = mean over target tokens of -log S(y'_t | x, y'_<t) (`models.losses.token_nll`
with IGNORE_INDEX on every prompt position), KL = T^2 * mean over the same positions of
KL(softmax(z_S / T) || softmax(z_T / T)) (`distillation.losses.kd_kl_loss`; T = `kl_temperature`, 1 is the
paper's plain KL).  The teacher runs under `no_grad` on a frozen copy; with lambda = 0 it is not even
run and the loss is exactly the CE.

Training goes through the shared trainer (`generator_task` is a `TrainTask`; `train_generator` takes a
started `training.runner.ScriptRun`, so every trainer option applies: any model size, LoRA, freezing,
precision, resume).  The trained student is saved with `save_pretrained` (LoRA adapters merged first),
tokenizer files beside it: a Hugging Face directory that `impossible_distillation.py generate --model DIR`
and transformers' `GPT2LMHeadModel.from_pretrained` load.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from common.errors import ConfigError, DataError
from common.precision import autocast
from distillation.losses import kd_kl_loss
from models.losses import IGNORE_INDEX, next_token_targets, token_nll
from tasks.paraphrase import fit_pair
from training.batching import pad_right, sorted_batches
from training.config import check_number
from training.task import TrainTask

SEPARATOR = "\nIn other words:"


@dataclass
class GeneratorLossConfig:
    kl_lambda: float = 0.0  # weight of KL(student || frozen initial model) on the y' positions
    kl_temperature: float = 1.0  # T of the softened distributions (the KL is scaled by T^2)
    dev_fraction: float = 0.1  # contexts held out to pick the best epoch by dev CE (0: pick by training CE)

    def validate(self) -> "GeneratorLossConfig":
        check_number("kl_lambda", self.kl_lambda, low=0.0)
        check_number("kl_temperature", self.kl_temperature, low=0.0, low_open=True)
        check_number("dev_fraction", self.dev_fraction, low=0.0, high=1.0, high_open=True)
        return self


# ---- the paraphrase format ---------------------------------------------------------------------
def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def paraphrase_prompt_ids(tokenizer, sources: Sequence[str], max_source_tokens: Optional[int] = None) -> list[list[int]]:
    """Generation prompts `tokens(x) + tokens(SEPARATOR)`, x cut to `max_source_tokens` tokens."""
    sep = _ids(tokenizer, [SEPARATOR])[0]
    return [x[:max_source_tokens] + sep for x in _ids(tokenizer, [s.strip() for s in sources])]


def encode_paraphrases(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int
                       ) -> tuple[list[list[int]], list[int], int]:
    """(token ids of each `x SEP y' <eos>`, the prompt length of each, how many were truncated)."""
    sep, eos = _ids(tokenizer, [SEPARATOR])[0], tokenizer.eos_token_id
    room = max_length - len(sep) - 1
    if room < 2:
        raise ConfigError("max_length", f"{max_length} leaves no room for the pair (the separator and <eos> "
                          f"take {len(sep) + 1} tokens)")
    xs = _ids(tokenizer, [x.strip() for x, _ in pairs])
    ys = _ids(tokenizer, [" " + y.strip() for _, y in pairs])
    seqs, prompt_lengths, truncated = [], [], 0
    for x, y in zip(xs, ys):
        x, y, cut = fit_pair(x, y, room)  # the detector's truncation rule
        truncated += cut
        seqs.append(x + sep + y + [eos])
        prompt_lengths.append(len(x) + len(sep))
    return seqs, prompt_lengths, truncated


def generator_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor
                      ) -> torch.Tensor:
    """(B, T) next-token targets of the y' tokens only: position t predicts token t + 1, which is a
    target when t + 1 >= prompt length (and a real token); every other position is IGNORE_INDEX."""
    targets = next_token_targets(input_ids, attention_mask)  # (B, T)
    pos = torch.arange(input_ids.size(1), device=input_ids.device)[None]  # (1, T)
    return targets.masked_fill(pos < prompt_lengths.to(input_ids.device)[:, None] - 1, IGNORE_INDEX)


# ---- the loss ----------------------------------------------------------------------------------
def generator_loss(logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor] = None,
                   kl_lambda: float = 0.0, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, CE, KL) of student logits (B, T, V) against y' targets (B, T); KL(student || reference) on
    the target positions, from the reference logits (B, T, V) when kl_lambda > 0."""
    ce = token_nll(logits, targets)
    if not kl_lambda:
        return ce, ce.detach(), torch.zeros((), device=logits.device)
    if ref_logits is None:
        raise ValueError("kl_lambda > 0 needs the reference model's logits")
    keep = targets != IGNORE_INDEX  # (B, T)
    # kd_kl_loss(a, b) is T^2 KL(p_b || p_a): the student's distribution goes second for KL(S || P_T).
    kl = kd_kl_loss(ref_logits[keep], logits[keep], temperature)  # over the (N, V) target positions
    return ce + kl_lambda * kl, ce.detach(), kl.detach()


def held_out_split(rows: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, dev rows): whole contexts held out (`context_id`), round(fraction * contexts), at
    least 1 when fraction > 0.  fraction 0: no dev rows."""
    if not rows:
        raise DataError("no pairs to train the generator on (the filter kept nothing; loosen its rules or give "
                        "the critic a lower tau)")
    if not fraction:
        return list(rows), []
    contexts = sorted({r["context_id"] for r in rows})
    if len(contexts) < 2:
        raise ConfigError("dev_fraction", f"holds out whole contexts, but the pairs come from {len(contexts)} "
                          f"context; use dev_fraction 0 or more contexts")
    n_dev = min(len(contexts) - 1, max(1, round(fraction * len(contexts))))
    dev = set(random.Random(seed).sample(contexts, n_dev))
    return [r for r in rows if r["context_id"] not in dev], [r for r in rows if r["context_id"] in dev]


# ---- the task ----------------------------------------------------------------------------------
@torch.no_grad()
def mean_target_ce(model, seqs: Sequence[list[int]], prompt_lengths: Sequence[int], batch_size: int, pad_id: int,
                   device, precision: str = "fp32") -> float:
    """Token-weighted mean CE of the y' tokens over all sequences (eval mode is the caller's)."""
    total, count = 0.0, 0
    for batch in sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = pad_right([seqs[i] for i in batch], pad_id)
        targets = generator_targets(ids, mask, torch.tensor([prompt_lengths[i] for i in batch]))
        ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
        with autocast(device, precision):
            logits = model(ids, mask)
        total += float(token_nll(logits, targets, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)


def generator_task(train: tuple[list, list], dev: tuple[list, list], pad_id: int, loss_cfg: GeneratorLossConfig,
                   reference, batch_size: int, device, precision: str) -> TrainTask:
    """A TrainTask over encoded (seqs, prompt_lengths); dev metric `dev_ce` (lower is better) on `dev`
    (the training pairs when dev is empty); the loss logs `ce` and `kl`."""
    seqs, prompt_lengths = train
    dev_seqs, dev_lengths = dev if dev[0] else train

    def make_batch(indices):
        ids, mask = pad_right([seqs[i] for i in indices], pad_id)
        targets = generator_targets(ids, mask, torch.tensor([prompt_lengths[i] for i in indices]))
        return {"input_ids": ids, "attention_mask": mask, "targets": targets,
                "tokens": int((targets != IGNORE_INDEX).sum())}

    def loss_fn(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        ref_logits = None
        if loss_cfg.kl_lambda:
            with torch.no_grad():
                ref_logits = reference(batch["input_ids"], batch["attention_mask"])
        loss, ce, kl = generator_loss(logits, batch["targets"], ref_logits, loss_cfg.kl_lambda,
                                      loss_cfg.kl_temperature)
        return loss, batch["tokens"], {"ce": ce, "kl": kl}

    def evaluate(model):
        return {"dev_ce": mean_target_ce(model, dev_seqs, dev_lengths, batch_size, pad_id, device, precision)}

    return TrainTask("generator", [len(s) for s in seqs], make_batch, loss_fn, evaluate, metric="dev_ce",
                     higher_is_better=False)


def save_generator(model, tokenizer_source: Optional[str], out_dir: str | Path) -> Path:
    """`save_pretrained` (LoRA adapters merged in first): a complete Hugging Face directory with the
    run's tokenizer, which the `generate` stage (and transformers) load alone."""
    from training.efficient import lora_settings, merge_lora

    if lora_settings(model) is not None:
        merge_lora(model)
    return model.save_pretrained(out_dir, tokenizer=tokenizer_source)


def train_generator(run, rows: Sequence[dict], loss_cfg: GeneratorLossConfig, out_dir: str | Path,
                    reference_spec: Optional[str] = None) -> Optional[dict]:
    """Fine-tune `run`'s model (`run.build`) on the pairs `rows` ({"context_id", "a", "b"}: x = a,
    y' = b) through the shared trainer and save it to `out_dir`.  The KL reference is a frozen copy
    of the model as built, or the model `reference_spec` (e.g. the pretrained model when training
    starts from an earlier round's student).  Returns the stage statistics, None when the run was
    interrupted (`stop_after_epoch`; resumable)."""
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import resolve_tokenizer_dir
    from training.checkpoint import load_model
    from training.efficient import as_frozen, frozen_copy

    loss_cfg.validate()
    train_rows, dev_rows = held_out_split(rows, loss_cfg.dev_fraction, run.cfg.train.seed)
    model = run.build(GPT2LMHeadModel)
    reference = None
    if loss_cfg.kl_lambda:
        reference = frozen_copy(model) if reference_spec is None else \
            as_frozen(load_model(GPT2LMHeadModel, reference_spec)).to(run.device)
        if reference.config.vocab_size != model.config.vocab_size:
            raise ConfigError("kl_reference", f"{reference_spec} has {reference.config.vocab_size} tokens, the "
                              f"generator {model.config.vocab_size}: the KL needs the same vocabulary")
    tokenizer, max_length = run.tokenizer, run.max_length(model)
    train = encode_paraphrases(tokenizer, [(r["a"], r["b"]) for r in train_rows], max_length)
    dev = encode_paraphrases(tokenizer, [(r["a"], r["b"]) for r in dev_rows], max_length) if dev_rows else ([], [], 0)
    bs, precision, pad = run.cfg.train.batch_size, run.cfg.train.precision, tokenizer.eos_token_id
    task = generator_task(train[:2], dev[:2], pad, loss_cfg, reference, bs, run.device, precision)

    def train_ce(m) -> float:
        m.eval()
        return mean_target_ce(m, train[0], train[1], bs, pad, run.device, precision)

    ce_before = train_ce(model)
    dev_before = task.evaluate(model)["dev_ce"]
    run.say(f"[generator] {len(train_rows)} training pairs, {len(dev_rows)} dev pairs; y' CE before training: "
            f"train {ce_before:.4f}, dev {dev_before:.4f}")
    result = run.fit(model, task)
    if result.interrupted:
        return None
    ce_after = train_ce(model)
    steps = [r for r in run.log.records("step") if r.get("task") == "generator"]
    saved = save_generator(model, resolve_tokenizer_dir(run.cfg.model.tokenizer, run.cfg.model.spec), out_dir)
    run.say(f"[generator] y' CE on the training pairs {ce_before:.4f} -> {ce_after:.4f}; saved {saved}")
    return {"stage": "train-generator", "generator_in": run.cfg.model.spec, "generator_out": str(saved),
            "run_dir": str(run.run_dir), "train_pairs": len(train_rows), "dev_pairs": len(dev_rows),
            "truncated": train[2] + dev[2], "train_loss_first": ce_before, "train_loss_last": ce_after,
            "dev_ce_before": dev_before, "dev_ce_after": result.best_metrics.get("dev_ce"),
            "best_epoch": result.best_epoch,
            "train_step_loss_first": steps[0]["train_loss"] if steps else None,
            "train_step_loss_last": steps[-1]["train_loss"] if steps else None,
            "kl_reference": reference_spec or ("the initial model" if loss_cfg.kl_lambda else None),
            "loss": asdict(loss_cfg)}
