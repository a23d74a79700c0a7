"""The flags every training script shares, added by ONE function so the scripts stay consistent."""
from __future__ import annotations

import argparse

from modules.attention_patterns import add_attention_args, attention_overrides
from training.distributed import env_world_size
from training.efficient import add_efficiency_args, check_efficiency_args
from training.speed import add_speed_args


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int = 10, batch_size: int = 8,
                    lr: float = 1e-5, model_size: str = "gpt2") -> argparse.ArgumentParser:
    """Model, device, precision, optimisation, run-directory and smoke-run flags.

    Each script passes its own defaults (the starter's) for epochs, batch size and learning rate.
    The efficiency (LoRA, freezing, checkpointing), speed (compile, FSDP, MFU) and attention-pattern
    flags are added here too, so every script gets them.
    """
    g = parser.add_argument_group("model")
    g.add_argument("--model_size", type=str, default=model_size,
                   help="preset (tiny = random init, no download; gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
                        "hub name, or local Hugging Face checkpoint directory")
    g.add_argument("--init_checkpoint", type=str, default=None, metavar="DIR",
                   help="start from the weights in DIR, a checkpoint directory written by pretrain.py or "
                        "save_pretrained (config.json + model.safetensors); takes the place of --model_size")
    g.add_argument("--random_init", action="store_true",
                   help="build the architecture of --model_size with random weights (no download)")
    g.add_argument("--tokenizer", type=str, default=None,
                   help="directory with vocab.json and merges.txt (default: $GPT2_TOKENIZER_DIR, the model "
                        "directory, then the hub's gpt2)")
    g.add_argument("--max_length", type=int, default=None,
                   help="truncate inputs to this many tokens (default: the model's context length)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch_size", type=int, default=batch_size, help="examples per micro-batch")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW decoupled weight decay, applied only to trainable tensors with >= 2 dims")
    g.add_argument("--warmup_ratio", type=float, default=0.05,
                   help="fraction of the optimiser steps spent warming the learning rate up linearly; "
                        "it then decays linearly towards 0")
    g.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches accumulated per optimiser step (effective batch = batch_size * grad_accum)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm (<= 0: no clipping)")
    g.add_argument("--seed", type=int, default=11711)
    g = parser.add_argument_group("device and precision")
    g.add_argument("--use_gpu", action="store_true", help="run on CUDA (an error if no CUDA device is present)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype for forward passes (fp16 adds a gradient scaler)")
    g = parser.add_argument_group("run")
    g.add_argument("--run_dir", type=str, default=None,
                   help="directory for checkpoints and metrics.jsonl (default: runs/<script>-<timestamp>)")
    g.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                   help="continue the run saved in RUN_DIR; ends with the same result as an uninterrupted run")
    g.add_argument("--stop_after_epoch", type=int, default=None,
                   help="stop (as if interrupted) after this many epochs, leaving a resumable checkpoint")
    g.add_argument("--limit", type=int, default=None, help="use only the first N examples of every split (smoke runs)")
    g.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")
    add_efficiency_args(parser)
    add_speed_args(parser)
    add_attention_args(parser)
    return parser


def config_overrides(args: argparse.Namespace) -> dict:
    """Model-config overrides implied by the common flags (the attention pattern flags)."""
    return dict(attention_overrides(args))


def check_common_args(args: argparse.Namespace) -> None:
    """Reject nonsensical values with a message naming the flag."""
    for flag in ("epochs", "batch_size", "grad_accum"):
        if getattr(args, flag) < (0 if flag == "epochs" else 1):
            raise SystemExit(f"--{flag} must be {'>= 0' if flag == 'epochs' else '>= 1'}, got {getattr(args, flag)}")
    if args.lr <= 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        raise SystemExit(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    if getattr(args, "init_checkpoint", None):
        from pathlib import Path

        if not (Path(args.init_checkpoint) / "config.json").is_file():
            raise SystemExit(f"--init_checkpoint {args.init_checkpoint}: expected a checkpoint directory holding "
                             f"config.json and model.safetensors (pretrain.py writes one to RUN_DIR/model)")
        if args.random_init:
            raise SystemExit("--init_checkpoint loads weights; it cannot be combined with --random_init")
        args.model_size = args.init_checkpoint
    if args.max_length is not None and args.max_length < 8:
        raise SystemExit(f"--max_length must be >= 8, got {args.max_length}")
    check_efficiency_args(args)
    if getattr(args, "fsdp", False) and env_world_size() < 2:
        raise SystemExit("--fsdp shards the model over several processes; start the script with "
                         "torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
    if getattr(args, "fsdp", False) and getattr(args, "peft", "none") != "none":
        raise SystemExit("--fsdp with --peft lora is not supported (adapter-only checkpoints are not gathered "
                         "across shards); LoRA models are small enough for DistributedDataParallel: drop --fsdp")
    if getattr(args, "peak_flops", None) is not None and args.peak_flops <= 0:
        raise SystemExit(f"--peak_flops must be > 0 (FLOP/s of one device), got {args.peak_flops}")
