"""Impossible Distillation for paraphrasing (Jung et al., 2023, arXiv 2305.16635): GPT-2's own samples ->
filtered paraphrase pairs -> a student paraphrase GENERATOR trained on them, round after round ->
a labelled Quora-format file the paraphrase detector trains on.  See docs/distillation.md.

Stages (each reads a file and writes a file plus `<output>.stats.json`):

    generate         contexts (one per line, or a Quora file's questions) -> candidates.jsonl
                     --mode continue | rewrite (a pretrained LM) | paraphrase (a trained student generator)
    filter           candidates.jsonl -> filtered.jsonl  (rules + a trained critic: distillation/impossible.py)
    train-generator  filtered.jsonl -> a Hugging Face directory: the student generator, CE on y' +
                     lambda * KL to the frozen initial model (distillation/generator.py), on the shared trainer
    build            filtered.jsonl (one or more) -> synthetic.csv (Quora CSV: positives + hard negatives)
    run              every round end to end: DIR/round-K/{candidates,filtered}.jsonl, DIR/round-K/generator,
                     DIR/synthetic.csv, DIR/summary.json; complete stages are skipped (distillation/rounds.py)

    python impossible_distillation.py run --model gpt2 --quora data/quora-train.csv --rounds 2 \\
        --num_contexts 2000 --samples_per_context 4 --critic_model gpt2 --critic_checkpoint runs/para \\
        --tau 0.6 --generator_epochs 4 --out synth
    python paraphrase_detection.py --synthetic_train synth/synthetic.csv --kl_lambda 0.1 --contrastive margin
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from common.errors import ConfigError
from distillation import generator as gen
from distillation import impossible as imp
from distillation.critic import load_critic
from training.cli import (UsageError, add_common_args, add_decoding_args, add_device_args, add_efficiency_args,
                          entry_point, generation_config, resolve_device, usage_message)
from training.config import EfficiencyConfig, ModelConfig, Precision, RunConfig, TrainConfig, choices

# `run`'s generator-training flags carry a prefix: field -> flag, for its error messages.
RUN_FIELD_FLAGS = {"epochs": "--generator_epochs", "lr": "--generator_lr", "batch_size": "--generator_batch_size",
                   "max_length": "--generator_max_length", "model_size": "--model"}


def _add_lm_args(p: argparse.ArgumentParser, prefix: str, help_what: str, checkpoint: bool = True) -> None:
    p.add_argument(f"--{prefix}model", dest=f"{prefix}model", default=None if prefix else "gpt2",
                   help=f"{help_what}: preset (tiny = random), hub name or local HF checkpoint directory")
    if checkpoint:
        p.add_argument(f"--{prefix}checkpoint", dest=f"{prefix}checkpoint", default=None,
                       help="a training run (directory, or its best.pt/last.pt; LoRA runs too) whose weights replace "
                            "the loaded ones")


def _add_shared_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: $GPT2_TOKENIZER_DIR, ...)")
    add_device_args(p)
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generation batch / pairs per critic batch")


def _add_generation_args(p: argparse.ArgumentParser, modes) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--contexts", help="text file, one context per non-empty line")
    src.add_argument("--quora", help="Quora CSV file; its distinct sentence1 questions are the contexts")
    p.add_argument("--num_contexts", type=int, default=None, help="use the first N contexts")
    p.add_argument("--mode", choices=modes, default="rewrite",
                   help="continue: samples continuing one context pair with each other; rewrite: the LM restates the "
                        "context; paraphrase: a trained generator's 'x\\nIn other words: y' format")
    p.add_argument("--samples_per_context", type=int, default=4, help="samples drawn per context (over-generation)")
    add_decoding_args(p, max_new_tokens=32, assistant=False)
    p.set_defaults(temperature=1.0)
    p.add_argument("--seed", type=int, default=11711)


def _add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min_words", type=int, default=3)
    p.add_argument("--min_length_ratio", type=float, default=0.5, help="drop pairs with shorter/longer words below this")
    p.add_argument("--max_overlap", type=float, default=0.7,
                   help="drop near-copies: lexical similarity (--overlap_metric) above this")
    p.add_argument("--overlap_metric", choices=imp.METRICS, default="rougeL",
                   help="rougeL (rouge-score's ROUGE-L F), bleu or chrf (sacrebleu sentence scores, max of both ways)")
    _add_lm_args(p, "critic_", "the critic: a TRAINED cloze paraphrase detector; omit for rule-only filtering")
    p.add_argument("--tau", type=float, default=None, help="critic threshold on min(P(yes|a,b), P(yes|b,a))")
    p.add_argument("--max_length", type=int, default=128, help="critic prompt length in tokens")


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negatives_per_positive", type=int, default=1)
    p.add_argument("--min_negative_overlap", type=float, default=0.0,
                   help="a hard negative must share more than this word overlap with the positive's question")


def _add_generator_loss_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kl_lambda", type=float, default=0.1, help="weight of KL(student || frozen initial model)")
    p.add_argument("--kl_temperature", type=float, default=1.0, help="temperature of the KL (scaled by T^2)")
    p.add_argument("--dev_fraction", type=float, default=0.1,
                   help="share of contexts held out to pick the best epoch by y' CE (0: by the training CE)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    g = sub.add_parser("generate", help="sample candidate paraphrase pairs from an LM or a student generator")
    _add_lm_args(g, "", "the generating LM")
    _add_shared_args(g)
    _add_generation_args(g, imp.MODES)
    g.add_argument("--out", required=True, help="candidates .jsonl")

    f = sub.add_parser("filter", help="keep semantically equivalent, non-trivial, unique pairs")
    f.add_argument("--candidates", required=True, help="candidates .jsonl from `generate`")
    f.add_argument("--out", required=True, help="filtered .jsonl")
    _add_shared_args(f)
    _add_filter_args(f)

    t = sub.add_parser("train-generator", help="fine-tune the student paraphrase generator on filtered pairs")
    t.add_argument("--pairs", required=True, help="filtered .jsonl from `filter` (x = a, y' = b)")
    t.add_argument("--out", required=True, help="directory for the trained generator (Hugging Face format)")
    t.add_argument("--kl_reference", default=None,
                   help="P_T of the KL term (default: the starting model, frozen); e.g. the pretrained model when "
                        "--init_checkpoint is an earlier round's generator")
    _add_generator_loss_args(t)
    add_common_args(t, epochs=4, batch_size=8, lr=1.5e-5)

    b = sub.add_parser("build", help="labelled Quora-format pairs: positives + hard negatives")
    b.add_argument("--filtered", required=True, nargs="+", help="filtered .jsonl file(s) (several rounds: merged)")
    b.add_argument("--out", required=True, help="Quora-format .csv")
    _add_build_args(b)
    b.add_argument("--seed", type=int, default=11711)

    r = sub.add_parser("run", help="every round end to end (resumable: complete stages are skipped)")
    _add_lm_args(r, "", "the pretrained LM: round 1's generator and the KL's P_T", checkpoint=False)
    _add_shared_args(r)
    _add_generation_args(r, ("continue", "rewrite"))
    r.add_argument("--rounds", type=int, default=2)
    _add_filter_args(r)
    _add_build_args(r)
    r.add_argument("--generator_epochs", type=int, default=4)
    r.add_argument("--generator_lr", type=float, default=1.5e-5)
    r.add_argument("--generator_batch_size", type=int, default=8)
    r.add_argument("--generator_max_length", type=int, default=None, help="generator training sequence cap")
    r.add_argument("--precision", choices=choices(Precision), default="fp32", help="generator training autocast")
    r.add_argument("--no_progress", action="store_true")
    _add_generator_loss_args(r)
    add_efficiency_args(r)
    r.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


# ---- stages -------------------------------------------------------------------------------------
def load_lm(spec: str, checkpoint, device, tokenizer_dir):
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from training.checkpoint import load_model

    model = load_model(GPT2LMHeadModel, spec, checkpoint)
    return model.to(device).eval(), load_tokenizer(tokenizer_dir, spec if Path(spec).is_dir() else None)


def device_of(args):
    return resolve_device("cuda" if args.use_gpu else args.device)


def read_contexts(args) -> list[str]:
    if args.contexts:
        from common.io import read_text

        contexts = [line.strip() for line in read_text(args.contexts, "--contexts").splitlines() if line.strip()]
    else:
        from tasks.data import read_paraphrase

        contexts = list(dict.fromkeys(ex.sentence1 for ex in read_paraphrase(args.quora, labeled=False)))
    contexts = contexts[: args.num_contexts] if args.num_contexts else contexts
    if not contexts:
        raise UsageError(f"{args.contexts or args.quora}: no contexts")
    return contexts


def check_generation_args(args):
    for flag in ("samples_per_context", "batch_size") + (("num_contexts",) if args.num_contexts is not None else ()):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    if args.samples_per_context < 2 and args.mode == "continue":
        raise UsageError("--samples_per_context must be >= 2 in continue mode (pairs are made of samples)")
    decoding = generation_config(args).kwargs()
    if not decoding.get("do_sample"):
        raise UsageError(f"--decoding {args.decoding}: over-generation needs sampling (sample, top-k, top-p, top-k-p)")
    return decoding


def generate_file(args, model_spec, checkpoint, mode, contexts, decoding, device, out) -> dict:
    model, tokenizer = load_lm(model_spec, checkpoint, device, args.tokenizer)
    rows, stats = imp.generate_candidates(model, tokenizer, contexts, mode=mode, samples_per_context=args.samples_per_context,
                                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                          decoding=decoding, seed=args.seed, device=device)
    imp.write_jsonl(out, rows)
    return {**stats, "model": model_spec, "checkpoint": checkpoint}


def filter_rules(args) -> imp.FilterRules:
    if (args.critic_model is None) != (args.tau is None):
        raise UsageError("--critic_model and --tau go together: give both (critic filtering) or neither (rules only)")
    rules = imp.FilterRules(args.min_words, args.min_length_ratio, args.max_overlap, args.tau, args.overlap_metric)
    try:
        rules.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return rules


def filter_file(args, rules, critic, candidates, out) -> dict:
    kept, stats = imp.filter_pairs(imp.read_jsonl(candidates, ["context_id", "a", "b"]), rules, critic)
    imp.write_jsonl(out, kept)
    return {**stats, "critic_model": args.critic_model, "critic_checkpoint": args.critic_checkpoint}


def build_file(args, filtered, out) -> dict:
    rows, dropped = imp.merge_filtered([imp.read_jsonl(p, ["context_id", "a", "b"]) for p in filtered])
    try:
        pairs, stats = imp.build_dataset(rows, args.negatives_per_positive, args.seed, args.min_negative_overlap)
    except ValueError as exc:
        raise UsageError(f"--filtered {' '.join(map(str, filtered))}: {exc}") from None
    imp.write_quora_csv(out, pairs)
    return {**stats, "filtered_files": [str(p) for p in filtered], "duplicates_across_files": dropped}


def loss_config(args) -> gen.GeneratorLossConfig:
    try:
        return gen.GeneratorLossConfig(args.kl_lambda, args.kl_temperature, args.dev_fraction).validate()
    except ConfigError as exc:
        raise UsageError(usage_message(exc)) from None


def run_generate(args) -> dict:
    decoding = check_generation_args(args)
    contexts = read_contexts(args)
    stats = generate_file(args, args.model, args.checkpoint, args.mode, contexts, decoding, device_of(args), args.out)
    imp.write_stats(args.out, stats)
    return stats


def run_filter(args) -> dict:
    rules = filter_rules(args)
    critic = load_critic(args.critic_model, args.critic_checkpoint, device_of(args), args.tokenizer, args.batch_size,
                         args.max_length) if args.critic_model else None
    stats = filter_file(args, rules, critic, args.candidates, args.out)
    imp.write_stats(args.out, stats)
    return stats


def run_build(args) -> dict:
    stats = build_file(args, args.filtered, args.out)
    imp.write_stats(args.out, stats)
    return stats


def run_train_generator(args) -> dict:
    from training.runner import ScriptRun

    loss_cfg = loss_config(args)
    run = ScriptRun.start("impossible-generator", args, resume_free={"out"})
    stats = gen.train_generator(run, imp.read_jsonl(args.pairs, ["context_id", "a", "b"]), loss_cfg, args.out,
                                reference_spec=args.kl_reference)
    if stats is None:
        return {"stage": "train-generator", "interrupted": True, "run_dir": str(run.run_dir)}
    imp.write_stats(args.out, stats)
    return stats


# ---- run: every round ---------------------------------------------------------------------------
def generator_run_config(args, generator_in: str, run_dir: Path) -> RunConfig:
    """The typed config of one round's generator training (`run`'s prefixed flags)."""
    train = TrainConfig(epochs=args.generator_epochs, batch_size=args.generator_batch_size, lr=args.generator_lr,
                        seed=args.seed, precision=args.precision, progress=not args.no_progress,
                        resume=run_dir.is_dir())
    efficiency = EfficiencyConfig(**{f.name: getattr(args, f.name) for f in fields(EfficiencyConfig)})
    model = ModelConfig(model_size=generator_in, tokenizer=args.tokenizer, max_length=args.generator_max_length)
    signature = {"generator_in": generator_in, **asdict(train), **asdict(efficiency), "max_length": model.max_length,
                 **{k: getattr(args, k) for k in ("kl_lambda", "kl_temperature", "dev_fraction")}}
    for volatile in ("progress", "resume"):
        signature.pop(volatile)
    cfg = RunConfig(model, train, efficiency, device="cuda" if args.use_gpu else args.device, run_dir=str(run_dir),
                    signature=signature)
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise UsageError(usage_message(exc, RUN_FIELD_FLAGS)) from None


def pretrained_model(args, out: Path) -> str:
    """`--model`, or for the random `tiny` preset its weights saved once to DIR/pretrained (from --seed),
    so that generation, training and the KL reference all see the same model."""
    if args.model != "tiny":
        return args.model
    target = out / "pretrained"
    if not (target / "model.safetensors").is_file():
        from models.gpt2 import GPT2LMHeadModel
        from training.build import seed_everything

        seed_everything(args.seed)
        GPT2LMHeadModel.from_name_or_path("tiny").save_pretrained(target)
    return str(target)


def run_rounds(args) -> dict:
    from distillation.rounds import RoundStages, run_rounds as rounds
    from training.runner import ScriptRun

    decoding = check_generation_args(args)
    rules, loss_cfg = filter_rules(args), loss_config(args)
    out = Path(args.out)
    generator_run_config(args, args.model, out / "probe")  # every flag validated before any work
    contexts, device = read_contexts(args), device_of(args)
    pretrained = pretrained_model(args, out)
    critic = []  # loaded once, on first use

    def filter_stage(candidates, filtered):
        if args.critic_model and not critic:
            critic.append(load_critic(args.critic_model, args.critic_checkpoint, device, args.tokenizer,
                                      args.batch_size, args.max_length))
        return filter_file(args, rules, critic[0] if critic else None, candidates, filtered)

    def train_stage(generator_in, filtered, gen_dir, run_dir):
        run = ScriptRun.from_config("impossible-generator", generator_run_config(args, generator_in, run_dir))
        return gen.train_generator(run, imp.read_jsonl(filtered, ["context_id", "a", "b"]), loss_cfg, gen_dir,
                                   reference_spec=None if generator_in == pretrained else pretrained)

    stages = RoundStages(
        generate=lambda gen_in, mode, path: generate_file(args, gen_in, None, mode, contexts, decoding, device, path),
        filter=filter_stage, train=train_stage, build=lambda files, path: build_file(args, files, path))
    keys = {"generate": ("quora", "contexts", "num_contexts", "samples_per_context", "decoding", "temperature", "top_p",
                         "top_k", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size", "seed"),
            "filter": ("min_words", "min_length_ratio", "max_overlap", "overlap_metric", "critic_model",
                       "critic_checkpoint", "tau", "max_length"),
            "train": ("generator_epochs", "generator_lr", "generator_batch_size", "generator_max_length", "precision",
                      "kl_lambda", "kl_temperature", "dev_fraction", "seed", "model")
                     + tuple(f.name for f in fields(EfficiencyConfig)),
            "build": ("negatives_per_positive", "min_negative_overlap", "seed")}
    settings = {stage: {k: getattr(args, k) for k in names} for stage, names in keys.items()}
    return rounds(out, args.rounds, pretrained, args.mode, stages, settings)


def main(argv=None) -> dict:
    args = parse_args(argv)
    stages = {"generate": run_generate, "filter": run_filter, "build": run_build,
              "train-generator": run_train_generator, "run": run_rounds}
    stats = stages[args.stage](args)
    print(json.dumps(stats, indent=2, default=str))
    where = Path(args.out) / "summary.json" if args.stage == "run" else imp.stats_path(args.out)
    print(f"[impossible] wrote {args.out} and {where}")
    return stats


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
