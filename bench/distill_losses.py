"""MSE vs KL vs Wasserstein distillation of one GPT-2 teacher into one student, same budget for each.

Every variant runs `distill.py --task lm` with the same teacher, student shape, initialisation (every
k-th teacher layer), data, steps and seed; only the loss differs.  Rows: the student as initialised
(no training), trained on the data alone (hard labels, no teacher signal), and with each
distillation loss alone.  Prints a markdown table (student perplexity and its ratio to the
teacher's) and writes bench/results/distill_losses.json.

    python -m bench.distill_losses --teacher runs/teacher/student --train_file data/ptb.train.txt \\
        --valid_file data/ptb.valid.txt --limit 300 -- --block_size 32 --batch_size 8 --lr 1e-3
Arguments after `--` go to every distill.py run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import machine_description, markdown_table, write_results

VARIANTS = {
    "init only (no training)": ["--epochs", "0"],
    "hard labels only (CE)": ["--hard_weight", "1"],
    "KL (T=2)": ["--hard_weight", "0", "--kl_weight", "1", "--temperature", "2"],
    "MSE (hidden states)": ["--hard_weight", "0", "--mse_weight", "1"],
    "Wasserstein (WGAN-GP critics)": ["--hard_weight", "0", "--wd_weight", "1"],
}


def run_distill(argv: list[str]) -> dict:
    """One `distill.py` run in its own process (a benchmark imports no script); its report.json."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "distill.py"), *argv], check=True, cwd=root)
    run_dir = Path(argv[argv.index("--run_dir") + 1])
    return json.loads((run_dir if run_dir.is_absolute() else root / run_dir).joinpath("report.json").read_text())


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--train_file", required=True)
    p.add_argument("--valid_file", required=True)
    p.add_argument("--init_every_k", default="2")
    p.add_argument("--limit", default="300", help="training blocks per run")
    p.add_argument("--out_dir", default="runs/distill-bench")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    args = p.parse_args(argv)
    results, rows = {}, []
    for name in args.variants:
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        t0 = time.perf_counter()
        report = run_distill(["--task", "lm", "--teacher", args.teacher, "--train_file", args.train_file,
                      "--valid_file", args.valid_file, "--init_every_k", args.init_every_k, "--limit", args.limit,
                      "--no_progress", "--run_dir", str(Path(args.out_dir) / slug), *VARIANTS[name], *extra])
        report["wall_seconds"] = time.perf_counter() - t0
        results[name] = report
        t, s = report["rows"]["teacher"], report["rows"]["student"]
        rows.append([name, f"{s['perplexity']:.1f}", f"{t['perplexity']:.1f}", f"{s['perplexity'] / t['perplexity']:.3f}",
                     f"{report['wall_seconds']:.0f}"])
    first = next(iter(results.values()))["rows"]
    header = ["student trained with", "student ppl", "teacher ppl", "student / teacher", "wall s"]
    table = markdown_table(header, rows)
    print(f"teacher: {first['teacher']['layers']} layers x {first['teacher']['hidden']}, "
          f"{first['teacher']['parameters']:,} parameters; student: {first['student']['layers']} layers x "
          f"{first['student']['hidden']}, {first['student']['parameters']:,} parameters; "
          f"{machine_description(torch.device('cpu'))}")
    print(table)
    path = write_results("distill_losses", {"machine": machine_description(torch.device("cpu")), "argv": argv,
                                            "extra": extra, "table": table, "runs": results})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
