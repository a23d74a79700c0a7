"""bench.gpu_check: the prepared GPU check runs its whole plan on the CPU (--dry_run), records every
part, skips what would overrun its time limit and keeps going after a failing part."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_part_and_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "check.json", tmp_path / "RESULTS.md"
    md.write_text("# earlier results\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry_run", "--json", str(out), "--results_md", str(md)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads(out.read_text())
    parts = record["parts"]
    assert record["dry_run"] and list(parts) == list(gpu_check.PARTS)
    assert {p["status"] for p in parts.values()} <= {"ok", "skipped"}, {k: p.get("error") for k, p in parts.items()}
    parity = parts["parity"]
    assert parity["status"] == "ok" and parity["fp32_pass"] and parity["fp32_max_abs_diff"] < 1e-4
    assert 0.9 <= parity["bf16_top1_agreement"] <= 1.0
    checks = {
        "train": lambda p: p["tokens_per_s"]["ours"] > 0 and p["tokens_per_s"]["transformers"] > 0 and not p["compile"],
        "generation": lambda p: p["output_shape"][0] == 3 and {"ours", "transformers"} <= set(p["tokens_per_s"]),
        "attention": lambda p: [r["variant"] for r in p["rows"]] == ["dense/sdpa", "logsparse/sparse", "local/sparse",
                                                                     "hybrid/sparse"],
        "peft": lambda p: set(p["peak_gb"]) == {"full", "lora-r16"} and p["reference_gb"]["full"] == 12.78,
        "ddp": lambda p: p["backend"] == "gloo" and p["world_size"] == 1 and p["grads_finite"],
    }
    for name, ok in checks.items():  # every measuring part ran (the dry-run limit leaves room on a busy machine)
        assert parts[name]["status"] == "ok" and ok(parts[name]), (name, parts[name])
    assert all("skipped" in parts[name] for name in ("generation_compile", "train_compile"))  # CPU: no inductor
    text = md.read_text()
    assert text.startswith("# earlier results\n") and "## GPU check (dry run: CPU, tiny shapes, not GPU figures)" in text
    assert "| part | what | ours | reference | verdict |" in text and "| parity | fp32 max abs diff" in text


def test_parts_that_would_overrun_are_skipped_with_a_note():
    parts = gpu_check.run_plan(gpu_check.DRY_PLAN, torch.device("cpu"), time_limit=1.0,
                               budgets=gpu_check.DRY_BUDGETS, only=[])
    assert list(parts) == list(gpu_check.PARTS)
    assert all(p["status"] == "skipped" and "would overrun" in p["note"] for p in parts.values())


def test_a_failing_part_records_its_error_and_the_rest_go_on(monkeypatch):
    def broken(plan, device):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(gpu_check.PARTS, "parity", broken)
    parts = gpu_check.run_plan(gpu_check.DRY_PLAN, torch.device("cpu"), time_limit=100.0,
                               budgets=gpu_check.DRY_BUDGETS, only=["parity", "generation_compile", "train_compile"])
    assert parts["parity"]["status"] == "error" and "illegal memory access" in parts["parity"]["error"]
    assert parts["train_compile"]["status"] == "ok"
    rows = gpu_check.summary_rows(parts)
    assert rows[0][:2] == ["parity", "error"]


def test_a_part_over_its_budget_is_stopped(monkeypatch):
    def slow(plan, device):
        import time

        time.sleep(5)
        return {}

    monkeypatch.setitem(gpu_check.PARTS, "parity", slow)
    parts = gpu_check.run_plan(gpu_check.DRY_PLAN, torch.device("cpu"), time_limit=100.0,
                               budgets={**gpu_check.DRY_BUDGETS, "parity": 1}, only=["parity"])
    assert parts["parity"]["status"] == "error" and "over its budget of 1 s" in parts["parity"]["error"]
    assert parts["parity"]["seconds"] < 4


def test_the_gpu_run_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
