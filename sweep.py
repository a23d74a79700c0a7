"""Hyperparameter search over any training script (Optuna: TPE by default, random or grid; per-epoch
median pruning; resumable; one trial per GPU with --parallel).  The machinery: experiments/sweep.py.

    python sweep.py --script classifier.py --trials 20 --metric dev_accuracy --direction maximize \\
        --space 'lr=loguniform(1e-5,1e-3) batch_size=choice(8,16,32) lora_r=choice(4,8,16)' \\
        --out runs/sweeps/sst-lora -- --datasets sst --fine-tune-mode full-model --peft lora --epochs 5 --use_gpu

    python sweep.py ... --parallel 4              # four trials at once, on cuda:0..3 (CUDA_VISIBLE_DEVICES)
    python sweep.py ... --sampler grid --space 'lora_r=choice(4,8,16) seed=choice(1,2,3)'   # every combination
    python report.py runs/sweeps/sst-lora --group_by lora_r                                 # the table and plots

--space grammar: NAME=uniform(a,b) | loguniform(a,b) | int(a,b[,step]) | choice(v1,v2,...), separated
by spaces; NAME is the script's flag without dashes (a choice of true/false is a switch).  Every flag
after `--` goes to every trial.  Running the same command again continues the sweep in --out.
Writes OUT/trial-NNN/ (one run directory per trial), OUT/results.csv, OUT/best.json, OUT/study.journal.
"""
from __future__ import annotations

import argparse
import sys

from experiments.sweep import PRUNERS, SAMPLERS, SweepSpec, run_sweep
from training.cli import UsageError, entry_point

FIELD_FLAGS = {"fixed": "the flags after --"}


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    fixed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", required=True, help="the training script each trial runs (classifier.py, ...)")
    p.add_argument("--space", required=True, help="the search space (grammar above)")
    p.add_argument("--metric", required=True,
                   help="what a trial scores: dev_<metric> (dev_accuracy, dev_chrf, dev_valid_loss) or a number of "
                        "the epoch records (train_loss), taken at the epoch the run keeps")
    p.add_argument("--direction", choices=["maximize", "minimize"], default="maximize")
    p.add_argument("--out", required=True, help="the sweep's directory (continued when it exists)")
    p.add_argument("--trials", type=int, default=None,
                   help="finished trials wanted in total (default with --sampler grid: every combination)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (trials keep their own --seed flag)")
    p.add_argument("--task", default=None,
                   help="with a script that trains several tasks in one run (classifier.py: sst, cfimdb): "
                        "the one whose epochs are scored")
    p.add_argument("--pruner", choices=PRUNERS, default="median",
                   help="median: stop a trial after an epoch whose metric is worse than the median of earlier "
                        "trials at that epoch")
    p.add_argument("--prune_startup_trials", type=int, default=5, help="no pruning before this many trials finished")
    p.add_argument("--prune_warmup_epochs", type=int, default=0, help="no pruning in a trial's first N epochs")
    p.add_argument("--parallel", type=int, default=1, help="trials at once, each on its own GPU")
    p.add_argument("--devices", default=None,
                   help="comma-separated, one per parallel trial: CUDA indices (default 0..N-1) or cpu")
    args = p.parse_args(own)
    args.fixed = fixed
    if args.devices is not None:
        args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for flag in ("prune_startup_trials", "prune_warmup_epochs"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    spec = SweepSpec(script=args.script, space=args.space, metric=args.metric, out=args.out,
                     direction=args.direction, fixed=args.fixed, trials=args.trials, sampler=args.sampler,
                     seed=args.seed, task=args.task, pruner=args.pruner,
                     prune_startup_trials=args.prune_startup_trials, prune_warmup_epochs=args.prune_warmup_epochs,
                     parallel=args.parallel, devices=args.devices)
    best = run_sweep(spec)
    if best:
        print(f"[sweep] best: trial {best['trial']}, {best['metric']} {best['value']:.4f}, {best['params']} "
              f"({best['run_dir']}); table: python report.py {args.out}")
    else:
        print(f"[sweep] no trial completed; see {args.out}/results.csv")
    return best


if __name__ == "__main__":
    entry_point(main, FIELD_FLAGS)(sys.argv[1:])
