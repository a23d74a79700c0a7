"""sweep.py / experiments/sweep.py: the --space grammar, the trial <-> sweep pruning protocol, pruned
and failed trials, parallel slots, resumption after a kill, and a real 3-trial sweep of classifier.py
from the command line followed by its report."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from common.errors import ConfigError, UserError
from common.io import read_jsonl_log
from experiments.space import flags_for, grid_points, grid_size, parse_space
from experiments.sweep import Sweep, SweepSpec, run_sweep
from training import pruning

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "tests" / "sweep_toy_script.py")
QUIET = lambda *_: None  # noqa: E731

pytestmark = pytest.mark.usefixtures("one_thread_subprocesses")

def read_results(out) -> list[dict]:
    with open(Path(out) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- the space -------------------------------------------------------------------------------
def test_space_grammar_distributions_grid_and_flags():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = parse_space("lr=loguniform(1e-5, 1e-3) batch_size=choice(8,16,32) lora_r=int(4,16,4) "
                        "mode=choice('last, linear', full-model) pack=choice(true,false) wd=uniform(0,0.1)")
    assert space["lr"].distribution() == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["wd"].distribution() == FloatDistribution(0.0, 0.1)
    assert space["batch_size"].distribution() == CategoricalDistribution((8, 16, 32))
    assert space["lora_r"].distribution() == IntDistribution(4, 16, step=4)
    assert space["mode"].args == ("last, linear", "full-model")
    assert space["pack"].args == (True, False)
    small = {k: space[k] for k in ("batch_size", "lora_r", "pack")}
    assert grid_size(small) == 3 * 4 * 2 and len(grid_points(small)) == 24
    assert grid_points(small)[0] == {"batch_size": 8, "lora_r": 4, "pack": True}
    assert flags_for({"lr": 1e-05, "pack": True, "freeze": False, "mode": "full-model", "r": 4}) == \
        ["--lr", "1e-05", "--pack", "--mode", "full-model", "--r", "4"]


@pytest.mark.parametrize("text, message", [
    ("lr=gauss(1,2)", "unknown kind"),
    ("lr=uniform(2,1)", "low must be < high"),
    ("lr=loguniform(0,1)", "low must be > 0"),
    ("r=int(1,10,4)", "multiple of step"),
    ("r=int(1.5,3)", "integers expected"),
    ("r=choice(1,1)", "repeated"),
    ("r=choice(1) r=choice(2)", "given twice"),
    ("lr 1e-3", "cannot read"),
    ("", "is empty"),
])
def test_space_errors_name_the_parameter(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_space(text)
    assert info.value.field == "space"


def test_spec_validation(tmp_path):
    base = dict(script=TOY, metric="dev_score", out=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="no grid"):
        SweepSpec(space="lr=loguniform(1e-4,1e-2)", sampler="grid", **base).validate()
    with pytest.raises(ConfigError, match="required with the tpe sampler"):
        SweepSpec(space="lr=choice(1e-3)", **base).validate()
    with pytest.raises(ConfigError, match="--lr, --run_dir: set by the sweep itself"):
        SweepSpec(space="lr=choice(1e-3)", trials=1, fixed=["--run_dir", "x", "--lr", "1"], **base).validate()
    with pytest.raises(ConfigError, match="one per trial slot"):
        SweepSpec(space="lr=choice(1e-3)", trials=1, parallel=2, devices=["cpu"], **base).validate()
    with pytest.raises(ConfigError, match="no such file"):
        SweepSpec(space="lr=choice(1e-3)", trials=1, **{**base, "script": "nope.py"}).validate()


# ---- the protocol ----------------------------------------------------------------------------
def fake_trainer(name="toy"):
    return types.SimpleNamespace(task=types.SimpleNamespace(name=name))


def test_reporter_writes_the_epoch_and_obeys_the_decision(tmp_path):
    reporter = pruning.SweepReporter(tmp_path)

    def sweep_side():
        while not pruning.report_path(tmp_path, "toy", 3).exists():
            time.sleep(0.01)
        report = pruning.read_json(pruning.report_path(tmp_path, "toy", 3))
        pruning.write_decision(tmp_path, "toy", 3, report["metrics"]["score"] < 1, "low score")

    thread = threading.Thread(target=sweep_side)
    thread.start()
    assert reporter.on_epoch_end(fake_trainer(), 3, {"score": 0.5, "note": "text"}) is True
    thread.join()
    assert pruning.read_json(pruning.report_path(tmp_path, "toy", 3))["metrics"] == {"score": 0.5}
    pruning.write_decision(tmp_path, "toy", 4, False)
    assert reporter.on_epoch_end(fake_trainer(), 4, {"score": 2.0}) is False


def test_reporter_trains_on_when_the_sweep_is_gone(tmp_path):
    reporter = pruning.SweepReporter(tmp_path)
    reporter._parent = -1  # not our parent: the sweep died
    started = time.monotonic()
    assert reporter.on_epoch_end(fake_trainer(), 1, {"score": 0.1}) is False
    assert time.monotonic() - started < 5
    assert pruning.SweepReporter(tmp_path, wait_seconds=0.2).on_epoch_end(fake_trainer(), 2, {"score": 1}) is False


# ---- whole sweeps on the toy script ------------------------------------------------------------
def toy_spec(out, **kw) -> SweepSpec:
    base = dict(script=TOY, space="lr=choice(1e-5,1e-3,1e-1)", metric="dev_score", out=str(out),
                fixed=["--device", "cpu", "--epochs", "3", "--fail_above_lr", "0.05"], trials=3, pruner="median",
                prune_startup_trials=1)
    return SweepSpec(**{**base, **kw})


def test_pruned_failed_and_complete_trials_are_recorded(tmp_path):
    sweep = Sweep(toy_spec(tmp_path / "s"), say=QUIET)
    for lr in (1e-3, 1e-5, 1e-1):  # best first, then one the median rule stops, then one that crashes
        sweep.study.enqueue_trial({"lr": lr})
    best = sweep.run()
    rows = read_results(tmp_path / "s")
    assert [r["status"] for r in rows] == ["complete", "pruned", "fail"]
    assert float(rows[0]["dev_score"]) == pytest.approx(12.0) and rows[0]["best_epoch"] == "3"
    assert rows[1]["epochs"] == "1" and float(rows[1]["dev_score"]) == 2.0  # its last reported value
    assert "exit status 2" in rows[2]["error"] and "above --fail_above_lr" in rows[2]["error"]
    pruned = read_jsonl_log(tmp_path / "s" / "trial-001" / "metrics.jsonl")
    assert [r["epoch"] for r in pruned if r["event"] == "epoch"] == [1]
    assert [r["reason"] for r in pruned if r["event"] == "early_stop"] == ["SweepReporter ended training"]
    saved = json.loads((tmp_path / "s" / "best.json").read_text())
    assert saved == best and best["trial"] == 0 and best["params"] == {"lr": 1e-3} and best["value"] == 12.0
    assert best["command"][1] == TOY and "--sweep_control" in best["command"]


def test_parallel_slots_run_trials_side_by_side(tmp_path):
    spec = toy_spec(tmp_path / "p", space="lr=choice(1e-3,1e-2)", sampler="grid", trials=None, pruner="none",
                    parallel=2, devices=["cpu", "cpu"], fixed=["--device", "cpu", "--epochs", "1"])
    sweep = Sweep(spec, say=QUIET)
    sweep.run()
    assert [r["status"] for r in read_results(tmp_path / "p")] == ["complete", "complete"]
    first, second = sweep.study.trials
    # the second trial started before the first one ended: side by side, not one after the other
    assert second.user_attrs["started"] < first.user_attrs["started"] + first.user_attrs["seconds"]
    assert {r["--lr"] for r in read_results(tmp_path / "p")} == {"0.001", "0.01"}  # the grid, each point once


def test_a_sweep_continues_where_it_stopped(tmp_path):
    out = tmp_path / "r"
    spec = toy_spec(out, pruner="none", fixed=["--device", "cpu", "--epochs", "1"], sampler="grid", trials=1,
                    space="lr=choice(1e-4,1e-3,1e-2)")
    run_sweep(spec, say=QUIET)
    first = (out / "trial-000" / "metrics.jsonl").stat().st_mtime_ns
    # a trial left RUNNING by a killed sweep (asked, never told)
    sweep = Sweep(SweepSpec(**{**spec.__dict__, "trials": 3}), say=QUIET)
    stale = sweep.study.ask({"lr": parse_space(spec.space)["lr"].distribution()})
    spec3 = SweepSpec(**{**spec.__dict__, "trials": 3})
    run_sweep(spec3, say=QUIET)
    rows = read_results(out)
    assert [r["status"] for r in rows] == ["complete", "interrupted", "complete", "complete"]
    assert rows[1]["--lr"] == rows[2]["--lr"] == repr(stale.params["lr"])  # retried with the same parameters
    assert len({r["--lr"] for r in rows}) == 3  # the grid, each point once
    assert (out / "trial-000" / "metrics.jsonl").stat().st_mtime_ns == first  # not re-run
    with pytest.raises(UserError, match="metric: saved 'dev_score', now 'dev_other'"):
        Sweep(SweepSpec(**{**spec.__dict__, "metric": "dev_other"}), say=QUIET)


def test_killed_sweep_resumes_from_the_command_line(tmp_path):
    out = tmp_path / "k"
    cmd = [sys.executable, str(ROOT / "sweep.py"), "--script", TOY, "--trials", "2", "--metric", "dev_score",
           "--space", "lr=loguniform(1e-4,1e-2)", "--out", str(out), "--pruner", "none", "--",
           "--device", "cpu", "--epochs", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "trial-000" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and any(r["event"] == "epoch" for r in read_jsonl_log(log))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its trial, mid-trial
    proc.wait()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trial 0 was interrupted" in done.stdout
    rows = read_results(out)
    assert [r["status"] for r in rows] == ["interrupted", "complete", "complete"]
    assert rows[0]["--lr"] == rows[1]["--lr"]  # the interrupted trial, tried again
    assert rows[2]["--lr"] != rows[0]["--lr"]  # the resumed sampler does not replay the first session's draws
    assert json.loads((out / "best.json").read_text())["complete_trials"] == 2
