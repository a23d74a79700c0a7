"""The CS224N starter's public surface on our classes: embed(input_ids), encode(hidden_states,
attention_mask) with the starter's additive extended mask, forward's dict, hidden_state_to_token,
checked against transformers; a float mask reaching a layer is made causal or refused, never
silently non-causal."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from models import GPT2LMHeadModel, GPT2Model
from modules.attention import as_causal_mask
from starter import STARTER, needs_starter

IDS = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0], [101, 7592, 15756, 2897, 2005, 17953, 2361, 102]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])  # the starter's sanity_check batch


def starter_extended_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """The starter's own utils.get_extended_attention_mask (its file, loaded where it lies)."""
    spec = importlib.util.spec_from_file_location("cs224n_starter_utils", STARTER / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils.get_extended_attention_mask(mask, dtype)


def _reference(hf, ids=IDS, mask=MASK):
    with torch.no_grad():
        return hf.transformer(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]


@needs_starter
def test_the_starters_encode_loop_on_our_layers_matches_transformers(tiny_hf_checkpoint):
    """The starter's GPT2Model.forward, step by step (embed -> its extended mask -> each GPT2Layer
    -> final_layer_norm), on our modules: the additive mask is made causal, so it equals transformers."""
    directory, hf = tiny_hf_checkpoint
    ours = GPT2Model.from_pretrained(model=str(directory))
    with torch.no_grad():
        h = ours.embed(input_ids=IDS)
        extended = starter_extended_mask(MASK, h.dtype)  # (B, 1, 1, T): 0 or -10000
        assert extended.shape == (2, 1, 1, 8) and extended.is_floating_point()
        for layer in ours.gpt_layers:
            h = layer(h, extended)
        h = ours.final_layer_norm(h) * MASK[..., None]
    assert (h - _reference(hf)).abs().max() < 1e-5


def test_starter_api_encode_embed_forward_and_logits(tiny_hf_checkpoint):
    directory, hf = tiny_hf_checkpoint
    ours = GPT2Model.from_pretrained(model=str(directory))
    with torch.no_grad():
        embedded = ours.embed(IDS)  # the starter's embed(input_ids): positions 0..T-1
        assert torch.equal(embedded, ours.embed(IDS, torch.arange(8)[None]))
        encoded = ours.encode(embedded, MASK)  # the starter's encode(hidden_states, attention_mask): no final LN
        out = ours(IDS, MASK)  # forward -> {'last_hidden_state', 'last_token'}
        assert set(out) == {"last_hidden_state", "last_token"}
        assert torch.allclose(ours.final_layer_norm(encoded), out["last_hidden_state"], atol=1e-6)
        assert ((out["last_hidden_state"] * MASK[..., None]) - _reference(hf)).abs().max() < 1e-5
        assert torch.equal(out["last_token"], out["last_hidden_state"][torch.arange(2), MASK.sum(1) - 1])
        logits = ours.hidden_state_to_token(out["last_hidden_state"])
        assert (logits * MASK[..., None] - hf(input_ids=IDS, attention_mask=MASK).logits * MASK[..., None]).abs().max() < 1e-4
        lm = GPT2LMHeadModel.from_pretrained(str(directory))
        assert torch.allclose(lm(IDS, MASK), logits, atol=1e-5)
    with pytest.raises(ValueError, match="position_ids and cache_start go with token ids"):
        ours.encode(embedded, MASK, cache_start=0)


def test_padding_masks_reaching_a_layer_are_made_causal():
    T = 5
    keep = torch.tensor([[True, True, True, False, False]])
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    expected = (causal & keep) | torch.eye(T, dtype=torch.bool)  # (T, T); a padded query still sees itself
    for given in (keep[:, None, None, :], (~keep[:, None, None, :]).float() * -10000.0,
                  (~keep[:, None, None, :]).float() * torch.finfo(torch.float32).min):
        assert torch.equal(as_causal_mask(given, T)[0, 0], expected)
    full = expected[None, None]
    assert as_causal_mask(full, T) is full  # our own per-query boolean masks pass unchanged
    assert as_causal_mask(None, T) is None


def test_masks_that_cannot_be_made_causal_are_refused():
    with pytest.raises(ValueError, match="soft bias is not supported"):
        as_causal_mask(torch.full((1, 1, 1, 4), -0.5), 4)
    with pytest.raises(ValueError, match="per-query float mask may not be causal"):
        as_causal_mask(torch.zeros(1, 1, 4, 4), 4)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        as_causal_mask(torch.ones(1, 1, 1, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"shape \(1, 4\)"):
        as_causal_mask(torch.ones(1, 4, dtype=torch.bool), 4)


def test_attention_with_the_starters_mask_is_causal(tiny_hf_checkpoint):
    """A later token must not change an earlier position's output (it did with the additive mask)."""
    ours = GPT2Model.from_pretrained(str(tiny_hf_checkpoint[0]))
    layer = ours.gpt_layers[0]
    h = torch.randn(1, 6, 64)
    changed = h.clone()
    changed[:, -1] += 1.0
    extended = torch.zeros(1, 1, 1, 6)
    with torch.no_grad():
        assert torch.allclose(layer(h, extended)[:, :-1], layer(changed, extended)[:, :-1], atol=1e-6)
