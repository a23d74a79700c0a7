"""The typed configuration of a run: which model, how to train it, how to make fine-tuning cheap.

The command line (`training/cli.py`) builds these dataclasses ONCE from the flags and validates
them before any work starts; the trainer and every library below it take these objects and never
see an argparse namespace.  Validation errors are `ConfigError`s naming the FIELD (`lr`,
`lora_r`, ...); the CLI rewrites them with the flag that sets the field.

    ModelConfig       what to build: a preset / hub name / directory, tokenizer, context, and the
                      GPT2Config overrides (dropout, sparse attention) applied on top of it
    TrainConfig       the optimisation loop: epochs, batches, optimiser, schedule, precision, stop
                      rules, run directory behaviour, speed switches
    EfficiencyConfig  parameter- and memory-efficient fine-tuning: LoRA, freezing, checkpointing
    GenerationConfig  a decoding strategy and its settings -> keyword arguments of `generate()`
    RunConfig         the three plus the device, the run's resume signature, the experiment tracker
                      (`report_to`) and a sweep's control directory (`sweep_control`)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional, get_args

from common.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
OptimizerName = Literal["adamw", "sgd", "soap", "shampoo"]
ScheduleName = Literal["linear", "cosine", "constant", "inverse_sqrt"]
PeftMethod = Literal["none", "lora", "reft"]
FreezeMode = Literal["none", "embeddings", "first-half", "first-n", "all-but-head"]
Decoding = Literal["greedy", "sample", "top-k", "top-p", "top-k-p", "beam"]
ReportTo = Literal["none", "tensorboard", "wandb"]  # experiment trackers fed from the metrics log


def choices(literal) -> tuple[str, ...]:
    """The values of a Literal type, e.g. choices(Precision) == ('fp32', 'bf16', 'fp16')."""
    return tuple(get_args(literal))


def check_choice(name: str, value, literal) -> None:
    if value not in choices(literal):
        raise ConfigError(name, f"{value!r} is not one of {', '.join(choices(literal))}")


def check_unused(cfg, names: tuple[str, ...], active: bool, because: str) -> None:
    """A setting moved off its default while what reads it is off does nothing: refused, naming it."""
    if active:
        return
    defaults = {f.name: f.default for f in fields(cfg)}
    for name in names:
        if getattr(cfg, name) != defaults[name]:
            raise ConfigError(name, f"has no effect {because}")


def check_number(name: str, value, *, low=None, high=None, low_open=False, high_open=False,
                 integer=False, optional=False) -> None:
    """Finite, in range (closed bounds unless `*_open`), an int where `integer`; None where `optional`."""
    if value is None:
        if optional:
            return
        raise ConfigError(name, "a value is required")
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(name, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(name, f"must be {'<' if high_open else '<='} {high}, got {value!r}")


@dataclass
class ModelConfig:
    model_size: str = "gpt2"  # preset (tiny = random), hub name, or local Hugging Face directory
    init_checkpoint: Optional[str] = None  # a pretrain.py / save_pretrained directory: replaces model_size
    random_init: bool = False  # the architecture of model_size with random weights
    tokenizer: Optional[str] = None  # directory with vocab.json + merges.txt
    max_length: Optional[int] = None  # truncate inputs (default: the model's context)
    hidden_dropout: Optional[float] = None  # overrides GPT2Config.hidden_dropout_prob
    attention_dropout: Optional[float] = None  # overrides GPT2Config.attention_probs_dropout_prob
    attention: Optional[str] = None  # sparse attention overrides (None: the checkpoint's / default)
    attention_window: Optional[int] = None
    sparse_layers: Optional[str] = None
    attention_backend: Optional[str] = None
    attention_global_tokens: Optional[int] = None

    @property
    def spec(self) -> str:
        """What `from_name_or_path` loads."""
        return self.init_checkpoint or self.model_size

    def overrides(self) -> dict:
        """GPT2Config field -> value for every override that was set."""
        out = {"hidden_dropout_prob": self.hidden_dropout, "attention_probs_dropout_prob": self.attention_dropout,
               "attention": self.attention, "attention_window": self.attention_window,
               "sparse_layers": self.sparse_layers, "attention_backend": self.attention_backend,
               "attention_global_tokens": self.attention_global_tokens}
        return {k: v for k, v in out.items() if v is not None}

    def validate(self) -> None:
        from pathlib import Path

        if self.init_checkpoint is not None:
            if not (Path(self.init_checkpoint) / "config.json").is_file():
                raise ConfigError("init_checkpoint", f"{self.init_checkpoint}: expected a checkpoint directory holding "
                                  f"config.json and model.safetensors (pretrain.py writes one to RUN_DIR/model)")
            if self.random_init:
                raise ConfigError("init_checkpoint", "loads weights; it cannot be combined with random_init")
        check_number("max_length", self.max_length, low=8, integer=True, optional=True)
        for name in ("hidden_dropout", "attention_dropout"):
            check_number(name, getattr(self, name), low=0.0, high=1.0, high_open=True, optional=True)
        check_number("attention_global_tokens", self.attention_global_tokens, low=0, integer=True, optional=True)
        if self.attention is not None or self.attention_backend is not None or self.attention_window is not None \
                or self.sparse_layers is not None:
            from modules.attention_patterns import BACKENDS, PATTERNS, parse_sparse_layers

            if self.attention is not None and self.attention not in PATTERNS:
                raise ConfigError("attention", f"{self.attention!r} is not one of {', '.join(PATTERNS)}")
            if self.attention_backend is not None and self.attention_backend not in BACKENDS:
                raise ConfigError("attention_backend", f"{self.attention_backend!r} is not one of {', '.join(BACKENDS)}")
            check_number("attention_window", self.attention_window, low=1, integer=True, optional=True)
            if self.sparse_layers is not None:
                try:
                    parse_sparse_layers(self.sparse_layers, num_layers=None)  # the range once the model is built
                except ValueError as exc:
                    raise ConfigError("sparse_layers", str(exc)) from None


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8  # examples per micro-batch (per rank under torchrun)
    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.0  # decoupled, only on trainable tensors with >= 2 dims
    warmup_ratio: float = 0.05  # share of the optimiser steps warming the learning rate up
    lr_schedule: ScheduleName = "linear"
    optimizer: OptimizerName = "adamw"
    momentum: float = 0.9  # SGD momentum
    precondition_frequency: int = 10  # SOAP / Shampoo: steps between preconditioner (eigenbasis, root) updates
    max_precond_dim: int = 10000  # SOAP / Shampoo: larger dimensions fall back to AdamW
    shampoo_beta: Optional[float] = None  # SOAP / Shampoo: factor EMA (None: the second beta; 1: sums)
    precondition_embeddings: bool = False  # SOAP / Shampoo: precondition nn.Embedding weights too
    shampoo_grafting: Literal["adam", "none"] = "adam"  # Shampoo: step size grafted from Adam, or raw
    matrix_eps: float = 1e-6  # Shampoo: damping of the factors before the inverse roots
    layer_lr_decay: float = 1.0  # learning rate x decay^(layers above): 1 = the same everywhere
    grad_accum: int = 1  # micro-batches per optimiser step
    max_grad_norm: float = 1.0  # <= 0: no clipping
    seed: int = 11711
    precision: Precision = "fp32"
    patience: Optional[int] = None  # stop after this many epochs without a better dev metric
    limit: Optional[int] = None  # first N examples of every split (smoke runs)
    stop_after_epoch: Optional[int] = None  # stop as if interrupted, leaving a resumable checkpoint
    progress: bool = True  # tqdm bars
    resume: bool = False  # continue the run in the run directory
    compile: bool = False
    fsdp: bool = False
    peak_flops: Optional[float] = None  # FLOP/s of one device, for MFU

    def validate(self) -> None:
        check_number("epochs", self.epochs, low=0, integer=True)
        check_number("batch_size", self.batch_size, low=1, integer=True)
        check_number("grad_accum", self.grad_accum, low=1, integer=True)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_number("precondition_frequency", self.precondition_frequency, low=1, integer=True)
        check_number("max_precond_dim", self.max_precond_dim, low=1, integer=True)
        check_number("shampoo_beta", self.shampoo_beta, low=0.0, high=1.0, optional=True)
        check_number("matrix_eps", self.matrix_eps, low=0.0, low_open=True)
        if self.shampoo_grafting not in ("adam", "none"):
            raise ConfigError("shampoo_grafting", f"{self.shampoo_grafting!r} is not one of adam, none")
        check_unused(self, ("precondition_frequency", "max_precond_dim", "shampoo_beta", "precondition_embeddings"),
                     self.optimizer in ("soap", "shampoo"), "unless optimizer is soap or shampoo")
        check_unused(self, ("shampoo_grafting", "matrix_eps"), self.optimizer == "shampoo",
                     "unless optimizer is shampoo")
        check_number("layer_lr_decay", self.layer_lr_decay, low=0.0, high=1.0, low_open=True)
        check_number("max_grad_norm", self.max_grad_norm)
        check_number("seed", self.seed, low=0, integer=True)
        check_choice("precision", self.precision, Precision)
        check_choice("lr_schedule", self.lr_schedule, ScheduleName)
        from training.optimizers import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"{self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        check_number("patience", self.patience, low=1, integer=True, optional=True)
        check_number("limit", self.limit, low=1, integer=True, optional=True)
        check_number("stop_after_epoch", self.stop_after_epoch, low=0, integer=True, optional=True)
        check_number("peak_flops", self.peak_flops, low=0.0, low_open=True, optional=True)


@dataclass
class EfficiencyConfig:
    peft: PeftMethod = "none"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "attn"  # groups qv, qkv, attn, mlp, all or single layers, comma-separated
    merge_lora: bool = False  # after training, fold the adapters into the weights
    reft_rank: int = 4  # LoReFT subspace rank r (training/reft.py)
    reft_layers: str = "all"  # layers whose output is intervened: all, even, odd or indices 0,2,5
    reft_positions: str = "f1+l1"  # fN first N real tokens, lN last N, fN+lM both, or all
    freeze: FreezeMode = "none"
    freeze_layers: Optional[int] = None  # with freeze = first-n
    grad_checkpointing: bool = False
    qat: Literal["none", "int8", "int4"] = "none"  # quantization-aware training (fake-quantized linears)
    qat_group_size: int = 128  # qat int4: weights per scale group (must divide the layer widths)

    def validate(self) -> None:
        check_choice("peft", self.peft, PeftMethod)
        if self.qat not in ("none", "int8", "int4"):
            raise ConfigError("qat", f"{self.qat!r} is not one of none, int8, int4")
        check_number("qat_group_size", self.qat_group_size, low=1, integer=True)
        check_unused(self, ("qat_group_size",), self.qat == "int4", "unless qat is int4")
        check_unused(self, ("reft_rank", "reft_layers", "reft_positions"), self.peft == "reft", "unless peft is reft")
        check_choice("freeze", self.freeze, FreezeMode)
        if self.peft == "lora":
            check_number("lora_r", self.lora_r, low=1, integer=True)
            check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
            check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
            from training.efficient import resolve_lora_targets

            try:
                resolve_lora_targets(self.lora_targets)
            except ValueError as exc:
                raise ConfigError("lora_targets", str(exc).removeprefix("lora_targets: ")) from None
            if self.freeze == "all-but-head":
                raise ConfigError("peft", "lora with freeze all-but-head would freeze every adapter; drop one of them")
        elif self.merge_lora:
            raise ConfigError("merge_lora", "needs peft lora (ReFT interventions act at chosen positions and cannot be "
                              "merged into weights)" if self.peft == "reft" else "needs peft lora")
        if self.peft == "reft":
            check_number("reft_rank", self.reft_rank, low=1, integer=True)
            from training.reft import parse_positions, resolve_layers

            for name, parse in (("reft_positions", parse_positions),
                                ("reft_layers", lambda spec: resolve_layers(spec, None))):
                try:
                    parse(getattr(self, name))
                except ValueError as exc:
                    raise ConfigError(name, str(exc).removeprefix(f"{name} ")) from None
            if self.freeze == "all-but-head":
                raise ConfigError("peft", "reft with freeze all-but-head would freeze every intervention; drop one")
            if self.qat != "none":  # QAT trains weights through fake quantization; ReFT trains none of them
                raise ConfigError("qat", "reft freezes every linear layer, so fake-quantizing them trains nothing for "
                                  "the quantized model: train the interventions on the fp32 base, quantize the base "
                                  "with quantize.py and load the run onto it (--model_size DIR2/int8 or int4)")
        if (self.freeze == "first-n") != (self.freeze_layers is not None):
            raise ConfigError("freeze_layers", "goes with freeze first-n (and freeze first-n needs freeze_layers)")
        check_number("freeze_layers", self.freeze_layers, low=1, integer=True, optional=True)


@dataclass
class GenerationConfig:
    """A decoding strategy and its settings -> keyword arguments of `models.generation.generate`.

    `num_beams` means what it means in transformers: with `decoding` beam (do_sample False) it is
    beam search (default DEFAULT_BEAMS); with a sampling decoding, num_beams > 1 is beam
    sampling.  `top_k` defaults to transformers' 50 where the decoding uses it.  `assistant_model`
    (a path, loaded by the script: `experiments.textgen.load_assistant`) turns on speculative
    decoding with `num_assistant_tokens` drafts per verify step; `compile_generation` runs the
    decode steps through one compiled static step (`generate(compile=True)`)."""
    decoding: Decoding = "top-p"
    temperature: float = 1.2  # sampling modes
    top_p: float = 0.9  # top-p, top-k-p
    top_k: Optional[int] = None  # top-k, top-k-p; None: DEFAULT_TOP_K
    num_beams: Optional[int] = None  # beam (None: DEFAULT_BEAMS); sampling decodings: > 1 = beam sampling
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    compile_generation: bool = False
    assistant_model: Optional[str] = None  # speculative decoding: the draft model (HF directory or run)
    num_assistant_tokens: Optional[int] = None  # drafts per verify step; None: DEFAULT_ASSISTANT_TOKENS

    DEFAULT_TOP_K = 50  # transformers' default
    DEFAULT_BEAMS = 4  # the decoding recipe's beam width (recipes/decoding.toml)
    DEFAULT_ASSISTANT_TOKENS = 4

    @property
    def sampling(self) -> bool:
        return self.decoding not in ("greedy", "beam")

    @property
    def beams(self) -> int:
        """Beams of the run: 1 unless beam search or beam sampling."""
        if self.decoding == "beam":
            return self.DEFAULT_BEAMS if self.num_beams is None else self.num_beams
        return 1 if self.num_beams is None or not self.sampling else self.num_beams

    def validate(self) -> None:
        from pathlib import Path

        check_choice("decoding", self.decoding, Decoding)
        check_number("temperature", self.temperature, low=0.0, low_open=True)
        check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_number("top_k", self.top_k, low=1, integer=True, optional=True)
        check_number("num_beams", self.num_beams, low=1, integer=True, optional=True)
        check_number("max_new_tokens", self.max_new_tokens, low=1, integer=True)
        check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        check_number("no_repeat_ngram_size", self.no_repeat_ngram_size, low=0, integer=True)
        check_number("num_assistant_tokens", self.num_assistant_tokens, low=1, integer=True, optional=True)
        if self.decoding not in ("top-k", "top-k-p") and self.top_k is not None:
            raise ConfigError("top_k", f"is unused with decoding {self.decoding} (top-k and top-k-p use it)")
        if self.decoding == "beam" and self.num_beams == 1:
            raise ConfigError("num_beams", "1 with decoding beam: beam search needs >= 2 beams (one beam is greedy)")
        if self.decoding == "greedy" and self.num_beams not in (None, 1):
            raise ConfigError("num_beams", f"{self.num_beams} with decoding greedy: beam search is decoding beam; "
                              f"with a sampling decoding num_beams > 1 is beam sampling")
        if self.assistant_model is None:
            if self.num_assistant_tokens is not None:
                raise ConfigError("num_assistant_tokens", "is unused without assistant_model")
            return
        if not Path(self.assistant_model).exists():
            raise ConfigError("assistant_model", f"{self.assistant_model}: no such model directory, run directory or "
                              f"checkpoint file")
        if self.beams > 1:
            raise ConfigError("assistant_model", f"speculative decoding proposes one continuation per row; it does "
                              f"not combine with {self.beams} beams (decoding {self.decoding}, num_beams)")
        if self.repetition_penalty != 1.0 or self.no_repeat_ngram_size:
            raise ConfigError("assistant_model", "speculative decoding does not support repetition_penalty or "
                              "no_repeat_ngram_size; leave them at 1.0 / 0")
        if self.compile_generation:
            raise ConfigError("compile_generation", "is not available with assistant_model (the verify step of "
                              "speculative decoding changes shape)")

    def kwargs(self) -> dict:
        """Keyword arguments of `models.generation.generate` (max_new_tokens excluded: callers cap it;
        the assistant model itself is added by the script that loads it)."""
        kw = dict(repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size)
        if self.compile_generation:
            kw["compile"] = True
        if self.assistant_model is not None:
            kw["num_assistant_tokens"] = self.num_assistant_tokens or self.DEFAULT_ASSISTANT_TOKENS
        if self.beams > 1:
            kw["num_beams"] = self.beams
        if not self.sampling:
            return {**kw, "do_sample": False}
        kw.update(do_sample=True, temperature=self.temperature)
        if self.decoding in ("top-k", "top-k-p"):
            kw["top_k"] = self.DEFAULT_TOP_K if self.top_k is None else self.top_k
        if self.decoding in ("top-p", "top-k-p"):
            kw["top_p"] = self.top_p
        return kw


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run_dir: Optional[str] = None
    # The settings a resumed run must share with the run it continues ({flag: value}); made by the CLI.
    signature: dict = field(default_factory=dict)
    export_hf: Optional[str] = None  # after training: the model as a complete Hugging Face directory
    export_allow_dense: bool = False  # export a sparse-attention model although transformers runs it dense
    report_to: ReportTo = "none"  # also mirror metrics.jsonl to TensorBoard event files or wandb
    sweep_control: Optional[str] = None  # set by sweep.py: where the trial reports epochs and reads prune decisions

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.train.validate()
        self.efficiency.validate()
        if self.train.fsdp and self.train.optimizer in ("soap", "shampoo"):
            raise ConfigError("optimizer", f"{self.train.optimizer} preconditions whole matrices; a shard's Gram matrix "
                              f"is not the matrix's factor, so it cannot run under fsdp: use DDP (drop --fsdp)")
        self.validate_export()
        check_choice("report_to", self.report_to, ReportTo)
        if self.train.fsdp and self.efficiency.qat != "none":
            raise ConfigError("qat", "fake quantization of sharded weights is not supported; drop --fsdp (DDP works)")
        if self.train.fsdp and self.efficiency.peft != "none":
            raise ConfigError("fsdp", "FSDP with peft lora is not supported (adapter-only checkpoints are not gathered "
                              "across shards); LoRA models are small enough for DistributedDataParallel: drop fsdp")
        return self

    def validate_export(self) -> None:
        """Before any work: the export directory is safe to (re)place, and a sparse pattern asked for by
        the flags is not exported to transformers (which would run it dense) unless allowed.  A pattern
        that comes from a checkpoint's config.json is checked once the model is built (ScriptRun.build)."""
        if self.export_hf is None:
            if self.export_allow_dense:
                raise ConfigError("export_allow_dense", "goes with export_hf (it allows exporting a sparse model)")
            return
        if self.efficiency.peft == "reft":
            raise ConfigError("export_hf", "ReFT interventions have no transformers form: an export would hold "
                                           "the frozen base alone; keep the run (its best.pt) and load it with "
                                           "--init_checkpoint / --checkpoint")
        from models.hf_export import export_target_problem

        problem = export_target_problem(self.export_hf)
        if problem:
            raise ConfigError("export_hf", problem)
        if self.model.attention not in (None, "dense") and not self.export_allow_dense:
            raise ConfigError("export_hf", f"the model will use {self.model.attention} attention, which transformers "
                              f"does not have: the exported model would run dense there. Set export_allow_dense "
                              f"to export it anyway (config.json records the pattern; our loader restores it)")

    def to_dict(self) -> dict:
        return asdict(self)
