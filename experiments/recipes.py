"""Recipes: one TOML file per experiment (recipes/*.toml), run start to end by recipe.py, ending with
its report.py table.  Every step is a script run as a subprocess, so a recipe is exactly the commands
a researcher would type (printed before each step).

    title = "LoRA rank sweep on SST"
    about = "what it reproduces"
    out = "runs/recipes/lora_ranks"                    # where every step's run directory goes
    [smoke]                                           # --smoke: CPU scale
    out = "runs/recipes-smoke/lora_ranks"
    flags = ["--model_size", "tiny", "--device", "cpu", "--epochs", "1", "--limit", "32"]
    [[steps]]
    name = "full"                                     # run directory OUT/full (train steps)
    script = "classifier.py"
    flags = ["--datasets", "sst", "--fine-tune-mode", "full-model", "--device", "cuda"]
    smoke_flags = ["--batch_size", "4"]               # this step's own --smoke overrides (optional)
    smoke_sweep = {space = "lora_r=choice(4,8) seed=choice(1)"}   # a sweep step's --smoke overrides
    [[steps]]
    name = "lora"
    script = "classifier.py"
    sweep = {space = "lora_r=choice(4,8,16) seed=choice(1,2,3)", sampler = "grid", metric = "dev_accuracy"}
    [[steps]]
    name = "synth"
    kind = "command"                                  # no run directory: a data step
    script = "impossible_distillation.py"
    flags = ["build", "--filtered", "{out}/filtered.jsonl", "--out", "{out}/synthetic.csv"]
    creates = "{out}/synthetic.csv"                   # skipped when it exists
    [report]
    steps = ["full", "lora"]                          # whose runs are compared (default: train and sweep steps)
    group_by = "lora_r"
    metric = "dev_accuracy"

Step kinds: `train` (default; `--run_dir OUT/NAME`; skipped when finished, continued with --resume when
interrupted), `sweep` (sweep.py with `--out OUT/NAME`; continues itself), `command`.  `{out}` in flags is
the recipe's output directory.  Under --smoke the recipe's smoke flags, then the step's, replace the
flags of the same name (or are appended); smoke flags apply to train and sweep steps only; smoke steps
run with OMP_NUM_THREADS=1 unless it is set.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from common.errors import ConfigError, DataError, UserError
from experiments.runs import find_runs

KINDS = ("train", "sweep", "command")


def split_flags(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """["--a", "1", "2", "--b", "pos"] -> [("--a", ["1", "2"]), ("--b", ["pos"])]; leading positional
    tokens (a sub-command) are kept under the key ""."""
    out: list[tuple[str, list[str]]] = []
    for tok in tokens:
        is_flag = tok.startswith("--") and tok != "--"
        if is_flag:
            out.append((tok, []))
        elif out:
            out[-1][1].append(tok)
        else:
            out.append(("", [tok]))
    return out


def merge_flags(base: list[str], overrides: list[str]) -> list[str]:
    """`base` with every flag of `overrides` replacing the same flag (its values too), new ones appended."""
    merged = split_flags(base)
    for flag, values in split_flags(overrides):
        for i, (name, _) in enumerate(merged):
            if name == flag and flag:
                merged[i] = (flag, values)
                break
        else:
            merged.append((flag, values))
    return [t for flag, values in merged for t in ([flag] if flag else []) + values]


@dataclass
class Step:
    name: str
    script: str
    kind: str = "train"
    flags: list[str] = field(default_factory=list)
    smoke_flags: list[str] = field(default_factory=list)
    sweep: dict = field(default_factory=dict)
    smoke_sweep: dict = field(default_factory=dict)  # --smoke: replaces entries of `sweep` (a smaller space)
    creates: Optional[str] = None


@dataclass
class Recipe:
    path: Path
    title: str
    about: str
    out: str
    steps: list[Step]
    report: dict
    smoke: dict

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: no such recipe (see recipes/)") from None
        except tomllib.TOMLDecodeError as exc:
            raise DataError(f"{path}: not valid TOML: {exc}") from None
        steps = []
        for i, raw in enumerate(data.get("steps", [])):
            unknown = set(raw) - set(Step.__dataclass_fields__)
            if unknown or "name" not in raw or "script" not in raw:
                raise DataError(f"{path}: step {i + 1} needs name and script (unknown keys: {sorted(unknown)})")
            kind = raw.get("kind", "sweep" if "sweep" in raw else "train")
            if kind not in KINDS:
                raise DataError(f"{path}: step {raw['name']}: kind {kind!r} is not one of {', '.join(KINDS)}")
            steps.append(Step(**{**raw, "kind": kind}))
        if not steps or "out" not in data:
            raise DataError(f"{path}: a recipe needs out and at least one [[steps]]")
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise DataError(f"{path}: step names repeat: {names}")
        return cls(path, data.get("title", path.stem), data.get("about", ""), data["out"], steps,
                   data.get("report", {}), data.get("smoke", {}))


def step_command(recipe: Recipe, step: Step, out: Path, smoke: bool, python: str = sys.executable) -> list[str]:
    def fill(tokens: list[str]) -> list[str]:
        return [t.replace("{out}", str(out)) for t in tokens]

    flags = fill(step.flags)
    if smoke and step.kind != "command":
        flags = merge_flags(merge_flags(flags, fill(recipe.smoke.get("flags", []))), fill(step.smoke_flags))
    elif smoke:
        flags = merge_flags(flags, fill(step.smoke_flags))
    target = out / step.name
    if step.kind == "command":
        return [python, step.script, *flags]
    if step.kind == "sweep":
        s = {**step.sweep, **(step.smoke_sweep if smoke else {})}
        own = ["--script", step.script, "--space", s["space"], "--metric", s["metric"], "--out", str(target)]
        for key in ("sampler", "trials", "direction", "task", "pruner", "parallel", "devices", "seed",
                    "prune_startup_trials", "prune_warmup_epochs"):
            if key in s:
                own += [f"--{key}", str(s[key])]
        return [python, "sweep.py", *own, "--", *flags]
    return [python, step.script, *flags, *run_dir_flags(target)]


def run_dir_flags(target: Path) -> list[str]:
    """--run_dir for a new run, --resume for one a previous attempt left unfinished."""
    if target.is_dir() and any(target.rglob("last.pt")):
        return ["--resume", str(target)]
    return ["--run_dir", str(target)]


def step_env(smoke: bool) -> dict:
    """The environment of a step: at smoke scale one intra-op thread (tiny models gain nothing from more,
    and on a busy small machine threads spin-waiting for each other make tiny steps many times slower)."""
    env = dict(os.environ)
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def finished(step: Step, target: Path, out: Path) -> bool:
    if step.kind == "command":
        return bool(step.creates) and Path(step.creates.replace("{out}", str(out))).exists()
    if step.kind == "train" and target.is_dir():
        try:
            runs = find_runs([target])
        except UserError:
            return False
        return all(r.done for r in runs)
    return False  # a sweep decides itself what is left


def run_recipe(path: str | Path, *, smoke: bool = False, out: Optional[str] = None, dry_run: bool = False,
               say: Callable[[str], None] = print, python: str = sys.executable) -> Optional[str]:
    """Run every step (skipping finished ones), then write OUT/report/report.md; returns its tables."""
    from experiments.report import write_report

    recipe = Recipe.load(path)
    out_dir = Path(out or (recipe.smoke.get("out", recipe.out + "-smoke") if smoke else recipe.out))
    say(f"# {recipe.title}{' (smoke)' if smoke else ''}: {out_dir}")
    for step in recipe.steps:
        target = out_dir / step.name
        command = step_command(recipe, step, out_dir, smoke, python)
        if finished(step, target, out_dir):
            say(f"## {step.name}: finished already ({target if step.kind != 'command' else step.creates}); skipped")
            continue
        say(f"## {step.name}\n$ {shlex.join(['python', *command[1:]])}")
        if dry_run:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, env=step_env(smoke))
        if done.returncode != 0:
            raise UserError(f"recipe {recipe.path.name}: step {step.name} failed (exit status {done.returncode}); "
                            f"fix it and run the recipe again (finished steps are skipped)")
    if dry_run:
        return None
    report = recipe.report
    names = report.get("steps") or [s.name for s in recipe.steps if s.kind != "command"]
    unknown = [n for n in names if n not in {s.name for s in recipe.steps}]
    if unknown:
        raise ConfigError("report", f"{recipe.path}: [report] steps {unknown} are not steps of the recipe")
    runs = find_runs([out_dir / n for n in names])
    report_dir = out_dir / "report"
    flags = report.get("flags")
    md, tables = write_report(runs, report_dir, metric=report.get("metric"), group_by=report.get("group_by"),
                              title=recipe.title + (" (smoke)" if smoke else ""),
                              flags=None if flags is None else [f if f.startswith("--") else f"--{f}" for f in flags])
    say(f"\n{tables}\n\nreport: {md}")
    return tables
