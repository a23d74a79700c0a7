"""Impossible Distillation's rounds, end to end (Jung et al., 2023, arXiv 2305.16635): generate ->
filter -> train the student generator, round after round, the student of round r generating the
candidates of round r + 1; then every round's kept pairs become the detector's training file.

    DIR/round-K/candidates.jsonl (+ .stats.json)   samples of round K's generator_in
    DIR/round-K/filtered.jsonl   (+ .stats.json)   the pairs the rules and the critic kept
    DIR/round-K/generator/       (+ generator.stats.json)   the student trained on them (HF directory)
    DIR/round-K/generator-run/   its trainer run directory (metrics.jsonl, last.pt, best.pt)
    DIR/synthetic.csv            (+ .stats.json)   positives + hard negatives, Quora layout
    DIR/summary.json             one entry per round (see `round_entry`), rewritten after every round

Round 1's generator is the pretrained model (mode `continue` or `rewrite`); round K >= 2's is round
K-1's student (mode `paraphrase`).  Every stage writes its output atomically and its statistics file
LAST, so a stage is complete exactly when both exist.  A complete stage is skipped, unless its inputs
changed since (the digest of the upstream statistics is recorded in `inputs`), in which case it runs
again from scratch.  An incomplete generator training resumes from its run directory's last.pt.  A
stage made with other settings (flags) than the current ones is an error, never silently reused.

The stage bodies are callables (`RoundStages`), so this module owns only the order, the paths, the
skipping and the summary; `impossible_distillation.py run` supplies the real stages.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from common.errors import UserError
from common.io import atomic_write_json
from distillation.impossible import stats_path, write_stats


@dataclass
class RoundStages:
    generate: Callable[[str, str, Path], dict]  # (generator_in, mode, candidates path) -> stats
    filter: Callable[[Path, Path], dict]  # (candidates path, filtered path) -> stats
    train: Callable[[str, Path, Path, Path], Optional[dict]]  # (generator_in, filtered, generator dir, run dir)
    #                                              -> stats with "generator_out", or None when interrupted
    build: Callable[[Sequence[Path], Path], dict]  # (every round's filtered file, synthetic.csv) -> stats


def _plain(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def digest(path: Path) -> str:
    """Fingerprint of a completed stage: its statistics file, and the size and modification time of
    every output file (a stage run again changes it, even when its statistics come out the same)."""
    h = hashlib.sha256(stats_path(path).read_bytes())
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def run_stage(out: Path, settings: dict, inputs: dict, fn: Callable[[], Optional[dict]],
              clear: Sequence[Path] = ()) -> tuple[Optional[dict], str]:
    """(statistics, "skipped" | "ran" | "reran") of the stage writing `out`.  `settings`: what the stage
    is made with (an error when a complete stage differs); `inputs`: the digests of its inputs (a
    complete stage whose inputs differ is stale and reruns, `clear` deleted first)."""
    settings, inputs = _plain(settings), _plain(inputs)
    status = "ran"
    if out.exists() and stats_path(out).is_file():
        stats = json.loads(stats_path(out).read_text(encoding="utf-8"))
        if stats.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(stats.get("settings", {}))
                             if settings.get(k) != stats.get("settings", {}).get(k))
            raise UserError(f"{out} was made with other settings (changed: {', '.join(changed)}); rerun with the "
                            f"flags it was made with, or choose another --out")
        if stats.get("inputs") == inputs:
            return stats, "skipped"
        status = "reran"
        stats_path(out).unlink()
        for path in clear:
            shutil.rmtree(path, ignore_errors=True)
    stats = fn()
    if stats is None:
        return None, status
    stats.update(settings=settings, inputs=inputs)
    write_stats(out, stats)
    return stats, status


def round_entry(k: int, mode: str, generator_in: str, gen: dict, filt: dict, train: dict, status: dict) -> dict:
    survivors = filt.get("critic_scores_of_rule_survivors") or {}
    return {"round": k, "mode": mode, "generator_in": generator_in, "samples": gen["samples"],
            "candidates": gen["candidates"], "kept": filt["kept"], "removed": filt["removed"],
            "generator_out": train["generator_out"], "train_pairs": train["train_pairs"],
            "train_loss_first": train["train_loss_first"], "train_loss_last": train["train_loss_last"],
            "train_step_loss_first": train["train_step_loss_first"],
            "train_step_loss_last": train["train_step_loss_last"],
            "dev_ce_before": train["dev_ce_before"], "dev_ce_after": train["dev_ce_after"],
            "critic_score_mean": filt.get("critic_score_mean_kept"),
            "critic_score_mean_candidates": survivors.get("mean"),
            "lexical_similarity_mean": filt.get("lexical_similarity_mean_kept"),
            "distinct_2": filt.get("distinct_2_kept"), "distinct_2_samples": gen.get("distinct_2_samples"),
            "stages": status}


def run_rounds(out_dir: str | Path, rounds: int, pretrained: str, first_mode: str, stages: RoundStages,
               settings: dict, say: Callable[[str], None] = print) -> dict:
    """All rounds, then the synthetic file; returns (and writes) DIR/summary.json's content.
    `settings`: {"generate": {...}, "filter": {...}, "train": {...}, "build": {...}}, each stage's flags."""
    if rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {rounds}")
    if first_mode not in ("continue", "rewrite"):
        raise UserError(f"--mode {first_mode}: round 1 samples the pretrained model with continue or rewrite")
    out = Path(out_dir)
    summary = {"pretrained": pretrained, "rounds": [], "interrupted": False}
    generator_in, upstream = pretrained, {}
    filtered: list[Path] = []
    for k in range(1, rounds + 1):
        rd = out / f"round-{k}"
        mode = first_mode if k == 1 else "paraphrase"
        cand, filt, gen_dir, run_dir = rd / "candidates.jsonl", rd / "filtered.jsonl", rd / "generator", rd / "generator-run"
        g, g_status = run_stage(cand, {**settings["generate"], "generator_in": generator_in, "mode": mode}, upstream,
                                lambda: stages.generate(generator_in, mode, cand))
        f, f_status = run_stage(filt, settings["filter"], {"candidates": digest(cand)},
                                lambda: stages.filter(cand, filt))
        t, t_status = run_stage(gen_dir, {**settings["train"], "generator_in": generator_in},
                                {"filtered": digest(filt)}, lambda: stages.train(generator_in, filt, gen_dir, run_dir),
                                clear=(gen_dir, run_dir))
        status = {"generate": g_status, "filter": f_status, "train": t_status}
        say(f"[impossible] round {k}: " + ", ".join(f"{s} {v}" for s, v in status.items()))
        if t is None:
            summary["interrupted"] = True
            say(f"[impossible] round {k}: generator training stopped early; run the same command again to resume")
            break
        summary["rounds"].append(round_entry(k, mode, generator_in, g, f, t, status))
        atomic_write_json(out / "summary.json", summary)
        generator_in, upstream = t["generator_out"], {"generator": digest(gen_dir)}
        filtered.append(filt)
    if not summary["interrupted"]:
        synth = out / "synthetic.csv"
        b, b_status = run_stage(synth, settings["build"], {f"round-{i + 1}": digest(p) for i, p in enumerate(filtered)},
                                lambda: stages.build(filtered, synth))
        summary.update(synthetic=str(synth), build={**{k: b[k] for k in ("positives", "negatives", "rows")},
                                                    "status": b_status})
    atomic_write_json(out / "summary.json", summary)
    return summary
