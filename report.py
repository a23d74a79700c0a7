"""Compare training runs: report.md (a table of the flags that differ, the dev metrics at the kept
epoch, train time, trainable parameters, peak memory) and PNG figures (train loss per step, the
metric per epoch, bars of the best metric).  The machinery: experiments/report.py.

    python report.py runs/sweeps/sst-lora                       # a sweep's trials
    python report.py runs/a runs/b runs/c --metric dev_chrf     # any run directories
    python report.py runs/sweeps/lora-ranks --group_by lora_r   # mean and std over the seeds of each rank

RUN_DIR may be a run directory, a directory of runs (a sweep's, a recipe's) or a metrics.jsonl file.
Prints the tables; writes report.md and the figures to --out (default: the one RUN_DIR given, else
./report).
"""
from __future__ import annotations

import argparse
import sys

from experiments.report import write_report
from experiments.runs import find_runs
from training.cli import entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, directories of runs, metrics files")
    p.add_argument("--metric", default=None,
                   help="dev_<metric> or an epoch-record number (default: the metric that picked the runs' best "
                        "epochs)")
    p.add_argument("--group_by", default=None, metavar="FLAG",
                   help="average the runs of each value of FLAG (e.g. lora_r, attention, decoding): mean and std")
    p.add_argument("--flags", default=None,
                   help="comma-separated flags to show as columns (default: every flag that differs)")
    p.add_argument("--out", default=None, help="where report.md and the figures go")
    p.add_argument("--title", default="Run report")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    runs = find_runs(args.runs)
    out = args.out or (args.runs[0] if len(args.runs) == 1 else "report")
    flags = None if args.flags is None else [f if f.startswith("--") else f"--{f}" for f in args.flags.split(",") if f]
    path, tables = write_report(runs, out, metric=args.metric, group_by=args.group_by, title=args.title, flags=flags)
    print(tables)
    print(f"\nwrote {path} and its figures")
    return tables


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
