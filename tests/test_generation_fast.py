"""The fast paths of generation are exact: fast nucleus == full sort == transformers, fused q/k/v ==
separate projections, sliced output layer == one matmul, in-place cache reorder, masks built once,
beam sampling == transformers, compiled decode == eager."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from conftest import build_pair
from models.generation import decoder as decoder_module, left_pad, processors
from models.generation.decoder import lm_logits
from models.generation.processors import nucleus_on_candidates, top_k_filter, top_p_filter, top_p_filter_full
from modules.kv_cache import KVCache

PAD = 63
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [12]]
INF = float("-inf")


@pytest.fixture(scope="module")
def peaked_vocab(tmp_path_factory):
    """Full GPT-2 vocabulary, top-p 0.9 nuclei of ~100-1000 tokens: the fast nucleus path decides."""
    return build_pair(tmp_path_factory.mktemp("peaked"), final_ln_scale=23.0)


# ---- exact fast nucleus -------------------------------------------------------------------------
def _logits(seed, rows=48, vocab=3000, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, scale, rows)[:, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p,min_keep", [(0.9, 1), (0.5, 1), (0.95, 2), (0.3, 3)])
def test_fast_nucleus_equals_full_sort_and_transformers(seed, p, min_keep):
    scores = _logits(seed)
    full = top_p_filter_full(scores, p, min_keep)
    torch.testing.assert_close(full, TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(None, scores), rtol=0, atol=0)
    for k in (16, 200):
        assert torch.equal(top_p_filter(scores, p, min_keep, candidates=k), full)
    _, fallback = nucleus_on_candidates(scores, p, min_keep, 200)
    assert 0 < int(fallback.sum()) < scores.size(0)  # both paths ran: flat rows fell back, peaked rows did not


def test_fast_nucleus_ties_take_the_full_sort():
    """Quantised logits: tie groups straddle the boundary; the full sort's tie order decides them."""
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(64, 2000, generator=g) * 6).round() / 2
    full = top_p_filter_full(scores, 0.9)
    _, fallback = nucleus_on_candidates(scores, 0.9, 1, 256)
    kept = (full > INF).sum(-1).clamp(max=256)
    cand = torch.topk(scores, 257).values
    straddles = cand.gather(1, (kept - 1)[:, None]) == cand.gather(1, kept[:, None])
    assert bool(straddles.any()) and bool(fallback[straddles.squeeze(1) & (kept < 256)].all())
    assert torch.equal(top_p_filter(scores, 0.9, candidates=256), full)
    torch.testing.assert_close(full, TopPLogitsWarper(0.9)(None, scores), rtol=0, atol=0)


def test_fast_nucleus_boundary_within_rounding_takes_the_full_sort():
    """A row whose less probable tokens hold exactly 1 - p of the mass: float32 rounding decides."""
    probs = torch.tensor([0.5, 0.4] + [0.1 / 998] * 998, dtype=torch.float64)
    scores = probs.log().float()[None]
    _, fallback = nucleus_on_candidates(scores, 0.9, 1, 64)
    assert bool(fallback.all())
    assert torch.equal(top_p_filter(scores, 0.9, candidates=64), top_p_filter_full(scores, 0.9))


def test_fast_nucleus_after_top_k_matches_transformers():
    scores = _logits(4)
    for k, p in ((5, 0.9), (50, 0.6), (400, 0.99)):
        ref = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, scores))
        assert torch.equal(top_p_filter(top_k_filter(scores, k), p, candidates=128), ref)


def test_seeded_peaked_sampling_matches_transformers_through_the_fast_nucleus(peaked_vocab, monkeypatch):
    ours, hf = peaked_vocab
    full_rows = []
    real_full = processors.top_p_filter_full
    monkeypatch.setattr(processors, "top_p_filter_full", lambda s, *a: full_rows.append(s.size(0)) or real_full(s, *a))
    ids, mask = left_pad(PROMPTS, PAD)
    for kwargs in (dict(top_p=0.9), dict(top_p=0.8, temperature=1.2, top_k=600)):
        out = ours.generate(ids, mask, do_sample=True, max_new_tokens=16, pad_token_id=PAD,
                            generator=torch.Generator().manual_seed(11), **kwargs)
        torch.manual_seed(11)
        ref = hf.generate(ids, attention_mask=mask, pad_token_id=PAD, do_sample=True, max_new_tokens=16,
                          **{"top_k": 0, **kwargs})
        assert torch.equal(out, ref), kwargs
    assert sum(full_rows) < 0.5 * 2 * 16 * len(PROMPTS)  # most rows never took the full sort


# ---- lean decode step -----------------------------------------------------------------------------
@torch.no_grad()
def test_output_layer_fast_paths(peaked_vocab):
    """Sliced (V, D) products from three rows: bit-identical; the prepared copies (packed from two
    rows, input-major at one): within float32 rounding, and rebuilt when the embedding changes."""
    gpt = peaked_vocab[0].gpt
    for n in (1, 2, 3, 5, 12):
        h = torch.randn(n, gpt.config.hidden_size)
        if n > 2:
            assert torch.equal(lm_logits(gpt, h), gpt.hidden_state_to_token(h))
        for rows in (1, 12):
            with decoder_module.inference_copies([peaked_vocab[0]], rows):
                torch.testing.assert_close(lm_logits(gpt, h), gpt.hidden_state_to_token(h), rtol=0, atol=1e-5)
    h = torch.randn(1, gpt.config.hidden_size)
    weight = gpt.word_embedding.weight
    with decoder_module.inference_copies([peaked_vocab[0]], 1):
        before = lm_logits(gpt, h)
    try:
        weight.mul_(2.0)  # an in-place update (an optimizer step): the cached copy must not be reused
        with decoder_module.inference_copies([peaked_vocab[0]], 1):
            torch.testing.assert_close(lm_logits(gpt, h), 2 * before, rtol=1e-5, atol=1e-5)
    finally:
        weight.div_(2.0)


def test_fused_qkv_matches_separate_projections(peaked_vocab):
    ours, _ = peaked_vocab
    x = torch.randn(3, 7, ours.config.hidden_size)
    attention = ours.gpt.gpt_layers[0].self_attention
    with torch.no_grad():
        separate = attention(x, is_causal=True)
        keys = set(ours.state_dict())
        assert ours.fuse_qkv() and attention.qkv_weight is not None
        assert set(ours.state_dict()) == keys  # checkpoints never see the fused copy
        fused = attention(x, is_causal=True)
        with torch.enable_grad():  # training never uses the (stale-able) fused copy
            assert torch.equal(attention(x, is_causal=True), separate)
    ours.unfuse_qkv()
    torch.testing.assert_close(fused, separate, rtol=0, atol=1e-6)
    assert attention.qkv_weight is None


def test_generation_with_fused_qkv_gives_the_same_tokens(small_vocab, monkeypatch):
    """Generation fuses q/k/v on FUSE_QKV_DEVICES (CUDA); forced here on the CPU."""
    ours, _ = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    separate = ours.generate(ids, mask, max_new_tokens=12, pad_token_id=PAD, num_beams=2)
    monkeypatch.setattr(decoder_module, "FUSE_QKV_DEVICES", ("cpu",))
    fused_during = []
    real_step = decoder_module.Decoder.step
    monkeypatch.setattr(decoder_module.Decoder, "step", lambda self, *a: fused_during.append(
        self.gpt.gpt_layers[0].self_attention.qkv_weight is not None) or real_step(self, *a))
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=12, pad_token_id=PAD, num_beams=2), separate)
    assert fused_during and all(fused_during)
    assert ours.gpt.gpt_layers[0].self_attention.qkv_weight is None  # unfused afterwards


@pytest.mark.parametrize("targets,fused", [("qv", False), ("mlp", True)])
def test_fused_qkv_refused_for_lora_wrapped_projections(tmp_path, targets, fused):
    from training.efficient import apply_lora

    model, _ = build_pair(tmp_path, vocab_size=64)
    ids = torch.tensor([PROMPTS[0]])
    before = model.generate(ids, max_new_tokens=8)
    apply_lora(model, targets=targets)
    model.eval()
    assert model.fuse_qkv() is fused
    assert all((layer.self_attention.qkv_weight is not None) is fused for layer in model.gpt.gpt_layers)
    model.unfuse_qkv()
    assert torch.equal(model.generate(ids, max_new_tokens=8), before)  # LoRA B starts at zero


def test_kv_cache_reorder_is_in_place():
    cache = KVCache(4, 2, 10, 3, torch.float32, "cpu")
    cache.k.copy_(torch.randn(4, 2, 10, 3))
    buffers = {cache.k.data_ptr()}
    for index in (torch.tensor([1, 1, 0, 3]), torch.tensor([3, 2, 1, 0]), torch.tensor([0, 0, 0, 2])):
        ref = cache.k[index, :, :6].clone()
        cache.reorder(index, length=6)
        assert torch.equal(cache.k[:, :, :6], ref)
        buffers.add(cache.k.data_ptr())
    assert len(buffers) == 2  # the cache and its one spare, swapped; nothing allocated per step
    static = KVCache(4, 2, 10, 3, torch.float32, "cpu", static=True)
    ptr = static.k.data_ptr()
    static.reorder(torch.tensor([1, 0, 3, 2]))
    assert static.k.data_ptr() == ptr


def test_decode_masks_built_once_per_generation(small_vocab, monkeypatch):
    ours, _ = small_vocab
    calls = []
    real = decoder_module.build_attention_mask
    monkeypatch.setattr(decoder_module, "build_attention_mask", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    ids, mask = left_pad(PROMPTS, PAD)
    ours.generate(ids, mask, max_new_tokens=12, pad_token_id=PAD)
    assert calls == [11]  # one mask for all 11 decode queries
    calls.clear()
    ours.generate(ids[:1], max_new_tokens=12)  # no padding: no mask at all
    assert calls == []


# ---- beam sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(num_beams=3, top_k=20), dict(num_beams=2, top_p=0.9, temperature=0.8),
                                    dict(num_beams=3, eos_token_id=6), dict(num_beams=2, eos_token_id=[6, 9])])
def test_beam_sampling_matches_transformers(small_vocab, kwargs):
    ours, hf = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    out = ours.generate(ids, mask, pad_token_id=PAD, do_sample=True, max_new_tokens=14,
                        generator=torch.Generator().manual_seed(5), **kwargs)
    torch.manual_seed(5)
    ref = hf.generate(ids, attention_mask=mask, pad_token_id=PAD, do_sample=True, max_new_tokens=14,
                      **{"top_k": 0, **kwargs})
    assert torch.equal(out, ref)
    beam = ours.generate(ids, mask, pad_token_id=PAD, max_new_tokens=14,
                         **{k: v for k, v in kwargs.items() if k not in ("top_k", "top_p", "temperature")})
    assert not torch.equal(out, beam)  # sampling really changed the search


# ---- compiled decode -----------------------------------------------------------------------------
def test_compiled_decode_equals_eager_SLOW_COMPILE(small_vocab):
    """torch.compile of the static decode step (tens of seconds on a CPU): same tokens as eager."""
    ours, _ = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    for kwargs in (dict(), dict(do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(3)),
                   dict(eos_token_id=6), dict(num_beams=2, eos_token_id=6)):
        eager = ours.generate(ids, mask, max_new_tokens=10, pad_token_id=PAD,
                              **{k: (torch.Generator().manual_seed(3) if k == "generator" else v)
                                 for k, v in kwargs.items()})
        compiled = ours.generate(ids, mask, max_new_tokens=10, pad_token_id=PAD, compile=True, **kwargs)
        assert torch.equal(compiled, eager), kwargs


def test_compiled_one_row_decode_reads_the_current_input_major_copies_SLOW_COMPILE(small_vocab):
    """Batch 1: the compiled step multiplies by the input-major copies (graph inputs, not baked-in
    constants), so a weight edit through .data between calls reaches it like eager decoding."""
    ours, _ = small_vocab
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    weight = ours.gpt.gpt_layers[0].interm_dense.weight
    saved = weight.detach().clone()
    try:
        before = ours.generate(ids, max_new_tokens=8, pad_token_id=PAD, compile=True)
        assert torch.equal(before, ours.generate(ids, max_new_tokens=8, pad_token_id=PAD))
        weight.data.mul_(-4.0)
        after = ours.generate(ids, max_new_tokens=8, pad_token_id=PAD, compile=True)
        assert torch.equal(after, ours.generate(ids, max_new_tokens=8, pad_token_id=PAD))
        assert not torch.equal(after, before)
    finally:
        weight.data.copy_(saved)


def test_compiled_step_has_a_mask_table_for_one_unpadded_step(small_vocab):
    """The static step reads every cache slot, so even one unpadded decode step (max_new_tokens=2) needs
    its mask table: the builder's no-mask shortcut for a single query must not leave it out."""
    from models.generation.decoder import Decoder

    ours, _ = small_vocab
    decoder = Decoder(ours, prompt_len=5, mask=None, batch_size=1, max_new_tokens=2, compile=True)
    try:
        table = decoder.tables["dense"]
        assert table is not None and table.shape == (1, 1, 1, 6) and bool(table.all())
    finally:
        decoder.close()
