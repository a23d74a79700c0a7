"""Teacher -> student distillation of GPT-2 through the shared trainer (Hinton et al., 2015; hidden-state
matching as in TinyBERT, Jiao et al., 2020; a Wasserstein-1 critic with WGAN-GP, Gulrajani et al., 2017).

The loss is  hard_weight * task loss + kl_weight * T^2 KL + mse_weight * hidden MSE + wd_weight * W1
(see distillation/losses.py).  The teacher (`--teacher`, any of our GPT-2 checkpoints, optionally with a
trainer checkpoint's weights `--teacher_checkpoint`) is frozen.  The student is `--model_size`:
`teacher` (default) = the teacher's architecture changed by `--student_layers/--student_hidden/
--student_heads`, randomly initialised or, with `--init_every_k K`, copied from every K-th teacher
layer; or any preset/hub name/directory (`--random_init` for an untrained one).  The Wasserstein
critics have their own AdamW, stepped `--n_critic` times per micro-batch inside the task loss; they
are saved to `<run_dir>/critic.pt` after every epoch so that `--resume` continues them.

Tasks: `--task lm` (a text corpus, perplexity) and `--task para` (Quora cloze detector, accuracy).
At the end it prints parameters, evaluation tokens/s and the dev metric of teacher and student side
by side (also `<run_dir>/report.json`) and saves the student to `<run_dir>/student` (HF format).

    python distill.py --task lm --teacher runs/teacher/student --train_file data/ptb/ptb.train.txt \\
        --valid_file data/ptb/ptb.valid.txt --student_layers 2 --kl_weight 1 --hard_weight 0
    python distill.py --task para --teacher gpt2 --teacher_checkpoint runs/para/best.pt \\
        --para_train data/quora-train.csv --para_dev data/quora-dev.csv --init_every_k 2 --kl_weight 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from distillation.losses import parse_layer_map
from distillation.models import Distiller, StudentWithAligner, every_kth_layers, init_student_from_teacher
from models.gpt2 import GPT2LMHeadModel
from models.tokenizer import load_tokenizer
from training.build import build_model, count_parameters, seed_everything, select_device
from training.checkpoint import load, save_atomic
from training.cli import add_common_args, check_common_args
from training.trainer import MetricsLog, Trainer, default_run_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["lm", "para"], required=True)
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", default=None, help="teacher: preset, hub name or local HF directory (frozen)")
    g.add_argument("--teacher_checkpoint", default=None, help="a trainer run's best.pt/last.pt loaded into the teacher")
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
    check_common_args(args)
    if args.task == "lm" and not args.train_file:
        p.error("--task lm needs --train_file")
    if args.teacher is None and (args.kl_weight or args.mse_weight or args.wd_weight or args.init_every_k
                                 or args.model_size == "teacher"):
        p.error("--teacher is needed for --kl/--mse/--wd_weight, --init_every_k and --model_size teacher "
                "(without a teacher, give --model_size and only --hard_weight: plain training)")
    if args.model_size != "teacher" and (args.student_layers or args.student_hidden or args.student_heads):
        p.error("--student_layers/--student_hidden/--student_heads shape a student made from the teacher's "
                "architecture (--model_size teacher); with another --model_size use its own shape")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def load_teacher(args, device) -> GPT2LMHeadModel:
    teacher = GPT2LMHeadModel.from_name_or_path(args.teacher)
    if args.teacher_checkpoint:
        state = load(args.teacher_checkpoint)
        state = state.get("model", state)
        if any(k.startswith("student.") for k in state):  # a distill.py run: take its student
            state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        try:
            teacher.load_state_dict(state)
        except RuntimeError as exc:
            raise SystemExit(f"--teacher_checkpoint {args.teacher_checkpoint} does not fit --teacher {args.teacher}: "
                             f"{str(exc).splitlines()[0]}") from None
    return teacher.to(device)


def build_student(args, teacher) -> GPT2LMHeadModel:
    if args.model_size != "teacher":
        return build_model(GPT2LMHeadModel, args)
    cfg = teacher.config
    hidden = args.student_hidden or cfg.hidden_size
    layers = args.student_layers
    if layers is None:
        layers = len(every_kth_layers(cfg.num_hidden_layers, args.init_every_k)) if args.init_every_k \
            else max(1, cfg.num_hidden_layers // 2)
    overrides = dict(num_hidden_layers=layers, hidden_size=hidden,
                     num_attention_heads=args.student_heads or cfg.num_attention_heads,
                     intermediate_size=4 * hidden if hidden != cfg.hidden_size else cfg.intermediate_size)
    from config import GPT2Config

    try:
        student_cfg = GPT2Config(**{**cfg.to_dict(), **overrides, "name": "student"})
    except ValueError as exc:
        raise SystemExit(f"student shape: {exc}") from None
    return GPT2LMHeadModel(student_cfg)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    device = select_device(args.use_gpu)
    seed_everything(args.seed)
    teacher = load_teacher(args, device) if args.teacher else None
    student = build_student(args, teacher)
    if args.init_every_k:
        layers = every_kth_layers(teacher.config.num_hidden_layers, args.init_every_k)
        try:
            init_student_from_teacher(student, teacher, layers)
        except ValueError as exc:
            raise SystemExit(f"--init_every_k {args.init_every_k}: {exc}") from None
        print(f"[distill] student initialised from teacher layers {layers}")
    layer_map = None
    if teacher is not None:
        try:
            layer_map = parse_layer_map(args.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    try:
        distiller = Distiller(teacher, kl_weight=args.kl_weight, mse_weight=args.mse_weight, wd_weight=args.wd_weight,
                              hard_weight=args.hard_weight, temperature=args.temperature,
                              critic_hidden=args.critic_hidden, critic_lr=args.critic_lr, n_critic=args.n_critic,
                              gp_weight=args.gp_weight, layer_map=layer_map, seed=args.seed)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model = StudentWithAligner(student, distiller.make_aligner(student)).to(device)
    tokenizer = load_tokenizer(args.tokenizer, args.teacher if args.teacher and Path(args.teacher).is_dir() else None)
    run_dir = default_run_dir(args, f"distill-{args.task}")
    from distillation.tasks import lm_task, para_task

    task, evaluate_any = (lm_task if args.task == "lm" else para_task)(args, tokenizer, distiller, device)

    critic_path = run_dir / "critic.pt"
    if args.resume and critic_path.is_file():
        distiller.load_state_dict(load(critic_path), device)
    evaluate = task.evaluate

    def evaluate_and_save_critic(m):  # runs after every epoch, before the trainer's checkpoint
        out = evaluate(m)
        if distiller.critics is not None:
            save_atomic(distiller.state_dict(), critic_path)
        return out
    task.evaluate = evaluate_and_save_critic

    result = Trainer(model, task, args, device, run_dir, MetricsLog(run_dir / "metrics.jsonl")).fit()
    if result.interrupted:
        return None
    student.save_pretrained(run_dir / "student")
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
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_report(report))
    print(f"[distill] student saved to {run_dir / 'student'}; report {run_dir / 'report.json'}")
    return report


def markdown_report(report: dict) -> str:
    metric = report["metric"]
    lines = [f"| model | layers | hidden | parameters | {metric} | eval tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['layers']} | {r['hidden']} | {r['parameters']:,} | {r[metric]:.4f} | "
                     f"{r['eval_tokens_per_s']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
