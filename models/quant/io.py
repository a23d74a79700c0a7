"""Quantized GPT-2 checkpoints on disk: directories that `from_pretrained(DIR)` and therefore
`--model_size DIR` in every script load (models/hf_io.py hands a directory holding
`quantization.json` to `load_quantized`).

    DIR/config.json                  the GPT-2 config, as in a Hugging Face checkpoint
    DIR/quantization.json            how the weights were quantized (below); marks the directory
    DIR/quantized_model.safetensors  the backbone's own state dict (our names): every quantized layer
                                     as `qweight` (int8, or uint8 with two 4-bit values per byte) and
                                     `scales` (float32, (out_features, groups)), everything else
                                     (biases, LayerNorms, position embeddings, the tied embedding
                                     unless it was quantized) in full precision
    DIR/vocab.json, merges.txt       the tokenizer, when the source model had it

quantization.json: {"format": "gpt2-weight-only", "version": 1, "algorithm": "rtn" | "gptq" | "qat",
"bits": 8 | 4, "group_size": int | null (null = one group per output channel), "linear_layers":
[sub-module names quantized in every block], "embedding": null | {"bits", "group_size"},
"weights_file", "scheme" (the quantizer in words), and the algorithm's settings (e.g. "gptq")}.
transformers cannot read these directories (there is no model.safetensors): they are ours.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.quant.modules import LINEAR_LAYERS, QuantizedEmbedding, QuantizedLinear, linear_layers
from models.quant.primitives import QuantSpec

QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "quantized_model.safetensors"
FORMAT, VERSION = "gpt2-weight-only", 1
SCHEME = ("symmetric round-to-nearest per group of group_size input columns (null: per output channel): "
          "scale = max|w| / (2^(bits-1) - 0.5), q = clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1), "
          "w ~ scale * q; 4-bit q stored as q + 8, column 2j in the low nibble, 2j+1 in the high nibble")


def save_quantized(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write a quantized model (see the module docstring) and its tokenizer files (`tokenizer`: a
    tokenizer or its directory, as `models.tokenizer.write_tokenizer_files` takes it; None: no files)."""
    from safetensors.torch import save_file

    from models.hf_export import atomic_directory
    from models.tokenizer import write_tokenizer_files

    backbone = model.backbone
    info = getattr(backbone, "quantization", None)
    if info is None:
        raise ValueError("save_quantized: the model is not quantized (quantize it with quant.quantize_linears, "
                         "quant.gptq_quantize_model or quant.convert_qat first)")
    meta = {"format": FORMAT, "version": VERSION, **info, "linear_layers": list(LINEAR_LAYERS),
            "weights_file": WEIGHTS_FILE, "scheme": SCHEME}
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(backbone.config.to_hf_dict(), indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            write_tokenizer_files(tmp, tokenizer, backbone.config.max_position_embeddings)
        (tmp / QUANTIZATION_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def read_quantization(directory: str | Path) -> dict:
    """quantization.json of a quantized directory, checked field by field."""
    path = Path(directory) / QUANTIZATION_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from exc
    problems = []
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        problems.append(f"format/version {meta.get('format')!r}/{meta.get('version')!r}, expected {FORMAT!r}/{VERSION}")
    if meta.get("bits") not in (4, 8):
        problems.append(f"bits {meta.get('bits')!r}, expected 4 or 8")
    if meta.get("group_size") is not None and not isinstance(meta.get("group_size"), int):
        problems.append(f"group_size {meta.get('group_size')!r}, expected an integer or null")
    if meta.get("linear_layers") != list(LINEAR_LAYERS):
        problems.append(f"linear_layers {meta.get('linear_layers')!r}, expected {list(LINEAR_LAYERS)}")
    emb = meta.get("embedding")
    if emb is not None and (not isinstance(emb, dict) or emb.get("bits") not in (4, 8)):
        problems.append(f"embedding {emb!r}, expected null or {{'bits': 4|8, 'group_size': int|null}}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return meta


def load_quantized(cls, config, directory: str | Path):
    """A `cls` (GPT2LMHeadModel or GPT2Model) holding the quantized weights of `directory`, on the CPU.
    Every key, shape and dtype of the weights file is checked against the model it must fill."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_quantization(directory)
    spec = QuantSpec(meta["bits"], meta["group_size"])
    with torch.device("meta"):  # no memory for the full-precision weights that are replaced anyway
        model = cls(config)
        backbone = model.backbone
        for name, linear in linear_layers(model).items():
            backbone.set_submodule(name, QuantizedLinear(linear.in_features, linear.out_features, spec,
                                                         bias=linear.bias is not None))
        if meta["embedding"] is not None:
            backbone.word_embedding = QuantizedEmbedding(config.vocab_size, config.hidden_size,
                                                         QuantSpec(meta["embedding"]["bits"],
                                                                   meta["embedding"]["group_size"]))
    weights = directory / meta.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (named by {directory / QUANTIZATION_FILE})")
    state = load_file(str(weights))
    expected = backbone.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: file {tuple(state[k].shape)} {state[k].dtype} vs model {tuple(v.shape)} {v.dtype}"
                 for k, v in expected.items() if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)]
    if problems:
        raise ValueError(f"{weights} does not fit the model of {directory / 'config.json'} quantized as "
                         f"{directory / QUANTIZATION_FILE} says: " + "; ".join(problems[:10])
                         + (" ..." if len(problems) > 10 else ""))
    backbone.load_state_dict(state, strict=True, assign=True)
    backbone.quantization = {k: meta[k] for k in meta
                             if k not in ("format", "version", "linear_layers", "weights_file", "scheme")}
    return model
