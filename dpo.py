"""Direct Preference Optimization (Rafailov et al., 2023) of GPT-2 on preference pairs, in two stages.

    pairs   build the pairs, a JSON-lines file to read before training (objectives/pairs.py), plus
            <out>.stats.json (pairs and skips by kind).  Sonnets: prompt = the first 3 lines, chosen =
            the real continuation, rejected = a corruption (shuffle, rhyme, truncate) or the model's own
            sample (--kinds sample, with the model flags and the decoding flags).  Paraphrase: prompt =
            the detector's cloze prompt of a labelled Quora pair, chosen = the right answer, rejected =
            the wrong one (any labelled Quora-format file: also impossible_distillation.py's output).
    train   DPO on the shared trainer (objectives/dpo.py): the loss exactly as the handout writes it,
            sequence log-probs summed over the response tokens, the starting model as the frozen
            reference (its log-probs computed once and kept in last.pt), --beta, --label_smoothing
            (conservative DPO) or --dpo_loss ipo.  metrics.jsonl gets reward_accuracy, reward_margin,
            chosen_reward and rejected_reward per step and epoch; the best epoch (lowest dev DPO loss)
            is the run's best.pt, loadable by every script (training.checkpoint.load_model).

Dropout is off by default (--hidden_dropout / --attention_dropout turn it on): the policy starts
exactly at the reference, whose log-probs are computed without dropout.

--task sonnet takes ANY text preference data (prompt / chosen / rejected as text; EOS appended to
each response so that stopping is part of the preference); --task paraphrase needs the records'
sentence1 / sentence2 and encodes exactly the detector's prompt (tasks/paraphrase.py).

    python dpo.py pairs --task sonnet --sonnets data/sonnets.txt --out pairs/sonnet-train.jsonl
    python dpo.py pairs --task sonnet --sonnets data/TRUE_sonnets_held_out_dev.txt --out pairs/sonnet-dev.jsonl
    python dpo.py train --task sonnet --pairs pairs/sonnet-train.jsonl --dev_pairs pairs/sonnet-dev.jsonl \\
        --init_weights runs/sonnet-... --beta 0.1 --lr 5e-6 --epochs 3 --use_gpu
"""
from __future__ import annotations

import argparse
import json
import sys

from common.errors import DataError
from distillation.impossible import stats_path, write_stats
from models.gpt2 import GPT2LMHeadModel
from objectives import pairs as P
from objectives.dpo import (DPOConfig, EncodedPairs, ReferenceLogprobs, all_logprobs, dpo_loss, encode_text_pairs,
                            fit_pairs, pair_rows, preference_logs, preference_metrics, response_logprobs)
from tasks.paraphrase import LABEL_TOKENS, encode_pairs
from training.cli import (UsageError, add_common_args, add_decoding_args, add_device_args, add_model_args,
                          check_common_args, check_file_flags, entry_point, generation_config, resolve_device)
from training.runner import ScriptRun
from training.task import TrainTask

TASKS = ("sonnet", "paraphrase")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    g = sub.add_parser("pairs", help="build preference pairs (a JSON-lines file) from task data")
    g.add_argument("--task", choices=TASKS, required=True)
    g.add_argument("--out", required=True, help="the pairs file (.jsonl); <out>.stats.json is written next to it")
    g.add_argument("--sonnets", default="data/sonnets.txt", help="sonnet task: numbered sonnets (sonnets.txt layout)")
    g.add_argument("--kinds", default=None,
                   help=f"sonnet task: comma-separated rejected kinds, one pair per sonnet and kind: "
                        f"{', '.join(P.SONNET_KINDS)} (default shuffle,rhyme,truncate)")
    g.add_argument("--prompt_lines", type=int, default=3, help="sonnet task: lines of each sonnet in the prompt")
    g.add_argument("--quora", default="data/quora-train.csv", help="paraphrase task: labelled Quora-format pairs")
    g.add_argument("--limit", type=int, default=None, help="use only the first N sonnets / question pairs")
    g.add_argument("--seed", type=int, default=11711, help="corruptions and samples")
    g.add_argument("--checkpoint", default=None,
                   help="--kinds sample: a training run (directory or .pt; LoRA runs too) whose weights sample")
    g.add_argument("--batch_size", type=int, default=8, help="--kinds sample: prompts per generate() call")
    add_model_args(g, training=False)
    add_device_args(g)
    add_decoding_args(g, max_new_tokens=256)

    t = sub.add_parser("train", help="DPO on a pairs file")
    t.add_argument("--task", choices=TASKS, required=True)
    t.add_argument("--pairs", required=True, help="training pairs (.jsonl from `dpo.py pairs`, or any preference data)")
    t.add_argument("--dev_pairs", required=True, help="dev pairs: the best epoch has the lowest dev DPO loss")
    t.add_argument("--init_weights", default=None, metavar="RUN",
                   help="start from (and take as the reference) the weights of a training run of the task script "
                        "(its directory or .pt; LoRA adapters are merged in first), on top of --model_size")
    t.add_argument("--beta", type=float, default=0.1,
                   help="DPO's beta: the strength of the implicit KL to the reference")
    t.add_argument("--label_smoothing", type=float, default=0.0,
                   help="conservative DPO: the assumed probability that a preference is flipped, in [0, 0.5)")
    t.add_argument("--dpo_loss", choices=["sigmoid", "ipo"], default="sigmoid",
                   help="sigmoid: -log sigmoid(beta h) (DPO); ipo: (h - 1/(2 beta))^2 (IPO)")
    add_common_args(t, epochs=3, batch_size=8, lr=1e-5)
    # Dropout off unless asked for (as TRL's DPOTrainer): the policy's log-probs then start equal to the
    # reference's (eval-mode) ones, so the first loss is log 2 and the rewards measure learning, not noise.
    t.set_defaults(hidden_dropout=0.0, attention_dropout=0.0)
    args = p.parse_args(argv)
    if args.stage == "pairs":
        kinds = args.kinds.split(",") if args.kinds else ["shuffle", "rhyme", "truncate"]
        if args.task == "paraphrase" and args.kinds:
            raise UsageError("--kinds is for --task sonnet (a paraphrase pair's rejected response is the wrong answer)")
        bad = [k for k in kinds if k not in P.SONNET_KINDS]
        if bad:
            raise UsageError(f"--kinds: unknown kind(s) {bad}; use {', '.join(P.SONNET_KINDS)}")
        if args.checkpoint and "sample" not in kinds:
            raise UsageError("--checkpoint is the sampling model of --kinds sample")
        if args.prompt_lines < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise UsageError("--prompt_lines, --batch_size and --limit must be >= 1")
        args.kinds = kinds
    return args


# ---- pairs ------------------------------------------------------------------------------------
def model_samples(args, sonnets) -> dict[int, str]:
    """The model's completion of every sonnet's prompt (SonnetWriter: stops at line 14)."""
    from tasks.completion import SonnetWriter
    from training.build import load_tokenizer_for, seed_everything
    from training.checkpoint import load_model

    gen = generation_config(args)
    cfg = check_common_args(args)
    device = resolve_device(cfg.device)
    seed_everything(args.seed)
    model = load_model(GPT2LMHeadModel, cfg.model.spec, args.checkpoint, random_init=cfg.model.random_init,
                       **cfg.model.overrides()).to(device)
    writer = SonnetWriter(load_tokenizer_for(cfg.model), device, batch_size=args.batch_size,
                          max_new_tokens=gen.max_new_tokens, seed=args.seed, generate_kwargs=gen.kwargs())
    prompts = [P.split_sonnet(text, args.prompt_lines)[0] for _, text in sonnets]
    return {number: text for (number, _), text in zip(sonnets, writer.complete(model, prompts))}


def run_pairs(args) -> dict:
    source = args.sonnets if args.task == "sonnet" else args.quora
    check_file_flags({"--sonnets" if args.task == "sonnet" else "--quora": source,
                      "--checkpoint": args.checkpoint}, {"--out": args.out, "--out (stats)": stats_path(args.out)})
    if args.task == "sonnet":
        from tasks.sonnets import read_numbered_sonnets

        sonnets = read_numbered_sonnets(args.sonnets)[: args.limit]
        samples = model_samples(args, sonnets) if "sample" in args.kinds else None
        pairs, stats = P.sonnet_pairs(sonnets, args.kinds, args.prompt_lines, args.seed, samples)
    else:
        from tasks.data import read_paraphrase

        pairs, stats = P.paraphrase_pairs(read_paraphrase(args.quora)[: args.limit])
    if not pairs:
        raise DataError(f"{source}: no pair could be made ({json.dumps(stats['skipped'])} skipped)")
    P.write_pairs(args.out, pairs)
    stats = {"stage": "pairs", "task": args.task, "source": source, **stats}
    write_stats(args.out, stats)
    print(json.dumps(stats, indent=2))
    print(f"[dpo] wrote {len(pairs)} pairs to {args.out} and {stats_path(args.out)}")
    return stats


# ---- train ------------------------------------------------------------------------------------
def start_from(model, run_path: str) -> None:
    """The weights of a task run; LoRA adapters merged in, every parameter trainable again."""
    from training.checkpoint import load_weights
    from training.efficient import lora_settings, merge_lora

    load_weights(model, run_path)
    if lora_settings(model) is not None:
        merge_lora(model)
        model.requires_grad_(True)


def encode_paraphrase(tokenizer, records, path, max_length: int) -> tuple[EncodedPairs, int]:
    """The detector's prompt tokens of each record's sentence1 / sentence2 and the one answer token."""
    for n, r in enumerate(records, start=1):
        if r["prompt"] != P.cloze_prompt(r["sentence1"], r["sentence2"]):
            raise DataError(f"{path}, record {n}: prompt is not the detector's prompt of its sentence1 / sentence2; "
                            f"rebuild the file with `dpo.py pairs --task paraphrase`")
        for key in ("chosen", "rejected"):
            if r[key] not in P.ANSWERS:
                raise DataError(f"{path}, record {n}: {key} must be one of {P.ANSWERS}, got {r[key]!r}")
    prompts, truncated = encode_pairs(tokenizer, [(r["sentence1"], r["sentence2"]) for r in records], max_length - 1)
    answer = {a: [int(LABEL_TOKENS[i])] for i, a in enumerate(P.ANSWERS)}
    pairs, _ = fit_pairs(prompts, [answer[r["chosen"]] for r in records], [answer[r["rejected"]] for r in records],
                         [r.get("kind", "given") for r in records], max_length)
    return pairs, truncated


def run_train(args) -> dict | None:
    cfg = DPOConfig(args.beta, args.label_smoothing, args.dpo_loss).validate()
    check_file_flags({"--pairs": args.pairs, "--dev_pairs": args.dev_pairs, "--init_weights": args.init_weights})
    run = ScriptRun.start("dpo", args, data=("pairs", "dev_pairs"))
    needs = ("sentence1", "sentence2") if args.task == "paraphrase" else ()
    records = {split: run.limit(P.read_pairs(path, needs)) for split, path in (("train", args.pairs),
                                                                               ("dev", args.dev_pairs))}
    model = run.build(GPT2LMHeadModel)
    if args.init_weights:
        start_from(model, args.init_weights)
    tokenizer, max_length, device = run.tokenizer, run.max_length(model), run.device
    batch_size, precision, pad_id = run.cfg.train.batch_size, run.cfg.train.precision, tokenizer.eos_token_id
    pairs, truncated = {}, {}
    for split, path in (("train", args.pairs), ("dev", args.dev_pairs)):
        if args.task == "paraphrase":
            pairs[split], truncated[split] = encode_paraphrase(tokenizer, records[split], path, max_length)
        else:
            pairs[split], truncated[split] = encode_text_pairs(tokenizer, records[split], max_length, append_eos=True)
        run.say(f"[dpo] {split}: {len(pairs[split])} pairs {P.kind_counts(records[split])}"
                + (f"; {truncated[split]} longer than {max_length} tokens, truncated" if truncated[split] else ""))
    run.log.write("pairs", counts={s: P.kind_counts(r) for s, r in records.items()}, truncated=truncated,
                  max_length=max_length)
    reference = ReferenceLogprobs(lambda m: {s: all_logprobs(m, pairs[s], batch_size, pad_id, device, precision)
                                             for s in pairs})

    def make_batch(indices):
        batch = pair_rows(pairs["train"], indices, pad_id)
        ref = reference["train"][indices]  # (B, 2): the reference's chosen and rejected log-probs
        return {**batch, "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}

    def loss_fn(model, batch):
        chosen, rejected = response_logprobs(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, batch["ref_chosen"],
                                                            batch["ref_rejected"], cfg)
        return losses.mean(), batch["tokens"], preference_logs(chosen_rewards, rejected_rewards)

    def evaluate(model):
        policy = all_logprobs(model, pairs["dev"], batch_size, pad_id, device, precision)
        return preference_metrics(policy, reference["dev"], pairs["dev"].kinds, cfg)

    task = TrainTask("dpo", pairs["train"].lengths(), make_batch, loss_fn, evaluate, metric="loss",
                     higher_is_better=False, callbacks=[reference])
    result = run.fit(model, task)
    if result.interrupted:
        return None
    ref_dev = reference["dev"]
    before = (ref_dev[:, 0] > ref_dev[:, 1]).float().mean().item()
    dev = {**result.best_metrics, "reference_policy_accuracy": before}
    run.log.write("final", best_epoch=result.best_epoch, dev=dev)
    run.say(f"[dpo] best epoch {result.best_epoch}: dev DPO loss {dev['loss']:.4f}, reward accuracy "
            f"{dev['reward_accuracy']:.4f}, margin {dev['reward_margin']:.4f}; the chosen response is the more likely "
            f"one in {dev['policy_accuracy']:.1%} of the dev pairs (reference {before:.1%}); policy in "
            f"{run.run_dir / 'best.pt'}")
    return dev


def main(argv=None):
    args = parse_args(argv)
    return run_pairs(args) if args.stage == "pairs" else run_train(args)


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
