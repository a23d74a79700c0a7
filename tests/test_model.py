"""Our GPT-2 against transformers' on the same random weights, loaded through our real loader."""
from __future__ import annotations

import pytest
import torch
import transformers

from config import GPT2Config, PRESETS
from models import GPT2LMHeadModel, GPT2Model

ATOL = 1e-5  # fp32; observed differences are ~3e-7


def padded_batch(vocab: int = 50257, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


@torch.no_grad()
def test_lm_logits_and_hidden_states_match_transformers(tiny_hf_checkpoint):
    directory, hf = tiny_hf_checkpoint
    ours = GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    backbone = GPT2Model.from_pretrained(str(directory)).eval()
    ids, mask = padded_batch()
    real = mask.bool()
    ref_logits = hf(input_ids=ids, attention_mask=mask).logits
    assert (ours(ids, mask) - ref_logits)[real].abs().max() < ATOL
    ref_hidden = hf.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    out = backbone(ids, mask)
    assert (out["last_hidden_state"] - ref_hidden)[real].abs().max() < ATOL
    # last_token is the last NON-PAD position under right padding, not position -1
    last = mask.sum(1) - 1
    assert torch.allclose(out["last_token"], ref_hidden[torch.arange(3), last], atol=ATOL)
    assert not torch.allclose(out["last_token"][1], out["last_hidden_state"][1, -1], atol=1e-3)
    # no mask at all: the is_causal fast path
    assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < ATOL


@torch.no_grad()
def test_left_padding_with_positions_from_mask(tiny_hf_checkpoint):
    directory, _ = tiny_hf_checkpoint
    model = GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    ids, _ = padded_batch()
    alone = model(ids[:1, :5])[0, -1]
    padded = torch.cat([torch.full((1, 3), 50256), ids[:1, :5]], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    assert torch.allclose(model(padded, mask, positions)[0, -1], alone, atol=ATOL)


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
@torch.no_grad()
def test_every_preset_shape_loads_and_matches(preset, tmp_path):
    """Real widths, heads, vocabulary and positions of each size; depth cut to 2 layers for speed
    (sanity_check.py runs the full depths)."""
    p = PRESETS[preset]
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_embd=p["hidden_size"], n_head=p["num_attention_heads"], n_layer=2)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert ours.config.hidden_size == p["hidden_size"] and ours.config.intermediate_size == 4 * p["hidden_size"]
    assert ours.config.max_position_embeddings == 1024 and ours.config.vocab_size == 50257
    ids, mask = padded_batch()
    diff = (ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max()
    assert diff < 1e-4, f"{preset}: max |diff| {diff}"


def test_presets_have_the_published_shapes():
    expect = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
              "gpt2-xl": (1600, 48, 25)}
    for name, (d, n_layer, n_head) in expect.items():
        cfg = GPT2Config.from_name(name)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (d, n_layer, n_head)
        assert cfg.intermediate_size == 4 * d
    tiny = GPT2Config.from_name("tiny")
    assert tiny.vocab_size == 50257 and tiny.num_hidden_layers <= 4
    assert GPT2Config.from_name("openai-community/gpt2-large").hidden_size == 1280
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.from_name("gpt3")


def test_gpt2_small_parameter_count_matches_transformers():
    with torch.device("meta"):  # shapes only, no memory or init time
        ours = GPT2LMHeadModel(GPT2Config.from_name("gpt2"))
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()) == 124_439_808


def test_output_embedding_is_the_input_embedding_parameter():
    model = GPT2LMHeadModel(GPT2Config.from_name("tiny"))
    assert model.lm_head_weight is model.gpt.word_embedding.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum("word_embedding" in n for n in names) == 1
    ids = torch.randint(0, 50257, (2, 5))
    model(ids).logsumexp(-1).sum().backward()
    emb = model.gpt.word_embedding.weight
    # the gradient reaches rows of tokens never in the input: it flows through the output layer
    unused = torch.ones(50257, dtype=torch.bool)
    unused[ids.flatten()] = False
    assert emb.grad[unused].abs().sum() > 0


@torch.no_grad()
def test_kv_cache_prefill_then_steps_equals_full_forward():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_name("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    ids = torch.randint(0, 50257, (2, 9))
    full = model(ids)
    model.setup_kv_cache(batch_size=2, max_len=16)
    steps = [model(ids[:, :5], cache_start=0)]
    steps += [model(ids[:, t:t + 1], cache_start=t) for t in range(5, 9)]
    steps.append(None)
    model.clear_kv_cache()
    cached = torch.cat(steps[:-1], dim=1)
    assert torch.allclose(cached, full, atol=1e-5)


def test_dropout_only_in_training_mode():
    model = GPT2LMHeadModel(GPT2Config.from_name("tiny"))
    ids = torch.randint(0, 50257, (2, 6))
    model.eval()
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


def test_too_long_input_is_an_error():
    model = GPT2LMHeadModel(GPT2Config.from_name("tiny"))
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        model(torch.zeros(1, 513, dtype=torch.long))
