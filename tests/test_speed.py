"""Speed and scale: FLOPs/MFU arithmetic, no host sync inside a step, compiled == eager, bf16 ~ fp32,
and 2 gloo processes (DDP and FSDP) == one process with the same global batch."""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

from common.errors import UserError
import torch
import torch.nn.functional as F

from config import GPT2Config
from models.gpt2 import GPT2LMHeadModel
from training import trainer as trainer_module
from training.cli import add_common_args
from training.speed import flops_per_token, matmul_params, mfu, peak_flops
from training.trainer import Trainer, TrainTask

TESTS = Path(__file__).resolve().parent


def test_flops_per_token_is_palm_estimate_for_gpt2_small():
    # GPT-2 small: 124,439,808 parameters of which 786,432 (1024 x 768) are position embeddings.
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(n, 12, 1024, 768) == 6 * 123_653_376 + 12 * 12 * 1024 * 768 == 855_166_464
    assert flops_per_token(n, 12, 128, 768) == 6 * 123_653_376 + 12 * 12 * 128 * 768
    # matmul_params: tied embedding once, position embedding excluded; closed form 12d^2 + 13d per layer.
    cfg = GPT2Config(vocab_size=101, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     max_position_embeddings=32)
    d, layers = 16, 3
    assert matmul_params(GPT2LMHeadModel(cfg)) == 101 * d + layers * (12 * d * d + 13 * d) + 2 * d


def test_peak_table_and_mfu(monkeypatch):
    assert peak_flops(torch.device("cpu"), "fp32") is None  # CPU: no MFU unless --peak_flops
    assert peak_flops(torch.device("cpu"), "bf16", override=1e12) == 1e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    assert peak_flops(cuda, "bf16") == 989e12
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a property of the backend, not monkeypatchable
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert peak_flops(cuda, "fp32") == 494e12
        torch.backends.cuda.matmul.allow_tf32 = False
        assert peak_flops(cuda, "fp32") == 67e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert peak_flops(cuda, "bf16") == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(cuda, "bf16") is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def _lm_task(T=16, n=8, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, T), generator=g)

    def make_batch(idx):  # no tensor -> Python conversion here (the sync test counts them)
        return {"input_ids": data[idx], "tokens": len(idx) * T}

    def loss(model, b):
        logits = model(b["input_ids"])[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1)), b["tokens"]

    return TrainTask("lm", [T] * n, make_batch, loss, lambda m: {"x": 0.0}, metric="x")


def _tiny_lm(dropout=0.0):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      max_position_embeddings=32, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout))


def _args(*argv):
    return add_common_args(argparse.ArgumentParser()).parse_args(
        ["--no_progress", "--lr", "1e-2", "--warmup_ratio", "0", *argv])


def _train_config(*argv):
    from training.cli import build_configs

    return build_configs(_args(*argv)).train


def _loss_curve(tmp_path, *argv, steps=3):
    """Per-step training losses (read after the run) of a tiny LM through Trainer.train_epoch."""
    model, task = _tiny_lm(), _lm_task(n=4 * steps)
    losses = []
    loss_fn = task.loss

    def recording_loss(m, b):
        loss, tokens = loss_fn(m, b)
        losses.append(loss.detach())
        return loss, tokens

    task.loss = recording_loss
    tr = Trainer(model, task, _train_config("--batch_size", "4", "--lr_schedule", "constant", *argv),
                 torch.device("cpu"), tmp_path)
    tr.train_epoch(tr._make_state())
    return torch.stack([x.float() for x in losses]), model


def test_no_host_sync_inside_training_steps(tmp_path, monkeypatch):
    """Every tensor -> host conversion from the first batch of a 6-step epoch on is counted (the
    shuffling before it works on CPU tensors only): the only one allowed is the loss read-back after
    the last batch (LOG_EVERY is 10 batches).  On CUDA each would be a device sync."""
    calls, counting_on = [], []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _name=name, _original=original, **k):
            if counting_on:
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    assert trainer_module.LOG_EVERY > 6
    original_bucketing = trainer_module.bucketed_batches

    def bucketing_then_count(*a, **k):
        batches = original_bucketing(*a, **k)
        counting_on.append(True)  # from here on: the steps
        return batches

    monkeypatch.setattr(trainer_module, "bucketed_batches", bucketing_then_count)
    _loss_curve(tmp_path, "--max_grad_norm", "1.0", steps=6)
    assert calls == ["tolist"], calls  # the one read-back after the last batch, nothing per step


def test_bf16_autocast_loss_tracks_fp32(tmp_path):
    """Documented tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-8 ~ 0.4%); over 3
    steps of a tiny LM the per-step losses agree within 2% relative."""
    fp32, _ = _loss_curve(tmp_path / "a")
    bf16, _ = _loss_curve(tmp_path / "b", "--precision", "bf16")
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16


def _compile_available() -> str | None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "torch.compile (inductor) needs a C compiler on the CPU; none found"
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain means: cannot test here
        return f"torch.compile unavailable: {type(e).__name__}: {e}"
    return None


def test_compiled_training_matches_eager(tmp_path):
    reason = _compile_available()
    if reason:
        pytest.skip(reason)
    eager, m1 = _loss_curve(tmp_path / "eager")
    compiled, m2 = _loss_curve(tmp_path / "compiled", "--compile")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert all("_orig_mod" not in k for k in m2.state_dict())  # the saved module is the uncompiled one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """2 ranks x batch 2 == 1 process x batch 4, with DDP and with FSDP: same weights after 6 steps
    (11 examples, so the last global batch of 3 splits 2 + 1), same dev losses, one prediction per
    input on every rank, and rank 0 alone writes the run directory."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(TESTS))
    import speed_worker

    common = ["--epochs", "2", "--lr", "1e-2"]
    single = speed_worker.run(str(tmp_path / "single"), ["--batch_size", "4", *common])
    runs = {"ddp": ["--batch_size", "2", *common], "fsdp": ["--batch_size", "2", "--fsdp", *common]}
    mp.spawn(speed_worker.spawn_worker, nprocs=2, args=(2, _free_port(), str(tmp_path), runs))
    for engine in runs:
        for rank in (0, 1):
            out = torch.load(tmp_path / f"{engine}-rank{rank}.pt", weights_only=True)
            if rank == 0:  # the full state dict is gathered on rank 0 (under FSDP the others get none)
                assert out["state"].keys() == single["state"].keys()
                for name, value in single["state"].items():
                    torch.testing.assert_close(out["state"][name], value, rtol=1e-5, atol=1e-5, msg=f"{engine} {name}")
            assert out["preds"].shape == single["preds"].shape == (speed_worker.N_EXAMPLES, 3)
            torch.testing.assert_close(out["preds"], single["preds"], rtol=1e-5, atol=1e-5)
            assert out["losses"] == pytest.approx(single["losses"], rel=1e-5)
        events = [json.loads(line) for line in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events if e["event"] != "step"] == ["start", "scale", "epoch", "epoch", "done"]
        assert sum(e["event"] == "step" for e in events) == 2  # one writer: one step record per epoch here
        scale = events[1]
        assert (scale["world_size"], scale["effective_batch"], scale["engine"]) == (2, 4, engine)
        assert all(e["dev"]["n_predictions"] == speed_worker.N_EXAMPLES for e in events if e["event"] == "epoch")
        best = torch.load(tmp_path / engine / "best.pt", weights_only=True)["model"]
        assert best.keys() == single["state"].keys()


def test_fsdp_needs_torchrun():
    from training.cli import check_common_args

    with pytest.raises(UserError, match="--fsdp: shards the model over several processes"):
        check_common_args(_args("--fsdp"))
    with pytest.raises(UserError, match="--peak_flops: must be > 0"):
        check_common_args(_args("--peak_flops", "0"))


def test_mfu_logged_with_peak_flops(tmp_path):
    model, task = _tiny_lm(), _lm_task(n=8)
    Trainer(model, task, _train_config("--batch_size", "4", "--epochs", "1", "--peak_flops", "1e10"),
            torch.device("cpu"), tmp_path).fit()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epoch = next(e for e in events if e["event"] == "epoch")
    assert epoch["tokens"] == 8 * 16
    assert epoch["flops_per_token"] == pytest.approx(flops_per_token(matmul_params(model), 2, 16, 32))
    assert epoch["mfu"] == pytest.approx(epoch["tokens_per_s"] * epoch["flops_per_token"] / 1e10)
    assert next(e for e in events if e["event"] == "scale")["peak_flops"] == 1e10


def test_sequence_packing_keeps_every_token_in_order():
    """The one packer (lm.corpus) as sonnet_generation --pack_sequences uses it: EOS-joined, blocks,
    the short tail kept as a last block."""
    from lm.corpus import join_documents, pack_blocks

    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    blocks, tail = pack_blocks(join_documents(seqs, 0), 4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]] and tail == []
    blocks, tail = pack_blocks(join_documents(seqs, 0), 5)
    assert blocks.tolist() == [[1, 2, 3, 0, 4], [0, 5, 6, 7, 8]] and tail == [9, 0]
    blocks, tail = pack_blocks(join_documents(seqs[:1], 0), 8, allow_empty=True)
    assert blocks.shape == (0, 8) and tail == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks(join_documents(seqs, 0), 1)


def test_sonnet_generation_with_packing(tmp_path, tokenizer_dir):
    import random

    import sonnet_generation as sg
    from cs224n_files import sonnet_text, write_sonnets

    rng = random.Random(0)
    train = write_sonnets(tmp_path / "sonnets.txt", [(i, sonnet_text(rng)) for i in range(1, 5)])
    gold = write_sonnets(tmp_path / "gold.txt", [(132, sonnet_text(rng))])
    prompts = write_sonnets(tmp_path / "dev.txt", [(132, "a\nb\nc")])
    args = ["--model_size", "tiny", "--no_progress", "--tokenizer", str(tokenizer_dir), "--epochs", "1",
            "--batch_size", "4", "--max_length", "64", "--pack_sequences", "--select_by", "loss",
            "--run_dir", str(tmp_path / "run"), "--sonnet_path", str(train), "--held_out_sonnet_path", str(prompts),
            "--held_out_dev_path", str(prompts), "--gold_dev_path", str(gold), "--max_new_tokens", "4",
            "--sonnet_out", str(tmp_path / "out.txt"), "--sonnet_dev_out", str(tmp_path / "dev_out.txt")]
    sg.main(args)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    packing = next(e for e in events if e["event"] == "packing")
    start = next(e for e in events if e["event"] == "start")
    assert packing["sonnets"] == 4 and packing["block_size"] == 64
    assert start["train_examples"] == packing["blocks"] > 4  # blocks, not sonnets, are the examples
    epoch = next(e for e in events if e["event"] == "epoch")
    # every block but the last is full: no padding, the tokens trained on are the packed stream
    assert epoch["tokens"] > 64 * (packing["blocks"] - 1)
