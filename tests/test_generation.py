"""Generation parity: our KV-cached generate() against transformers on the same random weights."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from models.generation import (apply_repetition_penalty, ban_repeated_ngrams, left_pad, newline_counts, top_k_filter,
                               top_p_filter)
from models.gpt2 import GPT2LMHeadModel

PAD = 63  # not 0: transformers' beam search fills with EOS when pad_token_id is 0 (falsy)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [12]]


@pytest.fixture(scope="module")
def full_vocab(tiny_hf_checkpoint):
    directory, hf = tiny_hf_checkpoint
    hf.generation_config.eos_token_id = None
    return GPT2LMHeadModel.from_pretrained(str(directory)).eval(), hf


def hf_generate(hf, ids, mask, **kwargs):
    return hf.generate(ids, attention_mask=mask, pad_token_id=PAD, use_cache=True, **kwargs)


def uncached_greedy(model, prompt, n):
    """The starter's loop: the whole prefix through the model at every step, one prompt at a time."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


# ---- helpers ---------------------------------------------------------------------------------------
def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        left_pad([[1], []], 0)


def test_newline_counts(tokenizer_dir):
    from models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    counts = newline_counts(tok)
    assert counts.shape == (len(tok),)
    assert counts[tok.encode("\n")[0]] == 1 and counts[tok.encode("\n\n")[0]] == 2
    assert counts[tok.encode(" love")[0]] == 0
    assert int((counts > 0).sum()) < 100


# ---- logits processors vs transformers ------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_processors_match_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(6, 300, generator=g) * 3
    history = torch.randint(0, 300, (6, 40), generator=g)
    history[:, 20:23] = history[:, 37:40]  # a repeated trigram, so n-gram blocking has work to do
    for k in (1, 5, 50):
        torch.testing.assert_close(top_k_filter(scores, k), TopKLogitsWarper(k)(history, scores), rtol=0, atol=0)
    for p in (0.05, 0.5, 0.9, 0.999):
        ours = top_p_filter(scores, p)
        torch.testing.assert_close(ours, TopPLogitsWarper(p)(history, scores), rtol=0, atol=0)
        assert bool((ours > float("-inf")).any(-1).all())  # at least one token survives
    assert int((top_p_filter(scores, 1e-9) > float("-inf")).sum(-1).max()) == 1
    torch.testing.assert_close(scores / 0.7, TemperatureLogitsWarper(0.7)(history, scores), rtol=0, atol=0)
    for penalty in (1.3, 0.8):
        torch.testing.assert_close(apply_repetition_penalty(scores, history, None, penalty),
                                   RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone()), rtol=0, atol=0)
    for n in (1, 2, 3):
        ours = ban_repeated_ngrams(scores, history, None, n)
        torch.testing.assert_close(ours, NoRepeatNGramLogitsProcessor(n)(history, scores), rtol=0, atol=0)
    assert bool(torch.isinf(ban_repeated_ngrams(scores, history, None, 3)).any())


def test_processors_ignore_left_padding():
    scores = torch.zeros(1, 10) + 1.0
    history = torch.tensor([[3, 3, 5, 6, 5]])
    valid = torch.tensor([[False, False, True, True, True]])
    penalised = apply_repetition_penalty(scores, history, valid, 2.0)
    assert penalised[0, 3] == 1.0 and penalised[0, 5] == 0.5 and penalised[0, 6] == 0.5
    # (3, 3) lies in the padding: 3 is not banned after ... 5; (5, 6) is real: 6 is banned after 5
    banned = ban_repeated_ngrams(scores, history, valid, 2)
    assert torch.isinf(banned[0, 6]) and not torch.isinf(banned[0, 3])


# ---- greedy ----------------------------------------------------------------------------------------
def test_greedy_matches_transformers_batched_left_padded(full_vocab):
    ours, hf = full_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    ref = hf_generate(hf, ids, mask, do_sample=False, max_new_tokens=16)
    out = ours.generate(ids, mask, max_new_tokens=16, pad_token_id=PAD)
    assert torch.equal(out, ref)


def test_greedy_cached_equals_uncached_and_batched_equals_alone(full_vocab):
    ours, _ = full_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    batched = ours.generate(ids, mask, max_new_tokens=12, pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        alone = ours.generate(torch.tensor([prompt]), max_new_tokens=12)
        if i < 2:
            assert alone[0].tolist() == uncached_greedy(ours, prompt, 12)
        assert batched[i, -12:].tolist() == alone[0, -12:].tolist()


@pytest.mark.parametrize("eos", [6, 35])
def test_greedy_eos_and_min_new_tokens_match_transformers(small_vocab, eos):
    ours, hf = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    for min_new in (0, 6):
        ref = hf_generate(hf, ids, mask, do_sample=False, max_new_tokens=30, eos_token_id=eos, min_new_tokens=min_new)
        out = ours.generate(ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD, min_new_tokens=min_new)
        assert torch.equal(out, ref)
        if min_new == 0:
            assert bool((ref[:, ids.size(1):] == eos).any())  # EOS was really generated


def test_greedy_repetition_controls_match_transformers(small_vocab):
    ours, hf = small_vocab
    ids, mask = left_pad(PROMPTS[:1] + PROMPTS[2:3], PAD)  # equal-length prompts: no padding in the history
    ids, mask = ids[:, -3:], mask[:, -3:]
    for kwargs in (dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                   dict(repetition_penalty=0.7, no_repeat_ngram_size=3)):
        ref = hf_generate(hf, ids, mask, do_sample=False, max_new_tokens=20, **kwargs)
        out = ours.generate(ids, mask, max_new_tokens=20, pad_token_id=PAD, **kwargs)
        assert torch.equal(out, ref), kwargs


# ---- beam search -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,eos", [
    (2, 1.0, False, 6), (3, 0.5, True, 6), (4, 2.0, "never", 10), (3, -1.0, False, 5), (3, 1.0, True, 10),
    (2, 0.0, "never", 5)])
def test_beam_search_matches_transformers(small_vocab, num_beams, length_penalty, early_stopping, eos):
    ours, hf = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    kwargs = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                  max_new_tokens=20, eos_token_id=eos)
    ref = hf_generate(hf, ids, mask, do_sample=False, **kwargs)
    out = ours.generate(ids, mask, pad_token_id=PAD, **kwargs)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_beam_search_eos_really_matters(small_vocab):
    """Guard for the test above: with EOS 6 the beams finish early, so the stopping rules are exercised."""
    ours, _ = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    out = ours.generate(ids, mask, num_beams=3, max_new_tokens=20, eos_token_id=6, pad_token_id=PAD)
    assert out.size(1) < ids.size(1) + 20 and bool((out == 6).any())


def test_beam_search_with_repetition_controls_matches_transformers(small_vocab):
    ours, hf = small_vocab
    ids, mask = torch.tensor([[1, 2, 3], [9, 10, 11]]), torch.ones(2, 3, dtype=torch.long)
    kwargs = dict(num_beams=3, max_new_tokens=16, eos_token_id=6, repetition_penalty=1.3, no_repeat_ngram_size=2,
                  min_new_tokens=4)
    ref = hf_generate(hf, ids, mask, do_sample=False, **kwargs)
    assert torch.equal(ours.generate(ids, mask, pad_token_id=PAD, **kwargs), ref)


def test_beam_search_one_beam_per_prompt_equals_alone(full_vocab):
    ours, _ = full_vocab
    ids, mask = left_pad(PROMPTS[:2], PAD)
    batched = ours.generate(ids, mask, num_beams=3, max_new_tokens=10, pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS[:2]):
        alone = ours.generate(torch.tensor([prompt]), num_beams=3, max_new_tokens=10)
        assert batched[i, -10:].tolist() == alone[0, -10:].tolist()


# ---- sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(top_p=0.9), dict(top_k=10, temperature=0.7),
                                    dict(top_k=30, top_p=0.8, temperature=1.3, repetition_penalty=1.2)])
def test_seeded_sampling_reproducible_and_matches_transformers(small_vocab, kwargs):
    ours, hf = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    a = ours.generate(ids, mask, do_sample=True, max_new_tokens=16, pad_token_id=PAD,
                      generator=torch.Generator().manual_seed(7), **kwargs)
    b = ours.generate(ids, mask, do_sample=True, max_new_tokens=16, pad_token_id=PAD,
                      generator=torch.Generator().manual_seed(7), **kwargs)
    c = ours.generate(ids, mask, do_sample=True, max_new_tokens=16, pad_token_id=PAD,
                      generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # transformers draws from the global generator; seeded the same, the draws are the same.
    # (Its generation config defaults to top_k=50; top_k=0 switches that off when we do not ask for it.)
    torch.manual_seed(7)
    ref = hf_generate(hf, ids, mask, do_sample=True, max_new_tokens=16, **{"top_k": 0, **kwargs})
    assert torch.equal(a, ref)


def test_temperature_zero_is_greedy(full_vocab):
    ours, _ = full_vocab
    ids = torch.tensor([PROMPTS[0]])
    assert torch.equal(ours.generate(ids, do_sample=True, temperature=0.0, max_new_tokens=8),
                       ours.generate(ids, max_new_tokens=8))


# ---- stop rules and errors -------------------------------------------------------------------------
def test_stop_newlines(small_vocab):
    ours, _ = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    free = ours.generate(ids, mask, max_new_tokens=30, pad_token_id=PAD)
    gen = free[:, ids.size(1):]
    counts = torch.zeros(64, dtype=torch.long)
    counts[6] = 1  # pretend token 6 is "\n" and token 35 is "\n\n"
    counts[35] = 2
    stop = torch.tensor([1, 2, 3, 1])
    out = ours.generate(ids, mask, max_new_tokens=30, pad_token_id=PAD, stop_newlines=stop, newline_counts=counts)
    assert out.size(1) <= free.size(1)
    for row in range(len(PROMPTS)):
        seen = counts[gen[row]].cumsum(0)
        if int(seen[-1]) < int(stop[row]):  # never reached: unchanged
            assert torch.equal(out[row], free[row])
            continue
        end = int((seen >= stop[row]).nonzero()[0]) + 1  # the token that reached the count is kept
        new = out[row, ids.size(1):]
        assert new[:end].tolist() == gen[row, :end].tolist()
        assert bool((new[end:] == PAD).all())
    assert bool((counts[gen] > 0).any())
    with pytest.raises(ValueError, match="newline_counts"):
        ours.generate(ids, mask, stop_newlines=2, max_new_tokens=4)


def test_bad_arguments(full_vocab):
    ours, _ = full_vocab
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        ours.generate(ids, torch.tensor([[1, 1, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="positions"):
        ours.generate(ids, max_new_tokens=1000)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(ids, do_sample=True, top_p=0.0, max_new_tokens=4)
    assert ours.generate(ids, max_new_tokens=0).tolist() == ids.tolist()
    assert all(layer.self_attention.kv_cache is None for layer in ours.gpt.gpt_layers)  # cache released


@pytest.mark.parametrize("backend", ["sparse", "auto", "sdpa"])
def test_sparse_attention_generation_equals_uncached_greedy(backend):
    """A local-window model with global tokens (window 4 < prompt + 12 new tokens): every attention
    path of a cached, batched, left-padded generation (per-step SparseLayout, SDPA tables) gives
    the tokens of the uncached one-prompt loop; speculative decoding with it too."""
    from config import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config.from_name("tiny", vocab_size=64, attention="local", attention_window=4,
                               attention_global_tokens=2, attention_backend=backend, initializer_range=0.3)
    model = GPT2LMHeadModel(cfg).eval()
    ids, mask = left_pad(PROMPTS, PAD)
    out = model.generate(ids, mask, max_new_tokens=12, pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        assert out[i, -12:].tolist() == uncached_greedy(model, prompt, 12)[-12:]
    draft = GPT2LMHeadModel(GPT2Config.from_name("tiny", vocab_size=64, num_hidden_layers=1)).eval()
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12, pad_token_id=PAD, assistant_model=draft), out)


@pytest.mark.parametrize("kwargs", [dict(eos_token_id=6), dict(do_sample=True, top_p=0.9, eos_token_id=35)])
def test_on_token_sees_each_step_as_returned(small_vocab, kwargs):
    ours, _ = small_vocab
    ids, mask = left_pad(PROMPTS, PAD)
    seen = []
    out = ours.generate(ids, mask, max_new_tokens=16, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
                        on_token=lambda t: seen.append(t.clone()), **kwargs)
    assert torch.equal(torch.stack(seen, 1), out[:, ids.shape[1]:])
    with pytest.raises(ValueError, match="on_token"):
        ours.generate(ids, mask, num_beams=2, max_new_tokens=4, pad_token_id=PAD, on_token=seen.append)
