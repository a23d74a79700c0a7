"""The sparse execution path (modules/sparse_attention.py) against the masked dense reference.

The reference is SDPA with the boolean mask of `build_attention_mask(path="sdpa")`; the keys of
a pattern are checked against a plain-Python transcription of its definition.  Exactness: outputs
and gradients to 1e-5 in fp32.  Dropout: the path's own keep-mask is read back through values
that are one-hot per key, then fed to a hand-written dense reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from config import GPT2Config
from models.gpt2 import GPT2LMHeadModel, GPT2Model
from modules.attention import attend, build_attention_mask
from modules.attention_patterns import DEFAULT_BLOCK_SIZE, estimated_keys_per_query, pattern_key_ranges
from modules.sparse_attention import SparseLayout, sparse_attention

CPU = torch.device("cpu")
SPARSE = ("logsparse", "local", "hybrid")
ATOL = 1e-5


def reference_keys(pattern: str, l: int, window: int, global_tokens: int = 0) -> set[int]:
    """Keys of position l, straight from the definitions (Li et al. 2019; Beltagy et al. 2020)."""
    local = set(range(max(0, l - window + 1), l + 1))
    logsparse = {l} | ({l - 2 ** j for j in range(int(math.log2(l)) + 1)} if l > 0 else set())
    keys = {"local": local, "logsparse": logsparse, "hybrid": local | logsparse}[pattern]
    return keys | set(range(min(global_tokens, l + 1)))


def padding_case(case: str, B: int = 3, T: int = 45):
    """(attention_mask over all S slots or None, cache_start, T)."""
    g = torch.Generator().manual_seed(7)
    if case == "plain":
        return None, 0, T
    if case == "cached":  # 20 cached slots (row 1 left-padded), then T new queries
        mask = torch.ones(B, 20 + T, dtype=torch.long)
        mask[1, :5] = 0
        return mask, 20, T
    mask = torch.ones(B, T, dtype=torch.long)
    if case == "left":
        mask[1, :9], mask[2, :30] = 0, 0
    elif case == "right":
        mask[1, 20:], mask[2, 3:] = 0, 0
    elif case == "holes":  # padding anywhere: positions still come from cumsum(mask) - 1
        mask = (torch.rand(B, T, generator=g) > 0.3).long()
    return mask, 0, T


def dense_reference_mask(pattern, window, global_tokens, attention_mask, start, T, B):
    mask, _ = build_attention_mask(attention_mask, T, start, CPU, pattern=pattern, window=window,
                                   global_tokens=global_tokens)
    return mask.expand(B, 1, T, start + T)


def layout_pairs(layout: SparseLayout, B: int) -> torch.Tensor:
    """Count of every (query, key slot) pair the layout lets through, as a dense (B, T, S) tensor."""
    C, nQB, L, P = layout.block_size, layout.num_blocks, layout.keys_per_block, layout.points_per_query
    Bp = layout.blocked.size(0)
    allowed = (~layout.blocked[:, 0]).expand(B, nQB, C, L + P)
    slots = torch.cat([layout.key_slots.view(Bp, nQB, 1, L).expand(Bp, nQB, C, L),
                       layout.point_slots.view(Bp, nQB, C, P)], -1).expand(B, nQB, C, L + P)
    counts = torch.zeros(B, nQB * C, layout.num_keys, dtype=torch.long)
    counts.scatter_add_(2, slots.reshape(B, nQB * C, -1), allowed.reshape(B, nQB * C, -1).long())
    return counts[:, :layout.num_queries]


# ---- the pattern's key ranges and the layout --------------------------------------------------
@pytest.mark.parametrize("pattern", SPARSE)
@pytest.mark.parametrize("window,global_tokens", [(1, 0), (3, 0), (8, 0), (5, 3), (64, 130)])
def test_key_ranges_enumerate_exactly_the_pattern(pattern, window, global_tokens):
    T = 300
    lo, hi = pattern_key_ranges(pattern, torch.arange(T), window, global_tokens, max_position=T - 1)
    for l in range(T):
        got = set()
        for a, b in zip(lo[l].tolist(), hi[l].tolist()):
            got |= set(range(a, b + 1))
        assert got == reference_keys(pattern, l, window, global_tokens), l


@pytest.mark.parametrize("pattern", SPARSE)
@pytest.mark.parametrize("case", ["plain", "left", "right", "holes", "cached"])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_layout_holds_every_allowed_pair_exactly_once(pattern, case, block_size):
    attention_mask, start, T = padding_case(case)
    B = 3
    for global_tokens in (0, 3):
        ref = dense_reference_mask(pattern, 6, global_tokens, attention_mask, start, T, B)[:, 0]
        layout = build_attention_mask(attention_mask, T, start, CPU, pattern=pattern, window=6, path="sparse",
                                      global_tokens=global_tokens, block_size=block_size)[0]
        assert torch.equal(layout_pairs(layout, B), ref.long())


@pytest.mark.parametrize("pattern", SPARSE)
def test_work_grows_like_t_times_k(pattern):
    """Per query the path computes ~K scores (W + C for local, C (2 + log2(S / C)) points for
    LogSparse), not S: structural, checked on the layout; the estimate `auto` uses is exact."""
    window = 64
    for T in (512, 4096):
        layout = build_attention_mask(None, T, 0, CPU, pattern=pattern, window=window, path="sparse")[0]
        assert layout.keys_per_query == estimated_keys_per_query(pattern, window, 0, T)
        C = DEFAULT_BLOCK_SIZE[pattern]
        if pattern == "local":
            assert layout.keys_per_query == window + C
        elif pattern == "logsparse":  # own and previous block + one point per 2^j in [C, T)
            assert layout.keys_per_query == 2 * C + int(math.log2(T)) - int(math.log2(C))
    assert layout.keys_per_query < 4096 / 20


# ---- outputs and gradients = the masked dense reference ---------------------------------------
def _qkv(B, T, S, H=2, hs=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hs, generator=g, dtype=dtype).requires_grad_()
    k, v = [torch.randn(B, H, S, hs, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]
    return q, k, v


@pytest.mark.parametrize("pattern", SPARSE)
@pytest.mark.parametrize("case", ["plain", "left", "right", "holes", "cached"])
def test_outputs_and_gradients_equal_masked_dense(pattern, case):
    attention_mask, start, T = padding_case(case)
    B, S = 3, start + T
    for global_tokens, block_size in ((0, None), (2, 4), (0, 7)):
        q, k, v = _qkv(B, T, S)
        common = dict(pattern=pattern, window=5, global_tokens=global_tokens)
        ref_mask = build_attention_mask(attention_mask, T, start, CPU, path="sdpa", **common)[0]
        layout = build_attention_mask(attention_mask, T, start, CPU, path="sparse", block_size=block_size, **common)[0]
        ref, out = attend(q, k, v, ref_mask), attend(q, k, v, layout)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
        grad = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)
        assert torch.isfinite(out).all()


def _models(pattern, dropout=0.0, **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=1000, attention=pattern, attention_window=4, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=dropout, **overrides)
    models = {b: GPT2LMHeadModel(GPT2Config.from_name("tiny", attention_backend=b, **cfg)) for b in ("sdpa", "sparse")}
    models["sparse"].load_state_dict(models["sdpa"].state_dict())
    return models


@pytest.mark.parametrize("pattern", SPARSE)
def test_model_training_step_equals_masked_dense(pattern):
    """Whole model, train mode (attention dropout 0: p = 0 is exact), right and left padding:
    logits and every parameter's gradient equal those of the masked SDPA path."""
    models = _models(pattern, attention_global_tokens=2)
    ids = torch.randint(0, 1000, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:], mask[2, :11] = 0, 0
    grads = {}
    for name, model in models.items():
        model.train()
        logits = model(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        (logits * mask[..., None]).pow(2).mean().backward()
        grads[name] = (logits, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["sparse"][0], grads["sdpa"][0], atol=ATOL, rtol=ATOL)
    for n, g in grads["sdpa"][1].items():
        torch.testing.assert_close(grads["sparse"][1][n], g, atol=ATOL, rtol=ATOL, msg=n)


# ---- attention dropout ------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", SPARSE)
def test_dropout_keep_mask_read_back_matches_hand_reference(pattern):
    """Values one-hot per key (head_dim = S) make the output the dropped-out probability row
    itself: out[q, j] = softmax[q, j] * keep[q, j] / (1 - p).  That reads the path's keep-mask
    back; a hand-written dense attention with that very mask must give the same output and the
    same gradients of q and k, the kept share must be ~1 - p, and dropped keys must be allowed
    ones only."""
    B, H, T, p = 2, 2, 48, 0.3
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :6] = 0
    layout = build_attention_mask(mask, T, 0, CPU, pattern=pattern, window=6, path="sparse", block_size=8)[0]
    allowed = build_attention_mask(mask, T, 0, CPU, pattern=pattern, window=6)[0]  # (B, 1, T, T)
    g = torch.Generator().manual_seed(1)
    q, k = [torch.randn(B, H, T, T, generator=g).requires_grad_() for _ in range(2)]
    v = torch.eye(T).expand(B, H, T, T).clone().requires_grad_()
    torch.manual_seed(3)
    out = sparse_attention(q, k, v, layout, dropout_p=p)  # (B, H, T, S=T): row = dropped probabilities
    keep = out.detach() != 0
    assert not (keep & ~allowed).any()
    probs = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(T)).masked_fill(~allowed, float("-inf")), -1)
    ref = probs * keep / (1 - p) @ v
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)
    kept_share = keep.sum() / allowed.expand_as(keep).sum()
    assert abs(kept_share.item() - (1 - p)) < 0.05
    torch.manual_seed(3)
    assert torch.equal(sparse_attention(q, k, v, layout, dropout_p=p), out)  # seeded: reproducible
    assert not torch.equal(sparse_attention(q, k, v, layout, dropout_p=p), out)  # and random


def test_dropout_in_training_with_gradient_checkpointing_replays_the_masks():
    """Recomputing a layer in backward replays the RNG: the sparse path's masks, and so the
    gradients, are those of the run without checkpointing (dropout 0.1 active)."""
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config.from_name("tiny", vocab_size=1000, attention="logsparse",
                                           attention_backend="sparse")).train()
    ids = torch.randint(0, 1000, (2, 50))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        model(ids)["last_hidden_state"].pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)


def test_auto_picks_the_sparse_path_in_training_with_dropout(monkeypatch):
    """A long sequence in training (dropout 0.1) takes the sparse path on CPU under `auto`."""
    from modules import attention

    taken = []
    monkeypatch.setattr(attention, "sparse_attention",
                        lambda *a: taken.append(a[4]) or sparse_attention(*a))
    model = GPT2Model(GPT2Config.from_name("tiny", vocab_size=1000, attention="local", attention_window=8,
                                           max_position_embeddings=1024)).train()
    model(torch.randint(0, 1000, (1, 1024)))["last_hidden_state"].sum().backward()
    assert taken == [0.1, 0.1]  # both layers, with their attention dropout
    taken.clear()
    model(torch.randint(0, 1000, (1, 32)))  # short: dense SDPA with the mask
    assert taken == []


# ---- KV cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", SPARSE)
def test_cached_prefill_and_decode_equal_uncached(pattern):
    """Prefill 30 tokens (left-padded row), then 12 one-token steps through the KV cache on the
    sparse path == one uncached forward over everything, for every position."""
    model = _models(pattern, attention_global_tokens=3)["sparse"].eval()
    ids = torch.randint(0, 1000, (2, 42))
    mask = torch.ones(2, 42, dtype=torch.long)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, mask, pos)
        model.setup_kv_cache(2, 42)
        steps = [model(ids[:, :30], mask[:, :30], pos[:, :30], cache_start=0)]
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], cache_start=t) for t in range(30, 42)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], atol=ATOL, rtol=ATOL)


# ---- config -----------------------------------------------------------------------------------
def test_global_tokens_config_round_trip_and_validation(tmp_path):
    cfg = GPT2Config.from_name("tiny", attention="hybrid", attention_global_tokens=4, attention_backend="sparse")
    again = GPT2Config.from_hf_dict(cfg.to_hf_dict(), name="tiny")
    assert (again.attention_global_tokens, again.attention_backend) == (4, "sparse")
    model = GPT2LMHeadModel(cfg)
    loaded = GPT2LMHeadModel.from_pretrained(str(model.save_pretrained(tmp_path / "m")))
    assert loaded.config.attention_global_tokens == 4
    for bad, message in ((-1, "must be an integer >= 0"), (1.5, "must be an integer >= 0")):
        with pytest.raises(ValueError, match=f"attention_global_tokens {bad}.*{message}"):
            GPT2Model(GPT2Config.from_name("tiny", attention="local", attention_global_tokens=bad))
    with pytest.raises(ValueError, match="attention_global_tokens 2: global tokens extend a sparse pattern"):
        GPT2Model(GPT2Config.from_name("tiny", attention_global_tokens=2))


def test_sparse_path_refuses_a_layout_of_another_shape():
    layout = build_attention_mask(None, 10, 0, CPU, pattern="local", window=3, path="sparse")[0]
    q, k, v = _qkv(1, 12, 12)
    with pytest.raises(ValueError, match="built for 10 queries over 10 keys; got 12 queries over 12 keys"):
        attend(q, k, v, layout)
    with pytest.raises(ValueError, match="path 'dense'"):
        build_attention_mask(None, 10, 0, CPU, pattern="local", path="dense")
