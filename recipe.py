"""Run an experiment recipe (recipes/*.toml) from start to end and print its report.py table.  The
machinery and the file format: experiments/recipes.py.

    python recipe.py recipes/lora_ranks.toml            # GPU scale (the flags in the file)
    python recipe.py recipes/lora_ranks.toml --smoke    # CPU scale: tiny model, few examples, 1 epoch
    python recipe.py recipes/lora_ranks.toml --dry_run  # print the commands only

Each step is printed as the command it runs; finished steps are skipped when the recipe runs again,
interrupted ones continue (--resume), sweeps continue themselves.  Ends with OUT/report/report.md.
"""
from __future__ import annotations

import argparse
import sys

from experiments.recipes import run_recipe
from training.cli import entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe file, e.g. recipes/lora_ranks.toml")
    p.add_argument("--smoke", action="store_true", help="the recipe's CPU-scale flags (its [smoke] table)")
    p.add_argument("--out", default=None, help="output directory (default: the recipe's out, or its smoke out)")
    p.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_recipe(args.recipe, smoke=args.smoke, out=args.out, dry_run=args.dry_run)


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
