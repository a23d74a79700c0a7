"""Teacher -> student distillation of GPT-2 through the shared trainer (Hinton et al., 2015; hidden-state
matching as in TinyBERT, Jiao et al., 2020; a Wasserstein-1 critic with WGAN-GP, Gulrajani et al., 2017).

The loss is  hard_weight * task loss + kl_weight * T^2 KL + mse_weight * hidden MSE + wd_weight * W1
(see distillation/losses.py).  The teacher (`--teacher`, any of our GPT-2 checkpoints, optionally with a
trainer checkpoint's weights `--teacher_checkpoint`, LoRA runs included) is frozen.  The student is
`--model_size`: `teacher` (default) = the teacher's architecture changed by `--student_layers/
--student_hidden/--student_heads`, randomly initialised or, with `--init_every_k K`, copied from every
K-th teacher layer; or any preset/hub name/directory (`--random_init` for an untrained one).  The
Wasserstein critics have their own AdamW, updated `--n_critic` times after each micro-batch (a trainer
callback); their state is saved inside the run's last.pt, so `--resume` continues them exactly.

Tasks: `--task lm` (a text corpus, perplexity) and `--task para` (Quora cloze detector, accuracy).
At the end it prints parameters, evaluation tokens/s and the dev metric of teacher and student side
by side (also `<run_dir>/report.json`) and saves the student to `<run_dir>/student` (HF format).

    python distill.py --task lm --teacher runs/teacher/student --train_file data/ptb/ptb.train.txt \\
        --valid_file data/ptb/ptb.valid.txt --student_layers 2 --kl_weight 1 --hard_weight 0
    python distill.py --task para --teacher gpt2 --teacher_checkpoint runs/para \\
        --para_train data/quora-train.csv --para_dev data/quora-dev.csv --init_every_k 2 --kl_weight 1
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from common.errors import ConfigError
from common.io import atomic_write_json
from distillation.losses import parse_layer_map
from distillation.models import (Distiller, StudentWithAligner, every_kth_layers, init_student_from_teacher,
                                 student_config)
from distillation.tasks import DistillData, lm_task, para_task
from models.gpt2 import GPT2LMHeadModel
from common.params import count_parameters
from training.checkpoint import load_model
from training.cli import UsageError, add_common_args, check_file_flags, entry_point
from training.runner import ScriptRun


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["lm", "para"], required=True)
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", default=None, help="teacher: preset, hub name or local HF directory (frozen)")
    g.add_argument("--teacher_checkpoint", default=None,
                   help="a trainer run (directory, or its best.pt/last.pt) whose weights go into the teacher")
    g.add_argument("--student_layers", type=int, default=None,
                   help="with --model_size teacher: layers of the student (default: half the teacher's)")
    g.add_argument("--student_hidden", type=int, default=None, help="with --model_size teacher: student width")
    g.add_argument("--student_heads", type=int, default=None, help="with --model_size teacher: attention heads")
    g.add_argument("--init_every_k", type=int, default=None,
                   help="initialise the student from teacher layers k-1, 2k-1, ... plus embeddings and final LN")
    g = p.add_argument_group("distillation loss")
    g.add_argument("--hard_weight", type=float, default=1.0, help="weight of the task loss on the gold labels/tokens")
    g.add_argument("--kl_weight", type=float, default=0.0, help="weight of T^2 KL(teacher || student) on softened logits")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KL term")
    g.add_argument("--mse_weight", type=float, default=0.0, help="weight of the hidden-state MSE")
    g.add_argument("--wd_weight", type=float, default=0.0, help="weight of the layer-wise Wasserstein-1 estimate")
    g.add_argument("--layer_map", default="even",
                   help="teacher layer (0-based) per student layer, comma-separated, or 'even' (evenly spaced)")
    g.add_argument("--critic_hidden", type=int, default=128, help="hidden width of each Wasserstein critic")
    g.add_argument("--critic_lr", type=float, default=1e-4, help="learning rate of the critics' AdamW")
    g.add_argument("--n_critic", type=int, default=1, help="critic updates per training micro-batch")
    g.add_argument("--gp_weight", type=float, default=10.0, help="WGAN-GP gradient-penalty weight lambda")
    g = p.add_argument_group("lm task")
    g.add_argument("--train_file", default=None, help="text corpus (lm.corpus formats: text, poetry CSV, sonnets)")
    g.add_argument("--valid_file", default=None, help="validation corpus (default: split off --valid_fraction)")
    g.add_argument("--valid_fraction", type=float, default=0.1)
    g.add_argument("--block_size", type=int, default=128, help="tokens per training block and eval window")
    g.add_argument("--eval_stride", type=int, default=None, help="eval window stride (default: --block_size)")
    g.add_argument("--max_valid_tokens", type=int, default=None, help="score only the first N valid tokens")
    g = p.add_argument_group("para task")
    g.add_argument("--para_train", default="data/quora-train.csv")
    g.add_argument("--para_dev", default="data/quora-dev.csv")
    add_common_args(p, epochs=1, batch_size=8, lr=1e-4, model_size="teacher")
    args = p.parse_args(argv)
    if args.task == "lm" and not args.train_file:
        raise UsageError("--task lm needs --train_file")
    if args.teacher is None and (args.kl_weight or args.mse_weight or args.wd_weight or args.init_every_k
                                 or args.model_size == "teacher"):
        raise UsageError("--teacher is needed for --kl/--mse/--wd_weight, --init_every_k and --model_size teacher "
                         "(without a teacher, give --model_size and only --hard_weight: plain training)")
    if args.model_size != "teacher" and (args.student_layers or args.student_hidden or args.student_heads):
        raise UsageError("--student_layers/--student_hidden/--student_heads shape a student made from the teacher's "
                         "architecture (--model_size teacher); with another --model_size use its own shape")
    for flag, low in (("student_layers", 1), ("student_hidden", 1), ("student_heads", 1), ("init_every_k", 1),
                      ("block_size", 2), ("n_critic", 1), ("critic_hidden", 1), ("eval_stride", 1),
                      ("max_valid_tokens", 2)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UsageError(f"--{flag} must be >= {low}, got {value}")
    for flag in ("hard_weight", "kl_weight", "mse_weight", "wd_weight", "gp_weight"):
        if not (getattr(args, flag) >= 0 and math.isfinite(getattr(args, flag))):
            raise UsageError(f"--{flag} must be a finite number >= 0, got {getattr(args, flag)}")
    for flag in ("temperature", "critic_lr"):
        if not (getattr(args, flag) > 0 and math.isfinite(getattr(args, flag))):
            raise UsageError(f"--{flag} must be a finite number > 0, got {getattr(args, flag)}")
    return args


def data_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags of the task's data files (checked at start-up, fingerprinted for --resume)."""
    return ("train_file", "valid_file") if args.task == "lm" else ("para_train", "para_dev")


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    check_file_flags({f"--{k}": getattr(args, k) for k in (*data_flags(args), "teacher_checkpoint")})
    model_size = args.model_size
    if model_size == "teacher":
        args.model_size = args.teacher  # what the trainer's model config records; the student is built below
    run = ScriptRun.start(f"distill-{args.task}", args, data=data_flags(args))
    device = run.device
    teacher = load_model(GPT2LMHeadModel, args.teacher, args.teacher_checkpoint).to(device) if args.teacher else None
    if model_size != "teacher":
        student = run.build(GPT2LMHeadModel)
    else:
        student = GPT2LMHeadModel(student_config(teacher.config, args.student_layers, args.student_hidden,
                                                 args.student_heads, args.init_every_k))
    if args.init_every_k:
        layers = every_kth_layers(teacher.config.num_hidden_layers, args.init_every_k)
        try:
            init_student_from_teacher(student, teacher, layers)
        except ValueError as exc:
            raise ConfigError("init_every_k", f"{args.init_every_k}: {exc}") from None
        run.say(f"[distill] student initialised from teacher layers {layers}")
    layer_map = None
    if teacher is not None:
        try:
            layer_map = parse_layer_map(args.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        except ValueError as exc:
            raise ConfigError("layer_map", str(exc)) from None
    try:
        distiller = Distiller(teacher, kl_weight=args.kl_weight, mse_weight=args.mse_weight, wd_weight=args.wd_weight,
                              hard_weight=args.hard_weight, temperature=args.temperature,
                              critic_hidden=args.critic_hidden, critic_lr=args.critic_lr, n_critic=args.n_critic,
                              gp_weight=args.gp_weight, layer_map=layer_map, seed=run.cfg.train.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model = StudentWithAligner(student, distiller.make_aligner(student)).to(device)
    train = run.cfg.train
    data = DistillData(train_file=args.train_file, valid_file=args.valid_file, valid_fraction=args.valid_fraction,
                       block_size=args.block_size, eval_stride=args.eval_stride, max_valid_tokens=args.max_valid_tokens,
                       para_train=args.para_train, para_dev=args.para_dev, max_length=run.cfg.model.max_length or 128,
                       limit=train.limit, batch_size=train.batch_size, precision=train.precision, seed=train.seed)
    task, evaluate_any = (lm_task if args.task == "lm" else para_task)(data, run.tokenizer, distiller, device, run.say)
    result = run.fit(model, task)
    if result.interrupted:
        return None
    student.save_pretrained(run.run_dir / "student", tokenizer=run.tokenizer)
    rows = {}
    with torch.no_grad():
        for name, m in (("teacher", teacher), ("student", student)):
            if m is None:
                continue
            m.eval()
            metrics = evaluate_any(m)
            rows[name] = {"parameters": count_parameters(m)[1], "layers": m.config.num_hidden_layers,
                          "hidden": m.config.hidden_size, task.metric: metrics[task.metric],
                          "eval_tokens_per_s": metrics["eval_tokens_per_s"]}
    report = {"task": args.task, "metric": task.metric, "best_epoch": result.best_epoch, "rows": rows,
              "weights": {k: getattr(args, k) for k in ("hard_weight", "kl_weight", "mse_weight", "wd_weight")},
              "temperature": args.temperature, "layer_map": distiller.layer_map, "device": str(device)}
    atomic_write_json(run.run_dir / "report.json", report)
    run.say(markdown_report(report))
    run.say(f"[distill] student saved to {run.run_dir / 'student'}; report {run.run_dir / 'report.json'}")
    return report


def markdown_report(report: dict) -> str:
    metric = report["metric"]
    lines = [f"| model | layers | hidden | parameters | {metric} | eval tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['layers']} | {r['hidden']} | {r['parameters']:,} | {r[metric]:.4f} | "
                     f"{r['eval_tokens_per_s']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
