"""LoRA (through peft) on our GPT-2, layer freezing, gradient checkpointing and the accounting:
checked against a hand computation and peft's own delta weights, bit-identical frozen weights,
adapter checkpoints, and the flags end to end in the task scripts."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from models.gpt2 import GPT2LMHeadModel, GPT2Model
from optimizer import AdamW
from training import checkpoint
from training.efficient import (
    LORA_MODULES, adapter_state, apply_lora, efficiency_report, format_report, freeze_parameters, load_adapter_state,
    lora_settings, merge_lora, prepare_model, resolve_lora_targets, set_grad_checkpointing,
)
from common.errors import ConfigError, UserError
from training.cli import add_efficiency_args, check_common_args
from training.config import EfficiencyConfig


def tiny_config(dropout: float = 0.0, layers: int = 4) -> GPT2Config:
    return GPT2Config(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


class Classifier(nn.Module):
    """A task model with a separate head, like classifier.GPT2SentimentClassifier."""

    head_modules = ("classifier_head",)

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.gpt = GPT2Model(config)
        self.classifier_head = nn.Linear(config.hidden_size, 3)

    def forward(self, ids, mask=None):
        return self.classifier_head(self.gpt(ids, mask)["last_token"])


def make_classifier(seed: int = 0, **kw) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(tiny_config(**kw))


def batch(seed: int = 1, B: int = 3, T: int = 10, V: int = 97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 7:] = 0  # one right-padded row
    labels = torch.randint(0, 3, (B,), generator=g)
    return ids, mask, labels


def train_steps(model, steps=3, lr=1e-2):
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        ids, mask, labels = batch(seed=10 + i)
        F.cross_entropy(model(ids, mask), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- targets ----------------------------------------------------------------------------------
def test_target_names_resolve_to_our_linear_layers():
    assert resolve_lora_targets("qv") == ["self_attention.query", "self_attention.value"]
    assert resolve_lora_targets("attn") == ["self_attention.query", "self_attention.key", "self_attention.value",
                                            "attention_dense"]
    assert resolve_lora_targets("mlp,query") == ["self_attention.query", "interm_dense", "out_dense"]
    assert resolve_lora_targets("all") == list(LORA_MODULES.values())
    with pytest.raises(ValueError, match="^lora_targets: unknown target 'lm_head'"):
        resolve_lora_targets("qv,lm_head")
    model = GPT2LMHeadModel(tiny_config())
    linear_suffixes = {n.split("gpt_layers.")[1].split(".", 1)[1] for n, m in model.named_modules()
                       if isinstance(m, nn.Linear)}
    assert linear_suffixes == set(LORA_MODULES.values())  # "all" really is every linear layer


# ---- LoRA math --------------------------------------------------------------------------------
def test_fresh_lora_computes_the_base_model_and_keeps_the_tie():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config()).eval()
    ids, mask, _ = batch()
    before = model(ids, mask)
    embedding = model.gpt.word_embedding.weight
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets="all")
    assert model.lm_head_weight is embedding and model.gpt.word_embedding.weight is embedding
    assert torch.equal(model(ids, mask), before)  # B = 0: the adapters add exact zeros
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    assert n_lora == 4 * 6
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=4)


def test_lora_layer_matches_hand_computation_and_peft_delta():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    apply_lora(model, r=4, alpha=12, dropout=0.0, targets="qv")
    layer = model.gpt.gpt_layers[1].self_attention.value
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    with torch.no_grad():
        B.normal_()
    W, b = layer.base_layer.weight, layer.base_layer.bias
    x = torch.randn(2, 5, 32)
    scale = 12 / 4
    assert layer.scaling["default"] == scale == lora_settings(model).scale
    expected = x @ W.T + b + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default"), scale * B @ A, atol=1e-6, rtol=1e-6)


def test_training_changes_only_adapters_and_head():
    model = make_classifier()
    base = snapshot(model)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="attn", modules_to_save=["classifier_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("classifier_head.modules_to_save.") for n in trainable)
    train_steps(model)
    after = dict(model.named_parameters())
    for name, value in base.items():
        module, _, leaf = name.rpartition(".")
        if module == "classifier_head":  # the original head is kept, untouched; the trained copy moves
            assert torch.equal(after[f"classifier_head.original_module.{leaf}"], value)
            assert not torch.equal(after[f"classifier_head.modules_to_save.default.{leaf}"], value)
        elif any(module.endswith(t) for t in resolve_lora_targets("attn")):
            assert torch.equal(after[f"{module}.base_layer.{leaf}"], value), name
        else:
            assert torch.equal(after[name], value), name
    assert all(not torch.equal(after[n], torch.zeros_like(after[n])) for n in trainable if ".lora_B." in n)


def test_merge_gives_w_plus_scaled_ba_and_the_same_outputs():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config()).eval()
    base = snapshot(model)
    apply_lora(model, r=4, alpha=16, dropout=0.0, targets="all")
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            with torch.no_grad():
                p.normal_(std=0.05)
    ids, mask, _ = batch()
    unmerged = model(ids, mask)
    deltas = {}
    for name, m in model.named_modules():
        if name.endswith(tuple(LORA_MODULES.values())) and hasattr(m, "lora_A"):
            deltas[f"{name}.weight"] = 4.0 * m.lora_B["default"].weight @ m.lora_A["default"].weight
    embedding = model.gpt.word_embedding.weight
    assert merge_lora(model) is model
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(tuple(LORA_MODULES.values())))
    assert model.lm_head_weight is embedding  # still tied
    merged = dict(model.named_parameters())
    assert set(merged) == set(base)
    for name, w in base.items():
        expected = w + deltas[name] if name in deltas else w
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(ids, mask), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)


def test_lora_classifier_merge_keeps_the_trained_head():
    model = make_classifier()
    apply_lora(model, r=2, alpha=4, dropout=0.0, targets="qv", modules_to_save=["classifier_head"])
    train_steps(model, steps=2)
    ids, mask, _ = batch()
    out = model(ids, mask)
    merge_lora(model)
    assert type(model.classifier_head) is nn.Linear
    torch.testing.assert_close(model(ids, mask), out, atol=1e-5, rtol=1e-5)


# ---- adapter checkpoints ----------------------------------------------------------------------
def test_adapter_checkpoint_holds_only_adapters_and_head_and_reloads(tmp_path):
    model = make_classifier(seed=3)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets="qkv,mlp", modules_to_save=["classifier_head"])
    train_steps(model)
    ids, mask, _ = batch()
    out = model(ids, mask)
    checkpoint.save_atomic({"model": adapter_state(model)}, tmp_path / "adapter.pt")
    saved = checkpoint.load(tmp_path / "adapter.pt")["model"]  # weights_only=True loads it
    assert saved["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.1, "modules_to_save": ["classifier_head"],
                             "targets": resolve_lora_targets("qkv,mlp")}
    keys = set(saved["tensors"])
    assert keys and all(".lora_A." in k or ".lora_B." in k or k.startswith("classifier_head.") for k in keys)
    assert {"classifier_head.weight", "classifier_head.bias"} <= keys
    assert not any("word_embedding" in k or "layer_norm" in k for k in keys)
    fresh = make_classifier(seed=3).eval()  # the same base weights, no adapters yet
    load_adapter_state(fresh, saved)
    assert lora_settings(fresh) == lora_settings(model)
    assert torch.equal(fresh(ids, mask), out)
    other = make_classifier(seed=3)
    apply_lora(other, r=8, targets="qv", modules_to_save=["classifier_head"])
    with pytest.raises(ValueError, match="adapter checkpoint made with LoRA"):
        load_adapter_state(other, saved)
    with pytest.raises(ValueError, match="not a LoRA adapter checkpoint"):
        load_adapter_state(make_classifier(), fresh.state_dict())


# ---- freezing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, n_layers, frozen_prefixes", [
    ("embeddings", None, ("gpt.word_embedding.", "gpt.pos_embedding.")),
    ("first-half", None, ("gpt.word_embedding.", "gpt.pos_embedding.", "gpt.gpt_layers.0.", "gpt.gpt_layers.1.")),
    ("first-n", 3, ("gpt.word_embedding.", "gpt.pos_embedding.", "gpt.gpt_layers.0.", "gpt.gpt_layers.1.",
                    "gpt.gpt_layers.2.")),
    ("all-but-head", None, ("gpt.",)),
])
def test_frozen_parameters_stay_bit_identical(mode, n_layers, frozen_prefixes):
    model = make_classifier()
    before = snapshot(model)
    frozen = freeze_parameters(model, mode, n_layers)
    assert set(frozen) == {n for n in before if n.startswith(frozen_prefixes)}
    train_steps(model)
    for name, p in model.named_parameters():
        if name.startswith(frozen_prefixes):
            assert not p.requires_grad and torch.equal(p, before[name]), name
        else:
            assert p.requires_grad and not torch.equal(p, before[name]), name


def test_freeze_also_freezes_adapters_inside_frozen_layers():
    model = make_classifier()
    apply_lora(model, r=2, targets="qv", modules_to_save=["classifier_head"])
    freeze_parameters(model, "first-half")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert trainable and all(n.startswith(("gpt.gpt_layers.2.", "gpt.gpt_layers.3.")) for n in trainable)


def test_freeze_errors_name_the_field():
    with pytest.raises(ValueError, match="^freeze all-but-head: GPT2LMHeadModel has no separate head"):
        freeze_parameters(GPT2LMHeadModel(tiny_config()), "all-but-head")
    with pytest.raises(ValueError, match="freeze_layers N with 1 <= N <= 4, got 5"):
        freeze_parameters(make_classifier(), "first-n", 5)
    with pytest.raises(ValueError, match="^freeze must be one of"):
        freeze_parameters(make_classifier(), "last-half")


# ---- gradient checkpointing -------------------------------------------------------------------
def grads_of(model, dropout_seed=None) -> dict:
    model.train()
    model.zero_grad(set_to_none=True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    ids, mask, labels = batch()
    F.cross_entropy(model(ids, mask), labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_grad_checkpointing_gives_the_same_gradients(lora):
    model = make_classifier()
    if lora:
        apply_lora(model, r=4, dropout=0.0, targets="all", modules_to_save=["classifier_head"])
    plain = grads_of(model)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in model.gpt.gpt_layers]
    set_grad_checkpointing(model, True)
    checkpointed = grads_of(model)
    assert len(calls) == 2 * 4  # each layer ran again in the backward pass: checkpointing is on
    assert set(checkpointed) == set(plain) and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-6)
    calls.clear()
    with torch.no_grad():
        model.eval()
        model(*batch()[:2])
    assert len(calls) == 4  # no checkpointing in eval / no-grad
    for h in hooks:
        h.remove()


def test_grad_checkpointing_replays_dropout():
    model = make_classifier(dropout=0.2)
    plain = grads_of(model, dropout_seed=5)
    set_grad_checkpointing(model, True)
    checkpointed = grads_of(model, dropout_seed=5)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-6)


# ---- accounting and flags ---------------------------------------------------------------------
def test_accounting_counts_adapters_head_and_tied_tensors_once():
    model = make_classifier()
    total_base = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=4, targets="qv", modules_to_save=["classifier_head"])
    report = efficiency_report(model, "cpu")
    adapters = 4 * 2 * (4 * 32 + 32 * 4)  # layers * targets * (A + B)
    head = 32 * 3 + 3
    assert report["trainable_params"] == adapters + head
    assert report["total_params"] == total_base + adapters + head  # + the trained copy of the head
    assert report["trainable_pct"] == pytest.approx(100 * (adapters + head) / report["total_params"])
    assert report["peak_memory_kind"] == "cpu_peak_rss" and report["peak_memory_bytes"] > 10 * 2**20
    assert format_report(report).startswith(f"trainable parameters {adapters + head:,} of ")
    lm = GPT2LMHeadModel(tiny_config())
    assert efficiency_report(lm, "cpu")["total_params"] == sum(p.numel() for p in lm.parameters())


def parse(*argv) -> EfficiencyConfig:
    p = argparse.ArgumentParser()
    add_efficiency_args(p)
    return check_common_args(p.parse_args(list(argv))).efficiency


def test_flag_errors_and_prepare_model():
    for argv, message in [(["--merge_lora"], "--merge_lora: needs peft lora"),
                          (["--freeze_layers", "2"], "--freeze_layers: goes with freeze first-n"),
                          (["--freeze", "first-n"], "--freeze_layers: goes with freeze first-n"),
                          (["--peft", "lora", "--lora_targets", "qv,foo"], "--lora_targets: unknown target 'foo'"),
                          (["--peft", "lora", "--lora_r", "0"], "--lora_r: must be >= 1"),
                          (["--peft", "lora", "--freeze", "all-but-head"], "would freeze every adapter")]:
        with pytest.raises(UserError, match=message):
            parse(*argv)
    model = make_classifier()
    args = parse("--peft", "lora", "--lora_r", "2", "--lora_targets", "qv", "--freeze", "first-n",
                 "--freeze_layers", "2", "--grad_checkpointing")
    applied = prepare_model(model, args)
    assert applied["lora"]["r"] == 2 and applied["lora"]["modules_to_save"] == ["classifier_head"]
    assert model.gpt.gradient_checkpointing and prepare_model(model, args) is applied  # applied once
    with pytest.raises(ConfigError, match="froze every LoRA adapter"):
        prepare_model(make_classifier(), parse("--peft", "lora", "--freeze", "first-n", "--freeze_layers", "4"))


# ---- the flags through the task scripts -------------------------------------------------------
def test_classifier_with_lora_end_to_end(tmp_path, tokenizer_dir):
    """--peft lora in classifier.py: adapter-only checkpoints, accounting in the log, exact resume,
    --merge_lora before prediction."""
    import classifier
    from cs224n_files import keyword_sentiment, write_sentiment

    files = []
    for split, n, test in (("train", 8, False), ("dev", 6, False), ("test", 5, True)):
        path = write_sentiment(tmp_path / f"{split}.csv", keyword_sentiment(n, len(files)), test=test)
        files += [f"--cfimdb_{split}", str(path)]
    common = ["--model_size", "tiny", "--no_progress", "--batch_size", "4", "--tokenizer", str(tokenizer_dir),
              "--datasets", "cfimdb", "--fine-tune-mode", "full-model", "--epochs", "2", "--limit", "8",
              "--peft", "lora", "--lora_r", "4", "--lora_targets", "attn", "--grad_checkpointing", *files]

    def run(name, *extra):
        return classifier.main([*common, "--run_dir", str(tmp_path / name / "run"),
                                "--predictions_dir", str(tmp_path / name / "pred"), *extra])

    full = run("a")
    ckpt = torch.load(tmp_path / "a" / "run" / "cfimdb" / "best.pt", weights_only=True)["model"]
    assert ckpt["format"] == "lora-adapter" and ckpt["lora"]["r"] == 4
    assert ckpt["lora"]["modules_to_save"] == ["classifier_head"]
    assert all(".lora_" in k or k.startswith("classifier_head.") for k in ckpt["tensors"])
    events = [json.loads(line) for line in open(tmp_path / "a" / "run" / "cfimdb" / "metrics.jsonl")]
    start = next(e for e in events if e["event"] == "start")
    assert 0 < start["trainable_pct"] < 10 and start["efficiency"]["grad_checkpointing"]
    done = next(e for e in events if e["event"] == "done")
    assert done["peak_memory_kind"] == "cpu_peak_rss" and done["peak_memory_bytes"] > 0
    # Interrupted after one epoch and resumed from the adapter-only last.pt: the same result.
    assert run("b", "--stop_after_epoch", "1") == {}
    # --merge_lora (allowed to differ on resume: it acts after training) merges before prediction:
    # the same predictions as the unmerged model of the uninterrupted run.
    assert run("b", "--resume", str(tmp_path / "b" / "run"), "--merge_lora") == full
    for split in ("dev", "test"):
        name = f"full-model-cfimdb-{split}-out.csv"
        assert (tmp_path / "a" / "pred" / name).read_bytes() == (tmp_path / "b" / "pred" / name).read_bytes()
    with pytest.raises(UserError, match="--fine-tune-mode last-linear-layer"):
        classifier.main(["--peft", "lora", *files])  # last-linear-layer (the default) + LoRA: an error


def test_every_task_script_takes_the_flags():
    import classifier
    import paraphrase_detection
    import sonnet_generation

    flags = ["--peft", "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1", "--lora_targets",
             "qv,mlp", "--merge_lora", "--freeze", "first-n", "--freeze_layers", "2", "--grad_checkpointing"]
    for module, extra in ((classifier, ["--fine-tune-mode", "full-model"]), (paraphrase_detection, []),
                          (sonnet_generation, [])):
        args = module.parse_args([*flags, *extra])
        assert (args.peft, args.lora_r, args.lora_alpha, args.lora_targets, args.freeze_layers) == \
               ("lora", 8, 16.0, "qv,mlp", 2) and args.merge_lora and args.grad_checkpointing
        with pytest.raises(UserError, match="--freeze_layers"):
            check_common_args(module.parse_args(["--freeze_layers", "2", *extra]))


def test_sonnet_script_with_lora_and_freezing(tmp_path, tokenizer_dir):
    """The LM scripts have no separate head: only adapters train, the tied embedding stays tied,
    and --merge_lora merges before the final generation."""

    import sonnet_generation as sg
    from cs224n_files import sonnet_task_files
    from tasks.sonnets import read_generated_sonnets

    f = sonnet_task_files(tmp_path)
    train, dev, gold_path, test = f["train"], f["dev"], f["gold_path"], f["test"]
    out = tmp_path / "p" / "generated.txt"
    sg.main(["--model_size", "tiny", "--no_progress", "--batch_size", "4", "--tokenizer", str(tokenizer_dir),
             "--epochs", "1", "--limit", "8", "--run_dir", str(tmp_path / "run"), "--sonnet_path", str(train),
             "--held_out_sonnet_path", str(test), "--held_out_dev_path", str(dev), "--gold_dev_path", str(gold_path),
             "--sonnet_out", str(out), "--sonnet_dev_out", str(tmp_path / "p" / "dev.txt"), "--max_new_tokens", "8",
             "--peft", "lora", "--lora_targets", "all", "--freeze", "first-n", "--freeze_layers", "1",
             "--merge_lora"])
    assert [n for n, _ in read_generated_sonnets(out)] == [0]
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    assert ckpt["lora"]["modules_to_save"] == []
    assert ckpt["tensors"] and all(".lora_" in k for k in ckpt["tensors"])
