"""CPU-sized measured examples of the training objectives (docs/objectives.md), each through the real
scripts in subprocesses, on the CS224N data under data/ and the tiny random-init model:

    dpo       sonnet_generation.py fine-tunes tiny on sonnets.txt (the SFT start), dpo.py pairs builds
              shuffle / rhyme / truncate pairs from sonnets.txt (train) and the gold dev sonnets (dev),
              dpo.py train runs DPO from the SFT weights: dev reward accuracy per epoch and pair kind
    ensemble  classifier.py on SST (a seeded random sample of --train_examples training examples; dev
              complete, 1,101) with two seeds, ensemble.py --method mean: dev accuracy of members and ensemble
    smart     the same SST run (seed 1) with --smart_lambda 1 --bregman_mu 1 (the paper's defaults
              otherwise) against the seed-1 run without SMART
    smart_cost  the time of one training step with and without the SMART terms (in this process)

    python -m bench.objectives                      # all four, ~1.5 hours on a busy 2-core CPU
    python -m bench.objectives --only ensemble smart --train_examples 4000 --reuse

Writes bench/results/objectives.json and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import markdown_table, write_results

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(args: list[str], log: Path, done: Path | None = None) -> float:
    """Run a script of the repository; its output goes to `log`; returns the wall time (0 when `done`, a
    file the run writes last, exists already: --reuse keeps finished runs)."""
    if done is not None and done.exists():
        return 0.0
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([PY, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def epochs_of(run_dir: Path) -> list[dict]:
    from common.io import read_jsonl_log

    return [r for r in read_jsonl_log(run_dir / "metrics.jsonl") if r["event"] == "epoch"]


def bench_dpo(work: Path, a) -> dict:
    common = ["--model_size", "tiny", "--no_progress", "--seed", "1"]
    sft = work / "sonnet-sft"
    t_sft = run(["sonnet_generation.py", *common, "--epochs", str(a.sft_epochs), "--lr", "1e-3", "--select_by", "loss",
                 "--max_new_tokens", "32", "--run_dir", str(sft), "--sonnet_out", str(work / "sft-test.txt"),
                 "--sonnet_dev_out", str(work / "sft-dev.txt")], work / "sft.log", sft / "outputs" / "sonnet-test.json")
    kinds = "shuffle,rhyme,truncate"
    for src, out in (("data/sonnets.txt", "pairs-train.jsonl"),
                     ("data/TRUE_sonnets_held_out_dev.txt", "pairs-dev.jsonl")):
        run(["dpo.py", "pairs", "--task", "sonnet", "--sonnets", src, "--kinds", kinds, "--out", str(work / out)],
            work / f"{out}.log", work / f"{out}.stats.json")
    dpo = work / "dpo"
    t_dpo = run(["dpo.py", "train", "--task", "sonnet", "--pairs", str(work / "pairs-train.jsonl"), "--dev_pairs",
                 str(work / "pairs-dev.jsonl"), *common, "--init_weights", str(sft), "--epochs", str(a.dpo_epochs),
                 "--lr", str(a.dpo_lr), "--beta", "0.1", "--batch_size", "8", "--limit", str(a.dpo_limit),
                 "--run_dir", str(dpo)], work / "dpo.log", dpo / "last.pt")  # --reuse: a run with an epoch done
    stats = {s: json.loads((work / f"pairs-{s}.jsonl.stats.json").read_text()) for s in ("train", "dev")}
    from common.io import read_jsonl_log
    from training import checkpoint

    finished = any(r["event"] == "final" for r in read_jsonl_log(dpo / "metrics.jsonl"))
    ref = checkpoint.load(dpo / "last.pt")["callbacks"][0]["values"]["dev"]  # (N, 2) reference log-probs
    used = {s: min(a.dpo_limit, stats[s]["pairs"]) for s in stats}
    epochs = epochs_of(dpo)
    return {"pairs": {s: stats[s]["by_kind"] for s in stats}, "pairs_used": used, "finished": finished,
            "seconds": {"sft": t_sft, "dpo": t_dpo, "dpo_epochs": [e["seconds"] for e in epochs]},
            "reference_policy_accuracy": (ref[:, 0] > ref[:, 1]).float().mean().item(),
            "epochs": [{"epoch": e["epoch"], "train_loss": e["train_loss"],
                        "train_reward_accuracy": e["train_reward_accuracy"], **e["dev"]} for e in epochs]}


def sst_subset(work: Path, n: int) -> Path:
    """A seeded random sample of n SST training rows (the file is ordered by label: its first rows are not
    a sample), header kept."""
    import random

    path = work / f"sst-train-{n}.csv"
    if not path.is_file():
        header, *rows = (REPO / "data" / "ids-sst-train.csv").read_text(encoding="utf-8").splitlines()
        path.write_text("\n".join([header, *random.Random(0).sample(rows, n)]) + "\n", encoding="utf-8")
    return path


def classifier_run(work: Path, a, name: str, seed: int, *extra) -> tuple[Path, float]:
    run_dir = work / name
    seconds = run(["classifier.py", "--model_size", "tiny", "--no_progress", "--datasets", "sst", "--fine-tune-mode",
                   "full-model", "--lr", str(a.lr), "--epochs", str(a.epochs), "--sst_train",
                   str(sst_subset(work, a.train_examples)), "--seed", str(seed), "--predictions_dir",
                   str(run_dir / "pred"), "--run_dir", str(run_dir), *extra],
                  work / f"{name}.log", run_dir / "outputs" / "sst-test.json")
    return run_dir, seconds


def sst_dev(run_dir: Path) -> dict:
    e = epochs_of(run_dir / "sst")
    best = max(e, key=lambda r: r["dev"]["accuracy"])
    return {"accuracy": best["dev"]["accuracy"], "f1": best["dev"]["f1"], "best_epoch": best["epoch"],
            "per_epoch": [r["dev"]["accuracy"] for r in e]}


def bench_ensemble(work: Path, a) -> dict:
    runs = [classifier_run(work, a, f"sst-seed{s}", s) for s in (1, 2)]
    out = work / "sst-ensemble"
    run(["ensemble.py", "--runs", *(str(r) for r, _ in runs), "--out", str(out)], work / "ensemble.log")
    report = json.loads((out / "ensemble.json").read_text())["results"]["sst-dev"]
    return {"members": [m["dev"] for m in report["members"]], "ensemble": report["ensemble"],
            "seconds": [s for _, s in runs]}


def bench_smart(work: Path, a) -> dict:
    base, _ = classifier_run(work, a, "sst-seed1", 1)  # done already when the ensemble ran
    smart, seconds = classifier_run(work, a, "sst-seed1-smart", 1, "--smart_lambda", "1", "--bregman_mu", "1")
    terms = [{k: e[k] for k in ("train_loss", "train_smart_loss", "train_bregman_loss")}
             for e in epochs_of(smart / "sst")]
    return {"none": sst_dev(base), "smart": {**sst_dev(smart), "terms": terms, "seconds": seconds}}


def bench_smart_cost(work: Path, a) -> dict:
    """Seconds per training step (loss + backward) of the tiny classifier on SST-length inputs without
    SMART, with the adversarial term, and with both terms: median of interleaved repeats, one process,
    `--threads` torch threads."""
    import torch

    from bench.common import median, time_interleaved
    from models.gpt2 import GPT2Model
    from objectives.smart import Smart, SmartConfig
    from tasks.sentiment import GPT2SentimentClassifier
    from training.efficient import frozen_copy

    torch.manual_seed(0)
    model = GPT2SentimentClassifier(GPT2Model.from_name_or_path("tiny"), 5, 0.3).train()
    ids = torch.randint(0, 50257, (8, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 5, (8,))}
    fwd = lambda m, b: m(b["input_ids"], b["attention_mask"])  # noqa: E731
    adversarial = Smart(SmartConfig(smart_lambda=1.0), fwd)
    both = Smart(SmartConfig(smart_lambda=1.0, bregman_mu=1.0), fwd)
    both.ema = frozen_copy(model)

    def step(smart):
        def go():
            model.zero_grad(set_to_none=True)
            if smart is None:
                loss = torch.nn.functional.cross_entropy(fwd(model, batch), batch["labels"])
            else:
                logits, penalty, _ = smart.forward(model, batch)
                loss = torch.nn.functional.cross_entropy(logits, batch["labels"]) + penalty
            loss.backward()
        return go

    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)  # one thread: far steadier on a shared machine
    try:
        times = time_interleaved({"none": step(None), "smart": step(adversarial), "smart+bregman": step(both)},
                                 torch.device("cpu"), steps=a.cost_steps, warmup=2)
    finally:
        torch.set_num_threads(threads)
    # ratio: the median over rounds of (variant / no SMART) within the round, robust to the load drifting
    return {name: {"seconds": median(t), "ratio": median([x / y for x, y in zip(t, times["none"])])}
            for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["dpo", "ensemble", "smart", "smart_cost"],
                   default=["dpo", "ensemble", "smart", "smart_cost"])
    p.add_argument("--cost_steps", type=int, default=40, help="smart_cost: timed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="smart_cost: torch threads")
    p.add_argument("--work", default="runs/bench-objectives", help="run directories and logs")
    p.add_argument("--train_examples", type=int, default=2000,
                   help="classifier runs: a seeded random sample of N SST training examples (dev and test complete)")
    p.add_argument("--epochs", type=int, default=3, help="classifier runs")
    p.add_argument("--lr", type=float, default=1e-3, help="classifier runs")
    p.add_argument("--reuse", action="store_true", help="keep --work and skip the runs that finished there")
    p.add_argument("--sft_epochs", type=int, default=3)
    p.add_argument("--dpo_epochs", type=int, default=3)
    p.add_argument("--dpo_lr", type=float, default=1e-4)
    p.add_argument("--dpo_limit", type=int, default=400, help="DPO: the first N training (and dev) pairs")
    a = p.parse_args(argv)
    work = REPO / a.work
    if work.exists() and not a.reuse:
        raise SystemExit(f"{work} exists; remove it, give another --work, or --reuse its finished runs")
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    results = {}
    for name in a.only:  # each part keeps its own settings and load: --reuse merges parts of several runs
        part = {"dpo": bench_dpo, "ensemble": bench_ensemble, "smart": bench_smart,
                "smart_cost": bench_smart_cost}[name](work, a)
        results[name] = {**part, "settings": vars(a), "load_average": [load, os.getloadavg()[0]]}
        load = os.getloadavg()[0]
    from bench.common import RESULTS_DIR

    previous = RESULTS_DIR / "objectives.json"
    if a.reuse and previous.is_file():  # keep the parts measured before
        old = json.loads(previous.read_text())
        results = {**{k: v for k, v in old.items() if k not in ("date", "torch")}, **results}
    path = write_results("objectives", results)
    print_tables(results)
    print(f"\nwrote {path}")
    return results


def print_tables(r: dict) -> None:
    if "dpo" in r:
        kinds = sorted(r["dpo"]["pairs"]["dev"])
        rows = [[e["epoch"], f"{e['train_loss']:.4f}", f"{e['loss']:.4f}", f"{e['reward_accuracy']:.3f}",
                 *(f"{e.get(f'reward_accuracy_{k}', float('nan')):.3f}" for k in kinds), f"{e['reward_margin']:.3f}",
                 f"{e['policy_accuracy']:.3f}"] for e in r["dpo"]["epochs"]]
        start = ["0 (reference)", "-", "0.6931", "0.000", *("0.000" for _ in kinds), "0.000",
                 f"{r['dpo']['reference_policy_accuracy']:.3f}"]
        done = "" if r["dpo"]["finished"] else f" (interrupted after {len(r['dpo']['epochs'])} epochs)"
        print(f"\nDPO on sonnet pairs{done}", r["dpo"]["pairs"], "used:", r["dpo"]["pairs_used"])
        print(markdown_table(["epoch", "train loss", "dev loss", "dev reward acc", *(f"dev acc {k}" for k in kinds),
                              "dev margin", "dev policy acc"], [start, *rows]))
    if "ensemble" in r:
        e = r["ensemble"]
        rows = [[f"seed {i + 1}", f"{m['accuracy']:.4f}", f"{m['f1']:.4f}"] for i, m in enumerate(e["members"])]
        rows.append(["ensemble (mean)", f"{e['ensemble']['accuracy']:.4f}", f"{e['ensemble']['f1']:.4f}"])
        print("\nSST dev")
        print(markdown_table(["model", "accuracy", "macro F1"], rows))
    if "smart" in r:
        s = r["smart"]
        rows = [[name, f"{s[k]['accuracy']:.4f}", f"{s[k]['f1']:.4f}", s[k]["best_epoch"],
                 " / ".join(f"{x:.4f}" for x in s[k]["per_epoch"])] for name, k in (("no SMART", "none"),
                                                                                    ("SMART", "smart"))]
        print("\nSST dev, seed 1")
        print(markdown_table(["run", "best accuracy", "macro F1", "best epoch", "accuracy per epoch"], rows))
    if "smart_cost" in r:
        rows = [[name, f"{v['seconds'] * 1000:.1f}", f"{v['ratio']:.2f}"] for name, v in r["smart_cost"].items()
                if name not in ("settings", "load_average")]
        print("\nTraining step of the tiny classifier, batch 8 x 32 tokens (median, interleaved; ratio: median of "
              "the per-round ratios)")
        print(markdown_table(["step", "ms", "ratio to no SMART"], rows))


if __name__ == "__main__":
    main()
