"""Fault injection: processes killed in the middle of a checkpoint write, torn log lines, overwritten
bytes in checkpoints and weights, and runs that start together on one run directory (issue 14,
items 2, 4, 7 and 10).  The kills and races use real subprocesses (tests/fault_worker.py)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import CheckpointError
from common.io import append_jsonl, read_jsonl_log
from fault_worker import regression_run
from training import checkpoint

WORKER = Path(__file__).resolve().parent / "fault_worker.py"


def worker(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *map(str, argv)], capture_output=True, text=True,
                          timeout=120, **kwargs)


def overwrite(path: Path, offset: int, n: int = 4096) -> None:
    """What the issue's corruption did: n bytes of 0xFF written over a file at `offset`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * min(n, path.stat().st_size - offset))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, result = regression_run(tmp_path_factory.mktemp("uninterrupted"))
    return model.state_dict(), result


# ---- item 4: a kill at a chosen point of a checkpoint write, then --resume ---------------------
@pytest.mark.parametrize("kill_at,left", [
    ("best.pt:1", set()),  # the very first write: nothing complete on disk
    ("last.pt:1", {"best.pt"}),  # the case: best.pt, no last.pt
    ("last.pt:2", {"best.pt", "last.pt"}),  # best.pt of epoch 2, last.pt still of epoch 1
])
def test_kill_during_a_checkpoint_write_then_resume_ends_as_uninterrupted(tmp_path, uninterrupted, kill_at, left):
    run_dir = tmp_path / "run"
    killed = worker("train", run_dir, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names = {p.name for p in run_dir.iterdir()}
    assert {n for n in names if n.endswith(".pt")} == left
    assert any(n.endswith(".tmp") for n in names)  # the half-written checkpoint
    if kill_at == "last.pt:2":  # best.pt holds epoch 2, last.pt epoch 1: best.pt is the best so far
        _, paused = regression_run(run_dir, "--resume", str(run_dir), "--stop_after_epoch", "1")
        assert paused.interrupted and paused.best_epoch == 2 == checkpoint.load(run_dir / "best.pt")["epoch"]
    model, result = regression_run(run_dir, "--resume", str(run_dir))
    state, reference = uninterrupted
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert result.best_epoch == reference.best_epoch == 3 and result.best_metrics == reference.best_metrics
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert checkpoint.load(run_dir / "last.pt")["epoch"] == 3


# ---- item 7: corrupted and truncated checkpoints --------------------------------------------
def test_corrupted_truncated_and_empty_checkpoints_name_the_file(tmp_path):
    run_dir = tmp_path / "run"
    regression_run(run_dir, "--epochs", "1")
    last = run_dir / "last.pt"
    good = last.read_bytes()
    for damage, message in ((lambda: overwrite(last, len(good) // 2), "checksum mismatch|cannot be read"),
                            (lambda: last.write_bytes(good[: len(good) // 2]), "cannot be read"),
                            (lambda: last.write_bytes(b""), "the file is empty")):
        last.write_bytes(good)
        damage()
        with pytest.raises(CheckpointError, match=f"{last}: ({message})"):
            checkpoint.load(last)
        with pytest.raises(CheckpointError, match=f"{last}"):  # and resuming from it says so
            regression_run(run_dir, "--epochs", "1", "--resume", str(run_dir))


def test_overwritten_tensor_bytes_fail_the_checksum(tmp_path):
    """0xFF over a tensor's bytes reads back as NaNs without any error from torch; the checksum
    catches it."""
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.zeros(4096)}, "epoch": 1}, path)
    raw = path.read_bytes()
    start = raw.index(b"\x00" * 4096)  # the tensor's storage inside the zip
    overwrite(path, start + 1024, 2048)
    assert torch.isnan(torch.load(path, weights_only=True)["model"]["w"]).any()  # torch alone accepts it
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)


def test_corrupted_safetensors_names_file_and_tensor(tiny_hf_checkpoint, tmp_path):
    import shutil

    from models.gpt2 import GPT2LMHeadModel
    from training.checkpoint import load_model

    directory, _ = tiny_hf_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    weights = broken / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    overwrite(weights, header + 4096)  # inside the data: NaNs in some tensor
    with pytest.raises(CheckpointError, match=rf"{weights}: tensor \S+ holds NaN or infinite values"):
        load_model(GPT2LMHeadModel, str(broken))
    overwrite(weights, 0)  # the header itself
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        load_model(GPT2LMHeadModel, str(broken))


def test_old_non_zip_pytorch_model_bin_loads_and_nan_is_named(tiny_hf_checkpoint, tmp_path):
    from models.gpt2 import GPT2LMHeadModel

    directory, hf = tiny_hf_checkpoint
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    state = hf.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # torch < 1.6 layout
    ids = torch.randint(0, 1000, (2, 9))
    ours = GPT2LMHeadModel.from_name_or_path(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    state = {k: v.clone() for k, v in state.items()}
    state["transformer.h.1.mlp.c_fc.weight"][3, 5] = math.inf
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: tensor transformer.h.1.mlp.c_fc.weight holds NaN"):
        GPT2LMHeadModel.from_name_or_path(str(tmp_path))


# ---- item 10: torn log lines ----------------------------------------------------------------
def test_a_torn_log_line_is_skipped_and_ended_before_the_next_append(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"event": "epoch", "epoch": 1})
    with open(log, "ab") as f:
        f.write(b'{"event": "epoch", "epo')  # a kill in the middle of an append
    assert read_jsonl_log(log) == [{"event": "epoch", "epoch": 1}]
    append_jsonl(log, {"event": "epoch", "epoch": 2})
    assert read_jsonl_log(log) == [{"event": "epoch", "epoch": 1}, {"event": "epoch", "epoch": 2}]


def test_pretrain_resumes_and_saves_its_model_despite_a_torn_log(tmp_path, tokenizer_dir, monkeypatch):
    import pretrain

    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus for a tiny model" for i in range(60)) + "\n")
    run_dir = tmp_path / "run"
    argv = ["--model_size", "tiny", "--corpus", str(corpus), "--max_length", "16", "--epochs", "2", "--batch_size", "4",
            "--limit", "4", "--no_progress"]
    assert pretrain.main([*argv, "--run_dir", str(run_dir), "--stop_after_epoch", "1"])["interrupted"]
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"event": "step", "task": "pretr')  # killed while appending
    out = pretrain.main([*argv, "--resume", str(run_dir)])
    assert (out["model_dir"] / "model.safetensors").is_file()
    assert [e["epoch"] for e in out["epochs"]] == [1, 2]


# ---- item 2: concurrent runs ----------------------------------------------------------------
def test_a_second_process_on_a_locked_run_dir_is_refused_and_a_dead_holder_frees_it(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, str(WORKER), "lock", str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = worker("lock", run_dir, input="")
        assert second.returncode == 2
        assert f"{run_dir} is in use by pid {holder.pid}" in second.stderr
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: the lock file stays behind
        holder.wait()
    assert (run_dir / "run.lock").is_file()
    after = worker("lock", run_dir, input="")  # the kernel dropped the dead process's lock
    assert after.returncode == 0 and after.stdout.strip() == "locked"


def test_runs_started_in_the_same_second_get_their_own_default_dirs(tmp_path):
    start_at = math.floor(time.time())  # the workers' clocks are frozen in this second
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "newdir", str(tmp_path), str(start_at), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:  # every worker has imported everything and waits: release them at once
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    dirs = [out.strip() for out, _ in outs]
    assert len(set(dirs)) == 3 and all(Path(d).is_dir() for d in dirs)
    stem = time.strftime("sweep-%Y%m%d-%H%M%S", time.gmtime(start_at))
    assert sorted(Path(d).name for d in dirs) == [stem, f"{stem}-2", f"{stem}-3"]
