"""Hyperparameter sweeps over any training script with Optuna (Akiba et al., 2019): TPE (Bergstra et
al., 2011) by default, random or grid search, per-epoch median pruning, resumable, several trials at
once on several GPUs.

Each trial is the training script run as a SUBPROCESS (scripts are never imported) with the fixed
flags, the trial's parameter flags (experiments/space.py), `--run_dir OUT/trial-NNN` and
`--sweep_control OUT/trial-NNN/sweep`; the trial reports every epoch there (training/pruning.py) and
this process answers with the pruner's decision.  A trial's score is the sweep metric at the epoch
its run kept (the trainer's best epoch), read from its metrics.jsonl (experiments/runs.py).

Files in OUT:
    study.journal   Optuna's journal storage: the sweep's state; a new `run_sweep` on the same OUT
                    continues it (trials a killed sweep left running are recorded as interrupted and
                    tried again with the same parameters)
    sweep.json      the settings; a resumed sweep must share them (trials and parallelism may change)
    results.csv     one row per trial: number, status, metric, parameters, best epoch, seconds, run dir,
                    error (rewritten after every trial)
    best.json       the best complete trial: value, parameters, run dir, the command that reproduces it
    trial-NNN/      the trial's run directory (+ trial.log with its output, sweep/ the pruning files)
With --parallel each slot's trial sees only its device (CUDA_VISIBLE_DEVICES; "" for a cpu slot, and
trials sharing the CPU split its cores with OMP_NUM_THREADS unless it is set).
A failed trial (non-zero exit, no metric) is recorded with the last line of its output; the sweep
goes on.
"""
from __future__ import annotations

import csv
import io
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from common.errors import UserError
from common.io import atomic_write_json, atomic_write_text
from experiments.runs import find_runs, lookup, metric_names
from experiments.space import flags_for, grid, grid_size
from experiments.sweep_spec import PRUNERS, SAMPLERS, SweepSpec, default_devices  # noqa: F401  (sweep.py's names)
from training import pruning

POLL_SECONDS = 0.1
STUDY_NAME = "sweep"


@dataclass
class Trial:
    """One trial's running process."""
    trial: object  # optuna.Trial
    dir: Path
    proc: subprocess.Popen
    log: io.TextIOBase
    command: list[str]
    slot: int
    started: float = field(default_factory=time.time)
    task: Optional[str] = None
    pruned: bool = False
    error: Optional[str] = None
    handled: set = field(default_factory=set)  # report files answered

    @property
    def control(self) -> Path:
        return self.dir / "sweep"


class Sweep:
    """A study in `spec.out`, driven trial by trial (`run` loops until the wanted trials finished)."""

    def __init__(self, spec: SweepSpec, pruner=None, say: Callable[[str], None] = print):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        spec.validate()
        self.spec, self.say = spec, say
        self.space = spec.parsed_space()
        self.out = Path(spec.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._check_settings()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = JournalStorage(JournalFileBackend(str(self.out / "study.journal")))
        self.study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=spec.direction,
                                         sampler=self._sampler(spec.seed), pruner=pruner or self._pruner(),
                                         load_if_exists=True)
        # A resumed sweep's random draws must not replay the first session's: seed + trials so far.  (Not
        # the grid: its trials store grid ids into the seed's shuffled grid, which must stay the same.)
        if spec.sampler != "grid":
            self.study.sampler = self._sampler(spec.seed + len(self.study.get_trials(deepcopy=False)))
        self.target = spec.trials if spec.sampler != "grid" else min(spec.trials or grid_size(self.space),
                                                                      grid_size(self.space))
        self.devices = spec.devices if spec.devices is not None else default_devices(spec.parallel)

    def _lock(self) -> None:
        from training.rundir import RunDirBusy, lock_run_dir

        try:
            lock_run_dir(self.out)
        except RunDirBusy as exc:
            raise UserError(str(exc).replace("choose another --run_dir", "choose another --out")) from None

    def _check_settings(self) -> None:
        path, now = self.out / "sweep.json", self.spec.signature()
        if path.is_file():
            import json

            saved = json.loads(path.read_text(encoding="utf-8"))
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if diff:
                shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
                raise UserError(f"{self.out} holds a sweep with other settings ({shown}); continue it with the same "
                                f"ones, or choose another --out")
        else:
            atomic_write_json(path, now)

    def _sampler(self, seed: int):
        import optuna

        if self.spec.sampler == "grid":
            return _grid_sampler(grid(self.space), seed)
        if self.spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def _pruner(self):
        import optuna

        if self.spec.pruner == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=self.spec.prune_startup_trials,
                                           n_warmup_steps=self.spec.prune_warmup_epochs)

    # ---- the loop ---------------------------------------------------------------------------
    def counted(self) -> int:
        """Trials that count toward the target: finished ones, interrupted ones left out."""
        from optuna.trial import TrialState

        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))

    def recover_interrupted(self) -> None:
        """Trials a killed sweep left RUNNING: recorded as interrupted, their parameters queued again."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            self.study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the sweep stopped while it ran")
            self.study.tell(t.number, state=TrialState.FAIL)
            self.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            self.say(f"[sweep] trial {t.number} was interrupted; its parameters are queued again")

    def run(self) -> dict:
        self.recover_interrupted()
        running: dict[int, Trial] = {}
        slots = list(range(len(self.devices) if self.devices else 1))
        try:
            while True:
                free = [s for s in slots if s not in {t.slot for t in running.values()}]
                while free and self.counted() + len(running) < self.target:
                    trial = self._start(free.pop(0))
                    running[trial.trial.number] = trial
                for number, trial in list(running.items()):
                    self._answer_reports(trial)
                    if trial.proc.poll() is not None:
                        self._answer_reports(trial)
                        self._finish(trial)
                        del running[number]
                if not running and self.counted() >= self.target:
                    break
                time.sleep(POLL_SECONDS)
        except BaseException:
            for trial in running.values():  # ^C: stop the trials; the resumed sweep tries them again
                trial.proc.terminate()
            for trial in running.values():
                trial.proc.wait()
                trial.log.close()
            raise
        finally:
            self.write_results()
        return self.best() or {}

    def _start(self, slot: int) -> Trial:
        trial = self.study.ask({name: p.distribution() for name, p in self.space.items()})
        directory = self.out / f"trial-{trial.number:03d}"
        command = [self.spec.python, self.spec.script, *self.spec.fixed, *flags_for(trial.params),
                   "--run_dir", str(directory), "--sweep_control", str(directory / "sweep")]
        if "--no_progress" not in self.spec.fixed:
            command.append("--no_progress")
        env = dict(os.environ)
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = "" if self.devices[slot] == "cpu" else self.devices[slot]
            cpu_slots = self.devices.count("cpu")
            if self.devices[slot] == "cpu" and cpu_slots > 1 and "OMP_NUM_THREADS" not in env:
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_slots))  # share the cores
        directory.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("command", command)
        trial.set_user_attr("run_dir", str(directory))
        trial.set_user_attr("started", round(time.time(), 3))
        log = open(directory / "trial.log", "w", encoding="utf-8")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        where = f" on {'cpu' if self.devices[slot] == 'cpu' else 'cuda:' + self.devices[slot]}" if self.devices else ""
        self.say(f"[sweep] trial {trial.number}{where}: {shown}")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return Trial(trial, directory, proc, log, command, slot)

    def _answer_reports(self, t: Trial) -> None:
        """Answer each epoch report of the trial with the pruner's decision."""
        if not t.control.is_dir():
            return
        for path in sorted(t.control.glob("report-*.json")):
            if path.name in t.handled:
                continue
            report = pruning.read_json(path)
            if report is None:
                continue
            t.handled.add(path.name)
            task, epoch = report["task"], int(report["epoch"])
            prune, reason = self._decide(t, task, epoch, report.get("metrics") or {})
            pruning.write_decision(t.control, task, epoch, prune, reason)

    def _decide(self, t: Trial, task: str, epoch: int, metrics: dict) -> tuple[bool, str]:
        if (self.spec.task or t.task or task) != task:
            return False, f"epochs of task {task} are not scored (sweep task {self.spec.task or t.task})"
        t.task = task
        value = lookup({"dev": metrics}, self.spec.metric)
        if value is None:
            t.error = (f"metric {self.spec.metric}: not among the dev metrics of task {task} "
                       f"({', '.join(metric_names({'dev': metrics})) or 'none'})")
            return True, t.error
        t.trial.report(value, epoch)
        if t.trial.should_prune():
            t.pruned = True
            return True, f"{self.spec.metric} {value:.4g} after epoch {epoch}: worse than the median of earlier trials"
        return False, ""

    def _finish(self, t: Trial) -> None:
        from optuna.trial import TrialState

        t.log.close()
        seconds = time.time() - t.started
        t.trial.set_user_attr("seconds", round(seconds, 1))
        value, best_epoch, epochs = None, None, 0
        if t.error is None and t.proc.returncode != 0:
            t.error = f"exit status {t.proc.returncode}: {last_line(t.dir / 'trial.log')}"
        if t.error is None:
            value, best_epoch, epochs, t.error = self._score(t)
        t.trial.set_user_attr("best_epoch", best_epoch)
        t.trial.set_user_attr("epochs", epochs)
        if t.error is not None:
            t.trial.set_user_attr("error", t.error)
            self.study.tell(t.trial, state=TrialState.FAIL)
            self.say(f"[sweep] trial {t.trial.number} failed after {seconds:.0f} s: {t.error}")
        elif t.pruned:
            self.study.tell(t.trial, state=TrialState.PRUNED)
            self.say(f"[sweep] trial {t.trial.number} pruned after epoch {epochs} ({seconds:.0f} s)")
        else:
            self.study.tell(t.trial, value)
            self.say(f"[sweep] trial {t.trial.number}: {self.spec.metric} {value:.4f} (best epoch {best_epoch}, "
                     f"{seconds:.0f} s)")
        self.write_results()

    def _score(self, t: Trial):
        """(value at the kept epoch, best epoch, epochs trained, error) of a trial that exited 0."""
        try:
            runs = [r for r in find_runs([t.dir]) if r.epochs]
        except UserError as exc:
            return None, None, 0, str(exc)
        tasks = sorted({r.task for r in runs})
        wanted = self.spec.task or t.task or (tasks[0] if len(tasks) == 1 else None)
        if wanted is None:
            return None, None, 0, f"the run trained tasks {', '.join(tasks) or 'none'}; choose one with --task"
        chosen = [r for r in runs if r.task == wanted]
        if not chosen:
            return None, None, 0, f"no epoch of task {wanted} in {t.dir} (tasks: {', '.join(tasks) or 'none'})"
        run = chosen[0]
        value = run.value_at_best(self.spec.metric)
        if value is None:
            names = metric_names(run.epochs[-1])
            return None, None, len(run.epochs), f"metric {self.spec.metric} not in the epoch records ({', '.join(names)})"
        return value, run.best_epoch(), len(run.epochs), None

    # ---- results ----------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        out = []
        for t in self.study.get_trials(deepcopy=False):
            status = "interrupted" if t.user_attrs.get("interrupted") else t.state.name.lower()
            row = {"trial": t.number, "status": status, self.spec.metric: "" if t.value is None else t.value}
            row.update({f"--{name}": t.params.get(name, "") for name in self.space})
            row.update(best_epoch=t.user_attrs.get("best_epoch", ""), epochs=t.user_attrs.get("epochs", ""),
                       seconds=t.user_attrs.get("seconds", ""), run_dir=t.user_attrs.get("run_dir", ""),
                       error=t.user_attrs.get("error", ""))
            out.append({k: "" if v is None else v for k, v in row.items()})
        return out

    def best(self) -> Optional[dict]:
        from optuna.trial import TrialState

        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        b = self.study.best_trial
        return {"trial": b.number, "metric": self.spec.metric, "direction": self.spec.direction, "value": b.value,
                "params": b.params, "run_dir": b.user_attrs.get("run_dir"), "command": b.user_attrs.get("command"),
                "complete_trials": len(done)}

    def write_results(self) -> None:
        rows = self.rows()
        if rows:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(self.out / "results.csv", buf.getvalue())
        best = self.best()
        if best:
            atomic_write_json(self.out / "best.json", best)


def _grid_sampler(search_space: dict, seed: int):
    """Optuna's GridSampler for an ask-and-tell loop: its `after_trial` calls `study.stop()`, which only
    works inside `study.optimize`; here the loop itself stops at the grid's size."""
    from optuna.samplers import GridSampler

    class AskTellGridSampler(GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return AskTellGridSampler(search_space, seed=seed)


def last_line(path: Path) -> str:
    """The last non-empty line of a trial's output (the one-line error of entry_point, or a traceback's)."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "(no output)"
    return lines[-1][:300] if lines else "(no output)"


def run_sweep(spec: SweepSpec, pruner=None, say: Callable[[str], None] = print) -> dict:
    """Run (or continue) the sweep of `spec`; returns best.json's content ({} when no trial completed)."""
    return Sweep(spec, pruner, say).run()
