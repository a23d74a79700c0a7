"""Run reports: runs (experiments/runs.py) -> a Markdown comparison table and matplotlib figures, the
tables and curves of a CS224N report (accuracy / loss per epoch, decoding strategies, LoRA ranks,
sparse vs dense attention, pretraining).

    table     one row per run: the flags that differ between the runs, status, best epoch / epochs,
              the dev metrics at the kept epoch, train time (the epochs' training seconds), wall time,
              trainable parameters, peak memory
    grouped   with `group_by` (a flag such as lora_r, attention, decoding): per value of the flag the
              number of runs, the mean and sample standard deviation of the metric (seeds averaged),
              and the mean train time and peak memory
    figures   train_loss.png (train loss per optimiser step, the trainer's `step` records, one line per
              run), dev_<metric>.png (the metric per epoch), best_<metric>.png (bars of the metric at
              the kept epoch; with group_by the means with std error bars)
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

from common.errors import ConfigError
from common.io import atomic_write_text
from experiments.runs import Run, lookup, metric_names

MAX_FLAG_COLUMNS = 10
MAX_LEGEND = 12


def fmt(value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, list):
        return " ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def default_metric(runs: Sequence[Run]) -> str:
    """The metric that picked the runs' best epochs when they share one, else the first dev metric."""
    chosen = {r.selection_metric for r in runs if r.selection_metric}
    if len(chosen) == 1:
        return chosen.pop()
    for run in runs:
        if run.epochs:
            names = [n for n in metric_names(run.epochs[-1]) if n.startswith("dev_")]
            if names:
                return names[0]
    raise ConfigError("metric", "the runs have no epoch with a dev metric; name one (e.g. dev_accuracy)")


def differing_flags(runs: Sequence[Run]) -> list[str]:
    """Flags whose value is not the same in every run (a flag missing from a run counts as differing)."""
    keys = sorted({k for r in runs for k in r.flags})
    if len(runs) < 2:
        return []
    return [k for k in keys if len({repr(r.flags.get(k, "<absent>")) for r in runs}) > 1]


def dev_metric_names(runs: Sequence[Run]) -> list[str]:
    out: list[str] = []
    for run in runs:
        for e in run.epochs[-1:]:
            out += [n for n in metric_names(e) if n.startswith("dev_") and n not in out]
    return out


def label(run: Run, flags: Sequence[str]) -> str:
    shown = ", ".join(f"{k.lstrip('-')}={fmt(run.flags.get(k))}" for k in flags[:3])
    return f"{run.name} ({shown})" if shown else run.name


def _mib(value) -> Optional[float]:
    return None if value is None else value / 2**20


def table(runs: Sequence[Run], metric: str, flags: Optional[Sequence[str]] = None) -> str:
    """The comparison table (Markdown)."""
    flags = list(differing_flags(runs) if flags is None else flags)
    note = ""
    if len(flags) > MAX_FLAG_COLUMNS:
        note = f"\n\n({len(flags) - MAX_FLAG_COLUMNS} more differing flags not shown: {', '.join(flags[MAX_FLAG_COLUMNS:])})"
        flags = flags[:MAX_FLAG_COLUMNS]
    metrics = [metric] + [m for m in dev_metric_names(runs) if m != metric]
    head = ["run", *flags, "status", "best epoch / epochs", *metrics, "train s", "wall s", "trainable params",
            "peak memory MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for run in runs:
        mem, kind = run.peak_memory()
        wall = run.wall_seconds()
        cells = [run.name, *(fmt(run.flags.get(k)) for k in flags), run.status,
                 f"{fmt(run.best_epoch())} / {len(run.epochs)}", *(fmt(run.value_at_best(m)) for m in metrics),
                 f"{run.train_seconds():.1f}", f"{wall:.1f}" if wall is not None else "–",
                 f"{run.trainable_params:,}" if run.trainable_params is not None else "–",
                 f"{_mib(mem):.0f} ({kind})" if mem is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + note


def groups(runs: Sequence[Run], flag: str) -> dict:
    """{value of `flag`: [runs]} in the flag's value order (numbers ascending)."""
    key = flag if flag.startswith("--") else f"--{flag}"
    if not any(key in r.flags for r in runs):
        known = sorted({k for r in runs for k in r.flags})
        raise ConfigError("group_by", f"{flag}: no run has this flag (they have {', '.join(known[:30])})")
    out: dict = {}
    for run in runs:
        out.setdefault(run.flags.get(key), []).append(run)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in out)
    return dict(sorted(out.items(), key=lambda kv: kv[0] if numeric else str(kv[0])))


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def group_table(runs: Sequence[Run], flag: str, metric: str) -> str:
    name = flag.lstrip("-")
    lines = [f"| {name} | runs | {metric} mean | {metric} std | train s mean | peak memory MiB mean |",
             "|---|---:|---:|---:|---:|---:|"]
    for value, members in groups(runs, flag).items():
        vals = [v for v in (r.value_at_best(metric) for r in members) if v is not None]
        mean, std = mean_std(vals)
        mems = [m for m in (r.peak_memory()[0] for r in members) if m is not None]
        lines.append(f"| {fmt(value)} | {len(members)} | {fmt(mean)} | {fmt(std)} | "
                     f"{statistics.fmean(r.train_seconds() for r in members):.1f} | "
                     f"{fmt(_mib(statistics.fmean(mems)) if mems else None)} |")
    return "\n".join(lines)


# ---- figures ------------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=80)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, legend: bool) -> Path:
    if legend and len(ax.get_legend_handles_labels()[0]) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_train_loss(runs: Sequence[Run], path: Path, flags: Sequence[str] = ()) -> Optional[Path]:
    with_steps = [r for r in runs if r.steps]
    if not with_steps:
        return None
    plt, fig, ax = _figure()
    for run in with_steps:
        ax.plot([s["step"] for s in run.steps], [s.get("train_loss") for s in run.steps], label=label(run, flags),
                marker="." if len(run.steps) < 30 else None)
    ax.set(xlabel="optimiser step", ylabel="train loss", title="train loss per step")
    return _save(plt, fig, ax, path, legend=True)


def plot_dev_metric(runs: Sequence[Run], metric: str, path: Path, flags: Sequence[str] = ()) -> Optional[Path]:
    with_epochs = [r for r in runs if r.epochs]
    if not with_epochs:
        return None
    plt, fig, ax = _figure()
    for run in with_epochs:
        points = [(e["epoch"], lookup(e, metric)) for e in run.epochs]
        points = [(x, y) for x, y in points if y is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label(run, flags))
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(plt, fig, ax, path, legend=True)


def plot_best(runs: Sequence[Run], metric: str, path: Path, group_by: Optional[str] = None) -> Optional[Path]:
    if group_by:
        bars = []
        for value, members in groups(runs, group_by).items():
            mean, std = mean_std([v for v in (r.value_at_best(metric) for r in members) if v is not None])
            bars.append((fmt(value), mean, std or 0.0))
        xlabel = group_by.lstrip("-")
    else:
        bars = [(r.name, r.value_at_best(metric), 0.0) for r in runs]
        xlabel = "run"
    bars = [(n, v, s) for n, v, s in bars if v is not None and math.isfinite(v)]
    if not bars:
        return None
    plt, fig, ax = _figure()
    ax.bar(range(len(bars)), [v for _, v, _ in bars], yerr=[s for _, _, s in bars] if group_by else None,
           capsize=4, color="tab:blue")
    ax.set_xticks(range(len(bars)), [n for n, _, _ in bars], rotation=30 if len(bars) > 4 else 0, ha="right"
                  if len(bars) > 4 else "center", fontsize=7)
    ax.set(xlabel=xlabel, ylabel=metric, title=f"{metric} at the kept epoch" + (" (mean ± std)" if group_by else ""))
    return _save(plt, fig, ax, path, legend=False)


def write_report(runs: Sequence[Run], out: str | Path, *, metric: Optional[str] = None, group_by: Optional[str] = None,
                 title: str = "Run report", flags: Optional[Sequence[str]] = None) -> tuple[Path, str]:
    """report.md and the figures in `out`; returns (report.md, the Markdown tables)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = metric or default_metric(runs)
    shown_flags = list(differing_flags(runs) if flags is None else flags)
    tables = table(runs, metric, shown_flags)
    if group_by:
        tables = f"{group_table(runs, group_by, metric)}\n\n{tables}"
    slug = metric.replace("/", "_")
    figures = [plot_train_loss(runs, out / "train_loss.png", shown_flags),
               plot_dev_metric(runs, metric, out / f"dev_{slug.removeprefix('dev_')}.png", shown_flags),
               plot_best(runs, metric, out / f"best_{slug.removeprefix('dev_')}.png", group_by)]
    body = [f"# {title}", "", f"{len(runs)} run(s); metric `{metric}` at the epoch each run kept "
            f"(its best epoch by the task's own metric).", "", tables, ""]
    body += [f"![{p.stem}]({p.name})" for p in figures if p is not None]
    path = atomic_write_text(out / "report.md", "\n".join(body) + "\n")
    return path, tables
