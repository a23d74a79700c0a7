"""The Hugging Face checkpoint loader and exporter: formats, errors, round trips."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from config import GPT2Config
from models import GPT2LMHeadModel, GPT2Model
from models.hf_io import name_map


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_loads_pytorch_model_bin(tiny_hf_checkpoint, tmp_path):
    directory, hf = tiny_hf_checkpoint
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # includes the tied lm_head.weight
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 50257, (2, 7))
    assert (logits(ours, ids) - hf(input_ids=ids).logits.detach()).abs().max() < 1e-5


def test_backbone_only_checkpoint_without_prefix(tiny_hf_checkpoint, tmp_path):
    directory, hf = tiny_hf_checkpoint
    hf.transformer.save_pretrained(tmp_path)  # GPT2Model: keys without "transformer."
    assert not any(k.startswith("transformer.") for k in load_file(tmp_path / "model.safetensors"))
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 50257, (2, 7))
    assert (logits(ours, ids) - hf(input_ids=ids).logits.detach()).abs().max() < 1e-5


def _copy_with_tensors(directory, tmp_path, edit):
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return str(tmp_path)


def test_missing_key_is_named(tiny_hf_checkpoint, tmp_path):
    path = _copy_with_tensors(tiny_hf_checkpoint[0], tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: gpt_layers\.1\.interm_dense\.bias"):
        GPT2Model.from_pretrained(path)


def test_unexpected_key_is_named(tiny_hf_checkpoint, tmp_path):
    path = _copy_with_tensors(tiny_hf_checkpoint[0], tmp_path, lambda t: t.update({"transformer.h.9.foo": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected 1 tensors: transformer\.h\.9\.foo"):
        GPT2Model.from_pretrained(path)


def test_shape_mismatch_is_named(tiny_hf_checkpoint, tmp_path):
    path = _copy_with_tensors(tiny_hf_checkpoint[0], tmp_path,
                              lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(64, 192)}))
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight -> gpt_layers\.0\.interm_dense\.weight: checkpoint \(192, 64\) vs model \(256, 64\)"):
        GPT2Model.from_pretrained(path)


def test_untied_head_is_rejected(tiny_hf_checkpoint, tmp_path):
    def untie(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1
    path = _copy_with_tensors(tiny_hf_checkpoint[0], tmp_path, untie)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        GPT2LMHeadModel.from_pretrained(path)


def test_missing_files_and_directories(tiny_hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT2Model.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4).to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        GPT2Model.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        GPT2Model.from_pretrained(str(tmp_path))


def test_unsupported_variant_is_rejected(tiny_hf_checkpoint, tmp_path):
    directory = tiny_hf_checkpoint[0]
    shutil.copy(directory / "model.safetensors", tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Model.from_pretrained(str(tmp_path))


def test_export_round_trip_through_transformers(tmp_path, tokenizer_dir):
    torch.manual_seed(3)
    ours = GPT2LMHeadModel(GPT2Config.from_name("tiny")).eval()
    ours.save_pretrained(tmp_path / "ckpt", tokenizer=str(tokenizer_dir))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 50257, (2, 9))
    assert (logits(ours, ids) - hf(input_ids=ids).logits.detach()).abs().max() < 1e-5
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert torch.equal(logits(again, ids), logits(ours, ids))
    # saving again over an existing directory replaces it atomically
    ours.save_pretrained(tmp_path / "ckpt", tokenizer=str(tokenizer_dir))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_name_map_covers_every_parameter_once():
    model = GPT2Model(GPT2Config.from_name("tiny"))
    mapped = [k for ours, _ in name_map(model.config.num_hidden_layers).values() for k in ours]
    assert sorted(mapped) == sorted(n for n, _ in model.named_parameters())


def test_config_overrides_on_load(tiny_hf_checkpoint):
    model = GPT2Model.from_pretrained(str(tiny_hf_checkpoint[0]), hidden_dropout_prob=0.3)
    assert model.config.hidden_dropout_prob == 0.3
    with pytest.raises(ValueError, match="unknown config field"):
        GPT2Model.from_pretrained(str(tiny_hf_checkpoint[0]), not_a_field=1)


def test_hub_name_without_network_says_how_to_work_offline(monkeypatch, tmp_path):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in tests")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(OSError, match="local directory"):
        GPT2Model.from_pretrained("gpt2-medium")


def test_from_name_or_path(tiny_hf_checkpoint):
    assert GPT2LMHeadModel.from_name_or_path("tiny").config.hidden_size == 64
    random_small = GPT2Model.from_name_or_path("gpt2", random_init=True)
    assert random_small.config.num_hidden_layers == 12
    loaded = GPT2Model.from_name_or_path(str(tiny_hf_checkpoint[0]))
    hf = tiny_hf_checkpoint[1]
    assert torch.equal(loaded.word_embedding.weight, hf.transformer.wte.weight)
