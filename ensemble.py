"""Ensemble finished runs of one task from the per-example outputs every task script saves in its run
directory (RUN_DIR/outputs/{task}-{split}.json: class probabilities, or generated sonnets; see
tasks/run_outputs.py and objectives/ensemble.py).

Classification (classifier.py: sst, cfimdb; paraphrase_detection.py: para; multitask.py: all three):
`--method mean` averages the members' class probabilities (weighted by `--weights`), `--method vote`
takes the weighted majority of their predicted classes (a tie goes to the higher mean probability).
Sonnets (sonnet_generation.py): per prompt, the member sonnet with the highest weighted mean sentence
chrF against the other members' sonnets for that prompt (a consensus choice: no model, no gold).

Writes, under --out, the leaderboard files of every task and split the runs share (the names of
tasks/leaderboard.py), the ensemble's own outputs/ (so an ensemble can be a member of another), and
ensemble.json with the dev accuracy / F1 (chrF for sonnets) of each member and of the ensemble.
Runs of different tasks, splits, classes or id sets are refused.

    python ensemble.py --runs runs/classifier-seed1 runs/classifier-seed2 runs/classifier-seed3 --out ens/sst
    python ensemble.py --runs runs/para-a runs/para-b --weights 2 1 --method vote --out ens/para
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import DataError
from common.io import atomic_write_json
from objectives.ensemble import METHODS, combine, score
from tasks.run_outputs import OUTPUTS_DIR, RunOutputs, read_outputs, write_outputs
from training.cli import UsageError, entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR", help="run directories of the same task")
    p.add_argument("--out", required=True, metavar="DIR", help="where the ensemble's files are written")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per run (default: equal)")
    p.add_argument("--method", choices=METHODS, default="mean",
                   help="classification: mean of probabilities or weighted vote (sonnets: chrF consensus, mean only)")
    p.add_argument("--task", nargs="+", default=None,
                   help="ensemble only these tasks (sst, cfimdb, para, sonnet) of runs that hold several")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        raise UsageError("--runs: an ensemble needs at least two runs")
    if len(set(map(lambda r: str(Path(r).resolve()), args.runs))) != len(args.runs):
        raise UsageError("--runs: a run is given twice (give it a larger --weights instead)")
    if args.weights is not None and len(args.weights) != len(args.runs):
        raise UsageError(f"--weights: {len(args.weights)} weights for {len(args.runs)} runs; give one per run")
    if args.weights is not None and (not all(0 <= w < float("inf") for w in args.weights) or not sum(args.weights)):
        raise UsageError(f"--weights {' '.join(map(str, args.weights))}: each must be finite and >= 0, not all 0")
    if Path(args.out).resolve() in {Path(r).resolve() for r in args.runs}:
        raise UsageError(f"--out {args.out} is one of the --runs; writing there would replace that run's outputs")
    return args


def run_outputs(run: str, tasks) -> dict[tuple[str, str], RunOutputs]:
    folder = Path(run) / OUTPUTS_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise UsageError(f"--runs {run}: no {OUTPUTS_DIR}/*.json; classifier.py, paraphrase_detection.py, "
                         f"sonnet_generation.py and multitask.py write them into their run directory when they finish")
    found = {(o.task, o.split): o for o in map(read_outputs, files)}
    return {k: v for k, v in found.items() if tasks is None or k[0] in tasks}


def write_leaderboard_file(out_dir: Path, combined) -> Path:
    from tasks.data import write_paraphrase_predictions, write_sentiment_predictions
    from tasks.sonnets import write_generated_sonnets

    out = combined.outputs
    path = out_dir / out.prediction_file
    if out.kind == "generation":
        # in the first member's prompt order (the order its run read the prompts), numbered 0, 1, ...
        # as the starter writes them: the leaderboard pairs the i-th sonnet with the i-th prompt
        return write_generated_sonnets(path, out.texts)
    if out.task == "para":
        from tasks.paraphrase import LABEL_TOKENS

        tokens = [int(LABEL_TOKENS[c]) for c in combined.predictions]
        return write_paraphrase_predictions(path, out.ids, tokens, expected_rows=len(out.ids))
    return write_sentiment_predictions(path, out.ids, combined.predictions, expected_rows=len(out.ids))


def main(argv=None) -> dict:
    args = parse_args(argv)
    members = [run_outputs(r, args.task) for r in args.runs]
    keys = set(members[0])
    if not keys:
        raise UsageError(f"--task {' '.join(args.task)}: {args.runs[0]} holds none of these tasks")
    for run, outs in zip(args.runs[1:], members[1:]):
        if set(outs) != keys:
            raise DataError(f"{run} holds {sorted(outs)} but {args.runs[0]} holds {sorted(keys)}: an ensemble "
                            f"combines runs of the same task(s) (select some with --task)")
    out_dir, report = Path(args.out), {}
    for key in sorted(keys):
        parts = [m[key] for m in members]
        try:
            combined = combine(parts, args.weights, args.method)
        except DataError:
            raise
        except ValueError as exc:  # a method or weights that do not fit the task
            raise UsageError(f"{key[0]} {key[1]}: {exc}") from None
        path = write_leaderboard_file(out_dir, combined)
        write_outputs(out_dir, combined.outputs)
        entry = {"file": str(path), "members": [{"run": r, "dev": score(p)} for r, p in zip(args.runs, parts)],
                 "ensemble": score(combined.outputs, combined.predictions)}
        if combined.chosen_member is not None:
            entry["chosen_per_member"] = [combined.chosen_member.count(i) for i in range(len(parts))]
        report[f"{key[0]}-{key[1]}"] = entry
        print(f"[ensemble] {key[0]} {key[1]}: wrote {len(combined.outputs.ids)} rows to {path}")
    summary = {"runs": args.runs, "weights": args.weights, "method": args.method, "results": report}
    atomic_write_json(out_dir / "ensemble.json", summary)
    print_table(report)
    return summary


def print_table(report: dict) -> None:
    """One markdown table per task and split: each member's dev metrics, then the ensemble's."""
    for name, entry in report.items():
        rows = [(m["run"], m["dev"]) for m in entry["members"]] + [("ensemble", entry["ensemble"])]
        if all(dev is None for _, dev in rows):
            continue  # no gold (a test split)
        keys = list(next(dev for _, dev in rows if dev))
        print(f"\n| {name} | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
        for run, dev in rows:
            print(f"| {run} | " + " | ".join(f"{dev[k]:.4f}" for k in keys) + " |")


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
