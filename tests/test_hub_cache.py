"""Hub names and the Hugging Face cache: `gpt2` is found whether transformers (and the CS224N starter)
cached it as models--gpt2 or as models--openai-community--gpt2, offline, weights and tokenizer;
`from_pretrained` returns eval() models and checks the starter's d / l / num_heads."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_config
from models import GPT2LMHeadModel, GPT2Model
from models.tokenizer import TOKENIZER_ENV, _load, load_tokenizer
from starter import build_hf_cache


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in use (what HF_HOME/hub is), offline."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    _load.cache_clear()
    yield tmp_path / "hf"
    _load.cache_clear()


def _hf_logits(snapshot, ids):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(snapshot).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


@pytest.mark.parametrize("cached_as", ["gpt2", "openai-community/gpt2"])
@pytest.mark.parametrize("asked_as", ["gpt2", "openai-community/gpt2"])
def test_either_cache_name_serves_either_hub_name(hf_cache, tokenizer_dir, cached_as, asked_as):
    snapshot = build_hf_cache(hf_cache, cached_as, tiny_hf_config())
    ours = GPT2LMHeadModel.from_pretrained(asked_as)
    ids = torch.randint(0, 50257, (2, 6))
    with torch.no_grad():
        assert (ours(ids) - _hf_logits(snapshot, ids)).abs().max() < 1e-5
    tok = load_tokenizer(None, asked_as)  # no --tokenizer, no GPT2_TOKENIZER_DIR: the cache's
    assert tok("yes").input_ids == [8505] and tok.pad_token_id == 50256


def test_a_cache_entry_without_weights_is_passed_over(hf_cache, tokenizer_dir):
    """transformers' GPT2Tokenizer.from_pretrained('gpt2') caches only tokenizer files under models--gpt2."""
    tokenizer_only = build_hf_cache(hf_cache, "gpt2", tiny_hf_config())
    for name in ("model.safetensors", "config.json"):
        (tokenizer_only / name).unlink()
    full = build_hf_cache(hf_cache, "openai-community/gpt2", tiny_hf_config(), seed=1)
    ours = GPT2Model.from_pretrained("gpt2")
    assert ours.config.hidden_size == 64
    ids = torch.randint(0, 50257, (1, 5))
    with torch.no_grad():
        assert (GPT2LMHeadModel.from_pretrained("gpt2")(ids) - _hf_logits(full, ids)).abs().max() < 1e-5


def test_missing_offline_names_both_cache_entries(hf_cache):
    with pytest.raises(OSError, match=r"gpt2-medium or openai-community/gpt2-medium.*HF_HUB_OFFLINE"):
        GPT2Model.from_pretrained("gpt2-medium")


def test_from_pretrained_is_in_eval_mode_and_checks_starter_sizes(tiny_hf_checkpoint):
    directory = str(tiny_hf_checkpoint[0])
    for cls in (GPT2Model, GPT2LMHeadModel):
        model = cls.from_pretrained(directory)
        assert not model.training and not any(m.training for m in model.modules())
    model = GPT2Model.from_pretrained(model=directory, d=64, l=2, num_heads=4)  # the starter's call
    assert model.config.hidden_size == 64
    with pytest.raises(ValueError, match=r"d=768, l=12, num_heads=12\): the checkpoint .* has d=64, l=2, num_heads=4"):
        GPT2Model.from_pretrained(model=directory, d=768, l=12, num_heads=12)
    with pytest.raises(ValueError, match=r"l=3\): .* has l=2"):
        GPT2Model.from_pretrained(model=directory, l=3)


def test_dropout_is_off_after_from_pretrained(tiny_hf_checkpoint):
    """The starter's sanity_check compares right after from_pretrained: dropout must be off."""
    directory, _ = tiny_hf_checkpoint
    model = GPT2Model.from_pretrained(str(directory), hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    ids = torch.randint(0, 50257, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids)["last_hidden_state"], model(ids)["last_hidden_state"])
