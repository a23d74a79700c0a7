"""Results of the baseline runs: loss/perplexity curves (PNG) and a markdown table."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from lm.baselines import BaselineRun


def _fmt(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "inf"


def plot_curves(runs: list[BaselineRun], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.step_losses:
            xs, ys = zip(*run.step_losses)
            k = max(1, len(ys) // 200)  # smooth: mean over windows of k steps
            xs = [sum(xs[i:i + k]) / len(xs[i:i + k]) for i in range(0, len(xs), k)]
            ys = [sum(ys[i:i + k]) / len(ys[i:i + k]) for i in range(0, len(ys), k)]
            line, = ax.plot(xs, ys, label=f"{run.name} train", alpha=0.8)
            ax.plot([h["epoch"] for h in run.history], [math.log(h["valid_ppl"]) for h in run.history],
                    "o--", color=line.get_color(), label=f"{run.name} valid")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats/word)")
    ax.set_title("PTB word-level baselines: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out_dir / "loss_curves.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        epochs = [h["epoch"] for h in run.history]
        line, = ax.plot(epochs, [h["train_ppl"] for h in run.history], "o-", label=f"{run.name} train")
        ax.plot(epochs, [h["valid_ppl"] for h in run.history], "s--", color=line.get_color(), label=f"{run.name} valid")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_title("PTB word-level baselines: perplexity per epoch")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    paths.append(out_dir / "perplexity_curves.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def results_markdown(runs: list[BaselineRun], oov: dict[str, float], settings_text: str, machine: str) -> str:
    cross = list(runs[0].cross_domain) if runs else []
    lines = ["# PTB word-level baselines", "", machine, "", settings_text, "",
             "| model | params | epochs | minutes | train ppl | valid ppl (best) | test ppl | "
             + " | ".join(f"{c} ppl" for c in cross) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(cross)]
    for run in runs:
        last = run.history[-1] if run.history else {"train_ppl": float("nan")}
        lines.append(f"| {run.name} | {run.parameters / 1e6:.2f}M | {run.epochs_done:.2f} | {run.train_minutes:.1f} | "
                     f"{_fmt(last['train_ppl'])} | {_fmt(run.best_valid_ppl)} | {_fmt(run.test_ppl)} | "
                     + " | ".join(_fmt(run.cross_domain[c]) for c in cross) + " |")
    lines += ["", "Out-of-vocabulary rate (words mapped to `<unk>`, `<eos>` not counted): "
              + ", ".join(f"{name} {100 * rate:.2f}%" for name, rate in oov.items()) + ".",
              "Cross-domain numbers are flattered by that mapping: `<unk>` is one easy-to-predict symbol "
              "standing for every unknown word.", ""]
    for run in runs:
        lines += [f"## {run.name}", "", "| epoch | train ppl | valid ppl | lr | minutes |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {h['epoch']:.2f} | {_fmt(h['train_ppl'])} | {_fmt(h['valid_ppl'])} | {h['lr']:g} | "
                  f"{h['minutes']:.1f} |" for h in run.history]
        lines += ["", "Samples (same prompts for every model):", ""]
        for s in run.samples:
            for key, text in s.items():
                if key != "prompt":
                    lines.append(f"- *{s['prompt']}* [{key}] {text}")
        lines.append("")
    return "\n".join(lines)


def write_results(runs: list[BaselineRun], oov: dict[str, float], settings_text: str, machine: str,
                  out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "results.md", "json": out_dir / "results.json"}
    paths["markdown"].write_text(results_markdown(runs, oov, settings_text, machine), encoding="utf-8")
    data = {"oov_rate": oov, "settings": settings_text, "machine": machine,
            "runs": [{k: v for k, v in asdict(r).items() if k != "step_losses"} for r in runs]}
    paths["json"].write_text(json.dumps(data, indent=2), encoding="utf-8")
    for p in plot_curves(runs, out_dir):
        paths[p.stem] = p
    return paths
