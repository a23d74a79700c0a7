"""The command line of every script: the ONE module that owns the shared flags.

Flags become typed configs here (`build_configs` -> `training.config.RunConfig`), validated before any
work starts; nothing below the scripts sees an argparse namespace.  Library code names config
fields in its errors (`ConfigError("lora_r", ...)`); `flag_for` maps a field to the flag that sets
it, and `entry_point` prints any `UserError` (bad flag, malformed file, unusable checkpoint) as one
line naming it, with exit status 2 and no traceback.

    add_model_args     --model_size / --init_checkpoint / --random_init / --tokenizer / --max_length
                       (training scripts: + --hidden_dropout / --attention_dropout and sparse attention)
    add_device_args    --device {auto,cpu,cuda,cuda:N}, --use_gpu (the starter's spelling of --device cuda)
    add_common_args    everything a training script shares (model, device, optimisation, run,
                       LoRA / freezing, speed, sparse attention, --export_hf)
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Iterable, Optional

from common.errors import ConfigError, UserError
from training.config import (Decoding, EfficiencyConfig, FreezeMode, GenerationConfig, ModelConfig, PeftMethod,
                             Precision, ReportTo, RunConfig, ScheduleName, TrainConfig, choices)

# Config fields whose flag is not `--<field>` (GPT2Config fields included: errors raised while building a model).
FIELD_FLAGS = {
    "progress": "--no_progress",
    "hidden_dropout_prob": "--hidden_dropout",
    "attention_probs_dropout_prob": "--attention_dropout",
    "fine_tune_mode": "--fine-tune-mode",
}
# Flags that may differ between a run and its resumption: they do not change what is trained.
RESUME_FREE = {"resume", "run_dir", "stop_after_epoch", "no_progress", "compile", "compile_generation", "peak_flops",
               "merge_lora", "device", "use_gpu", "export_hf", "export_allow_dense", "report_to", "sweep_control"}


def flag_for(field: str, extra: Optional[dict] = None) -> str:
    """The flag that sets config field `field` (a script may map its own fields with `extra`)."""
    return {**FIELD_FLAGS, **(extra or {})}.get(field, f"--{field}")


def usage_message(exc: ConfigError, extra: Optional[dict] = None) -> str:
    return f"{flag_for(exc.field, extra)}: {exc.detail}"


# ---- flags ----------------------------------------------------------------------------------
def add_device_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("device")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N; under torchrun each rank "
                        "takes cuda:LOCAL_RANK")
    g.add_argument("--use_gpu", action="store_true", help="the starter's flag: the same as --device cuda")


def add_model_args(parser: argparse.ArgumentParser, *, model_size: str = "gpt2", training: bool = True) -> None:
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
    if training:
        g.add_argument("--hidden_dropout", type=float, default=None,
                       help="dropout on embeddings and residual branches (default: the checkpoint's, 0.1 for GPT-2)")
        g.add_argument("--attention_dropout", type=float, default=None,
                       help="dropout on attention probabilities (default: the checkpoint's, 0.1 for GPT-2)")
    add_attention_args(parser)


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """A flag left out changes nothing: a new model gets the config defaults (dense, 64, all, auto)
    and a checkpoint keeps the settings saved in its config.json."""
    from modules.attention_patterns import BACKENDS, PATTERNS

    g = parser.add_argument_group("sparse attention")
    g.add_argument("--attention", choices=PATTERNS, default=None,
                   help="attention pattern of the sparse layers: dense (causal), logsparse (itself and keys "
                        "2^j behind), local (the last --attention_window keys), hybrid (local + logsparse); "
                        "default: dense, or what the checkpoint was saved with")
    g.add_argument("--attention_window", type=int, default=None,
                   help="window W of the local and hybrid patterns: position l sees l-W+1 .. l (default 64)")
    g.add_argument("--sparse_layers", type=str, default=None,
                   help="which layers use --attention (the rest stay dense): all, even, odd, or "
                        "comma-separated layer indices such as 0,2,5 (default all)")
    g.add_argument("--attention_global_tokens", type=int, default=None, metavar="N",
                   help="Longformer-style global tokens: the first N positions of every row attend to every "
                        "earlier position and every query attends to them (sparse patterns only; default 0)")
    g.add_argument("--attention_backend", choices=BACKENDS, default=None,
                   help="execution path of the sparse layers: sdpa (dense SDPA with a boolean mask, the reference), "
                        "sparse (blocked/gathered attention whose work grows like T x keys, dropout included), flex "
                        "(FlexAttention block masks, compiled on CUDA, no dropout), auto (default: the fastest "
                        "correct one for the device, pattern, length and dropout; modules/attention_patterns.py)")


def add_train_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    from training.optimizers import OPTIMIZERS

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch_size", type=int, default=batch_size, help="examples per micro-batch")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                   help="adamw: ours (optimizer.py, the default); sgd: torch's SGD with --momentum; soap / shampoo: "
                        "second-order (optim/, docs/optimizers.md); the rest: torch.optim's own "
                        "(training/torch_optimizers.py)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--precondition_frequency", type=int, default=10,
                   help="SOAP/Shampoo: optimiser steps between preconditioner updates")
    g.add_argument("--max_precond_dim", type=int, default=10000,
                   help="SOAP/Shampoo: matrices with a larger dimension take AdamW steps")
    g.add_argument("--shampoo_beta", type=float, default=None,
                   help="SOAP/Shampoo: EMA of the Kronecker factors (default: the second Adam beta; 1 = sums)")
    g.add_argument("--precondition_embeddings", action="store_true",
                   help="SOAP/Shampoo: precondition the embedding matrices too (default: AdamW steps for them)")
    g.add_argument("--shampoo_grafting", choices=["adam", "none"], default="adam",
                   help="Shampoo: step size grafted from Adam (default) or the raw preconditioned step")
    g.add_argument("--matrix_eps", type=float, default=1e-6, help="Shampoo: damping before the inverse roots")
    g.add_argument("--weight_decay", type=float, default=0.0,
                   help="decoupled weight decay, applied only to trainable tensors with >= 2 dims")
    g.add_argument("--lr_schedule", choices=choices(ScheduleName), default="linear",
                   help="after the warm-up: linear decay to 0, cosine decay to 0, constant, or 1/sqrt(step)")
    g.add_argument("--warmup_ratio", type=float, default=0.05,
                   help="fraction of the optimiser steps spent warming the learning rate up linearly")
    g.add_argument("--layer_lr_decay", type=float, default=1.0,
                   help="layer-wise learning-rate decay: layer i of L trains at lr * decay^(L - i) (1 = off)")
    g.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches accumulated per optimiser step (effective batch = batch_size * grad_accum)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm (<= 0: no clipping)")
    g.add_argument("--patience", type=int, default=None,
                   help="early stopping: end training after N epochs without a better dev metric")
    g.add_argument("--seed", type=int, default=11711)
    g.add_argument("--precision", choices=choices(Precision), default="fp32",
                   help="autocast dtype for forward passes (fp16 adds a gradient scaler)")
    g = parser.add_argument_group("run")
    g.add_argument("--run_dir", type=str, default=None,
                   help="directory for checkpoints and metrics.jsonl (default: a new runs/<script>-<time>)")
    g.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                   help="continue the run saved in RUN_DIR; ends with the same result as an uninterrupted run")
    g.add_argument("--stop_after_epoch", type=int, default=None,
                   help="stop (as if interrupted) after this many epochs, leaving a resumable checkpoint")
    g.add_argument("--limit", type=int, default=None, help="use only the first N examples of every split (smoke runs)")
    g.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")
    g.add_argument("--report_to", choices=choices(ReportTo), default="none",
                   help="also send every metrics.jsonl record to an experiment tracker: tensorboard (event files "
                        "in the run dir: scalars per step and per epoch, the flags as hparams) or wandb (needs "
                        "`pip install wandb`; offline unless WANDB_MODE is set); metrics.jsonl stays the record")
    g.add_argument("--sweep_control", default=None, metavar="DIR",
                   help="set by sweep.py: after each epoch the run reports its dev metrics in DIR and waits for the "
                        "sweep's decision to continue or stop (pruning)")


def add_efficiency_args(parser: argparse.ArgumentParser) -> None:
    from training.efficient import LORA_MODULES

    g = parser.add_argument_group("parameter- and memory-efficient fine-tuning")
    g.add_argument("--peft", choices=choices(PeftMethod), default="none",
                   help="lora: freeze the base model and train peft LoRA adapters (plus the task head, if any); "
                        "reft: freeze it and train LoReFT interventions on hidden states (--reft_*); checkpoints "
                        "then hold only adapters / interventions, head and hyper-parameters")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=float, default=32.0, help="LoRA alpha; the update is scaled by alpha / r")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA branch's input")
    g.add_argument("--lora_targets", type=str, default="attn",
                   help="layers to adapt, comma-separated: groups qv, qkv, attn (q,k,v,out), mlp, all, or layers "
                        + ", ".join(LORA_MODULES))
    g.add_argument("--merge_lora", action="store_true",
                   help="after training, merge the adapters into the weights (W + alpha/r * B A) for prediction "
                        "and generation")
    g.add_argument("--reft_rank", type=int, default=4, help="ReFT: rank r of the LoReFT subspace")
    g.add_argument("--reft_layers", type=str, default="all",
                   help="ReFT: layers whose output is intervened: all, even, odd or indices such as 0,2,5")
    g.add_argument("--reft_positions", type=str, default="f1+l1",
                   help="ReFT: tokens intervened in each input: fN (first N real tokens), lN (last N), fN+lM, or "
                        "all; generation intervenes the prompt's at prefill (all: every token; for LM training "
                        "prefer fN or all, which select the same tokens in training and generation)")
    g.add_argument("--freeze", choices=choices(FreezeMode), default="none",
                   help="freeze part of the model: embeddings; first-half (embeddings + first half of the layers); "
                        "first-n (embeddings + first --freeze_layers layers); all-but-head (train the task head only)")
    g.add_argument("--freeze_layers", type=int, default=None, metavar="N", help="layers frozen by --freeze first-n")
    g.add_argument("--qat", choices=["none", "int8", "int4"], default="none",
                   help="quantization-aware training: every block linear layer computes with its weights fake-"
                        "quantized (straight-through gradients), so the model survives quantize.py's int8/int4; "
                        "docs/quantization.md")
    g.add_argument("--qat_group_size", type=int, default=128,
                   help="--qat int4: weights per scale group (must divide the layer widths; 64 for the tiny model)")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute each transformer layer in the backward pass: less activation memory, ~1/3 "
                        "more compute")


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speed and scale")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (first steps are slow while it compiles)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimiser state over the ranks "
                        "(FSDP2 fully_shard per GPT2Layer) instead of replicating them (DDP)")
    g.add_argument("--peak_flops", type=float, default=None,
                   help="peak FLOP/s of one device for MFU (default: a table of known GPUs; on the CPU "
                        "no MFU is reported unless this is given)")


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """--export_hf: the trained model for transformers' real clients (training/runner.py ScriptRun.export)."""
    g = parser.add_argument_group("export")
    g.add_argument("--export_hf", type=str, default=None, metavar="DIR",
                   help="after training, write the trained model to DIR as a complete Hugging Face directory "
                        "(config.json, model.safetensors, generation_config.json, vocab.json, merges.txt, "
                        "tokenizer_config.json) that transformers' AutoModelForCausalLM, AutoTokenizer and pipeline "
                        "load; LoRA is merged into the weights and the adapter is also saved in peft's format in "
                        "DIR/lora_adapter; classifier.py writes DIR/sst and DIR/cfimdb (the GPT-2 backbone: the "
                        "classifier head stays in the run's best.pt). DIR must be new, empty or a previous export")
    g.add_argument("--export_allow_dense", action="store_true",
                   help="with --export_hf, export a sparse-attention model anyway: config.json records the pattern "
                        "(our loader restores it) but transformers runs every layer dense, so its outputs differ")


def add_decoding_args(parser: argparse.ArgumentParser, *, max_new_tokens: int = 256, assistant: bool = True) -> None:
    """The decoding strategy and its settings (-> GenerationConfig -> `generate()` arguments).
    `assistant`: also --assistant_model / --num_assistant_tokens (scripts that load the draft model
    with `experiments.textgen.load_assistant`)."""
    d = GenerationConfig
    g = parser.add_argument_group("decoding (arguments of model.generate)")
    g.add_argument("--decoding", choices=choices(Decoding), default="top-p",
                   help="greedy, sampling (sample, top-k, top-p, top-k-p: do_sample) or beam search (beam)")
    g.add_argument("--temperature", type=float, default=1.2, help="sampling temperature (sampling modes)")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus mass (top-p, top-k-p)")
    g.add_argument("--top_k", type=int, default=None,
                   help=f"tokens kept (top-k, top-k-p; default {d.DEFAULT_TOP_K}, transformers' default)")
    g.add_argument("--num_beams", type=int, default=None,
                   help=f"beams, as in transformers: with --decoding beam beam search (default {d.DEFAULT_BEAMS}); "
                        f"with a sampling decoding > 1 is beam sampling (default 1)")
    g.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="cap on new tokens per prompt")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL's penalty on tokens already present")
    g.add_argument("--no_repeat_ngram_size", type=int, default=0, help="ban repeating n-grams of this size (0: off)")
    g.add_argument("--compile_generation", action="store_true",
                   help="decode through one torch.compile'd static step (CUDA graphs on a GPU; the same tokens as "
                        "eager; compiling costs seconds; on a CPU the eager step is faster from batch 2 on). Not "
                        "--compile, which compiles the model for training")
    if assistant:
        g.add_argument("--assistant_model", default=None, metavar="PATH",
                       help="speculative decoding (Leviathan et al. 2023): a smaller draft model with the same "
                            "tokenizer (a Hugging Face directory, or a training run / its best.pt) proposes tokens "
                            "that the model verifies in one forward; greedy output is unchanged, sampling keeps "
                            "its distribution; the acceptance rate is printed")
        g.add_argument("--num_assistant_tokens", type=int, default=None, metavar="K",
                       help=f"with --assistant_model: tokens drafted per verify step (default "
                            f"{d.DEFAULT_ASSISTANT_TOKENS})")


DECODING_FLAGS = {"decoding", "temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "repetition_penalty",
                  "no_repeat_ngram_size", "compile_generation", "assistant_model", "num_assistant_tokens"}


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The validated GenerationConfig of the decoding flags."""
    cfg = _fill(GenerationConfig, args)
    cfg.validate()
    return cfg


def add_smart_args(parser: argparse.ArgumentParser) -> None:
    """SMART (objectives/smart.py) for the classification scripts -> `smart_config(args)`."""
    g = parser.add_argument_group("SMART regularisation (Jiang et al., 2020; objectives/smart.py)")
    g.add_argument("--smart_lambda", type=float, default=0.0,
                   help="weight lambda_s of the smoothness-inducing adversarial regulariser: the symmetric KL "
                        "between the predictions for clean and adversarially perturbed input embeddings (0: off)")
    g.add_argument("--smart_eps", type=float, default=1e-5, help="infinity-norm radius eps of the perturbation")
    g.add_argument("--smart_steps", type=int, default=1, help="projected gradient-ascent steps on the perturbation")
    g.add_argument("--smart_step_size", type=float, default=1e-3, help="ascent step size eta")
    g.add_argument("--smart_noise", type=float, default=1e-5, help="std sigma of the perturbation's random start")
    g.add_argument("--bregman_mu", type=float, default=0.0,
                   help="weight mu of the momentum Bregman proximal point term: the symmetric KL to the "
                        "predictions of an EMA copy of the model (0: off)")
    g.add_argument("--bregman_beta", type=float, default=0.99, help="momentum beta of the EMA copy")


def smart_config(args: argparse.Namespace):
    """The validated `objectives.smart.SmartConfig` of the SMART flags."""
    from objectives.smart import SmartConfig, refuse_fsdp

    cfg = _fill(SmartConfig, args).validate()
    refuse_fsdp(cfg, getattr(args, "fsdp", False))
    return cfg


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int = 10, batch_size: int = 8,
                    lr: float = 1e-5, model_size: str = "gpt2") -> argparse.ArgumentParser:
    """Every flag the training scripts share; each script passes its own defaults (the starter's)."""
    add_model_args(parser, model_size=model_size)
    add_train_args(parser, epochs=epochs, batch_size=batch_size, lr=lr)
    add_device_args(parser)
    add_efficiency_args(parser)
    add_speed_args(parser)
    add_export_args(parser)
    return parser


# ---- flags -> configs -----------------------------------------------------------------------
def _fill(cls, args: argparse.Namespace, **extra):
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def _signature_value(v):
    ok = (int, float, str, bool, type(None))
    return v if isinstance(v, ok) or (isinstance(v, list) and all(isinstance(x, ok) for x in v)) else str(v)


def signature(args: argparse.Namespace, resume_free: Iterable[str] = ()) -> dict:
    """The flags a resumed run must share with the run it continues: all but the resume-free ones."""
    free = RESUME_FREE | set(resume_free)
    return {flag_for(k): _signature_value(v) for k, v in sorted(vars(args).items()) if k not in free}


@functools.lru_cache(maxsize=1)
def shared_defaults() -> dict:
    """Signature key -> default of every shared flag: what a run started before the flag existed ran
    with (a new flag's default keeps the old behaviour), so `--resume` accepts it at that value."""
    parser = argparse.ArgumentParser(add_help=False)
    add_common_args(parser)
    add_smart_args(parser)
    return {flag_for(a.dest): _signature_value(a.default) for a in parser._actions}


def build_configs(args: argparse.Namespace, resume_free: Iterable[str] = ()) -> RunConfig:
    """The run's typed configuration from the parsed flags, validated (ConfigError names the field).
    `resume_free`: the script's own flags that may change on `--resume` (e.g. output paths)."""
    from training.distributed import env_world_size

    device = "cuda" if getattr(args, "use_gpu", False) else getattr(args, "device", "auto")
    train = _fill(TrainConfig, args, progress=not getattr(args, "no_progress", False),
                  resume=bool(getattr(args, "resume", None))) if hasattr(args, "epochs") else TrainConfig()
    cfg = RunConfig(model=_fill(ModelConfig, args), train=train, efficiency=_fill(EfficiencyConfig, args),
                    device=device, run_dir=getattr(args, "resume", None) or getattr(args, "run_dir", None),
                    signature=signature(args, resume_free), export_hf=getattr(args, "export_hf", None),
                    export_allow_dense=getattr(args, "export_allow_dense", False),
                    report_to=getattr(args, "report_to", "none"), sweep_control=getattr(args, "sweep_control", None))
    cfg.validate()
    check_device(device)
    if cfg.train.fsdp and env_world_size() < 2:
        raise ConfigError("fsdp", "shards the model over several processes; start the script with torchrun "
                          "--nproc_per_node N (N >= 2), or drop --fsdp")
    if getattr(args, "resume", None) and getattr(args, "run_dir", None) and args.run_dir != args.resume:
        raise ConfigError("run_dir", f"--resume {args.resume} continues that run directory; drop --run_dir "
                          f"{args.run_dir}")
    return cfg


def check_common_args(args: argparse.Namespace, resume_free: Iterable[str] = ()) -> RunConfig:
    """`build_configs`, with a ConfigError turned into the CLI's usage error (exit status 2)."""
    try:
        return build_configs(args, resume_free)
    except ConfigError as exc:
        raise UsageError(usage_message(exc)) from None


def check_device(device: str) -> None:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError("device", f"{device!r}: use auto, cpu, cuda or cuda:N")


class UsageError(UserError):
    """A bad flag, already phrased with the flag's name."""


def check_file_flags(inputs: Optional[dict] = None, outputs: Optional[dict] = None) -> None:
    """A script's files, checked before any work: every input exists; no output is a directory, an
    input, or the file of another output (one would overwrite the other).  Keys name the flags in
    the messages; values are a path, a list of paths or None (not given)."""
    import os

    def paths(table):
        for flag, value in (table or {}).items():
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if path is not None:
                    yield flag, str(path), os.path.realpath(path)

    read = {}
    for flag, path, real in paths(inputs):
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file")
        read.setdefault(real, (flag, path))
    written = {}
    for flag, path, real in paths(outputs):
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a directory; give the output file's path")
        if real in read:
            raise UsageError(f"{flag} {path} is also the input {read[real][0]} {read[real][1]}; writing it would "
                             f"destroy the input: choose another output file")
        if real in written:
            raise UsageError(f"{written[real]} and {flag} both write {path}; give each output its own file")
        written[real] = flag


def resolve_device(device: str):
    """The torch.device of `--device` (auto: CUDA when available); under torchrun also joins the
    process group and takes cuda:LOCAL_RANK (see training/distributed.py)."""
    import torch

    from training.distributed import init_from_env

    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} (or --use_gpu) was given but no CUDA device is available "
                         f"(torch.cuda.is_available() is False); use --device cpu, or install a CUDA build of torch")
    return init_from_env(torch.device(device))


def entry_point(main: Callable, field_flags: Optional[dict] = None) -> Callable:
    """Wrap a script's `main(argv)` so that a UserError or a weights file that cannot be used (and a
    ConfigError, rewritten with the flag of its field) ends the process with one line on stderr and
    exit status 2, and a ^C with 130."""
    from models.hf_io import WeightsFileError  # models/ cannot depend on common/: its own user error

    @functools.wraps(main)
    def run(argv=None):
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv else "script"
        try:
            return main(argv)
        except ConfigError as exc:
            print(f"{prog}: error: {usage_message(exc, field_flags)}", file=sys.stderr)
        except (UserError, WeightsFileError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        raise SystemExit(2)
    return run
