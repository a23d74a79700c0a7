"""Speculative decoding: greedy output == plain greedy; sampled sequences follow the target's
distribution (chi-square against the exact distribution, with a control the test must reject)."""
from __future__ import annotations

import itertools

import pytest
import torch
import transformers
from scipy.stats import chi2

from conftest import tiny_hf_config
from models.generation import left_pad
from models.generation.processors import top_k_filter
from models.gpt2 import GPT2LMHeadModel

PAD = 63
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [12], [5, 5, 6], [40, 41, 42, 43]]


def build(tmp_path, seed, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(tiny_hf_config(**overrides))
    hf.save_pretrained(tmp_path)
    return GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()


def shallow_copy_of(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """A "good draft": the target with its last layer turned into the identity (its residual
    branches zeroed); it shares the embeddings and first layers, so most proposals are right."""
    draft = GPT2LMHeadModel(model.config).eval()
    draft.load_state_dict(model.state_dict())
    last = draft.gpt.gpt_layers[-1]
    with torch.no_grad():
        for linear in (last.attention_dense, last.out_dense):
            linear.weight.zero_()
            linear.bias.zero_()
    return draft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    kw = dict(vocab_size=64, initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    target = build(tmp_path_factory.mktemp("target"), 0, n_layer=3, **kw)
    with torch.no_grad():  # a last layer that changes little, as late layers of trained models often do
        for linear in (target.gpt.gpt_layers[-1].attention_dense, target.gpt.gpt_layers[-1].out_dense):
            linear.weight.mul_(0.3)
    other = build(tmp_path_factory.mktemp("other"), 1, n_layer=1, **kw)
    return target, shallow_copy_of(target), other


@pytest.mark.parametrize("draft_kind", ["good", "unrelated"])
@pytest.mark.parametrize("kwargs", [dict(), dict(eos_token_id=6), dict(eos_token_id=[6, 35], min_new_tokens=5),
                                    dict(num_assistant_tokens=1), dict(num_assistant_tokens=6, eos_token_id=10)])
def test_speculative_greedy_equals_greedy(models, draft_kind, kwargs):
    target, good, other = models
    draft = good if draft_kind == "good" else other
    ids, mask = left_pad(PROMPTS, PAD)
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "num_assistant_tokens"}
    plain = target.generate(ids, mask, max_new_tokens=30, pad_token_id=PAD, **plain_kwargs)
    stats = {}
    spec = target.generate(ids, mask, max_new_tokens=30, pad_token_id=PAD, assistant_model=draft, stats=stats, **kwargs)
    assert torch.equal(spec, plain)
    assert 0 < stats["target_forwards"] <= 30 and 0 <= stats["acceptance_rate"] <= 1
    if draft_kind == "good":  # the draft helps: fewer target forwards than tokens
        assert stats["acceptance_rate"] > 0.3 and stats["target_forwards"] < stats["new_tokens"]
    for i in (0, 3):  # one prompt alone: no holes in the cache
        alone = target.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=30, pad_token_id=PAD, **plain_kwargs)
        assert torch.equal(target.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=30, pad_token_id=PAD,
                                           assistant_model=draft, **kwargs), alone)


def test_speculative_greedy_with_cache_compaction_and_stop_newlines(models):
    """A long run where rows accept different counts: holes pile up until the cache is compacted."""
    target, good, _ = models
    ids, mask = left_pad(PROMPTS, PAD)
    counts = torch.zeros(64, dtype=torch.long)
    counts[[6, 35]] = 1
    for kwargs in (dict(), dict(stop_newlines=torch.tensor([2, 3, 4, 2, 5, 6]), newline_counts=counts)):
        plain = target.generate(ids, mask, max_new_tokens=100, pad_token_id=PAD, **kwargs)
        stats = {}
        spec = target.generate(ids, mask, max_new_tokens=100, pad_token_id=PAD, assistant_model=good,
                               num_assistant_tokens=5, stats=stats, **kwargs)
        assert torch.equal(spec, plain), kwargs
        if not kwargs:
            assert stats["compactions"] > 0


def test_self_draft_accepts_everything(models):
    target = models[0]
    stats = {}
    ids = torch.tensor([PROMPTS[0]])
    out = target.generate(ids, max_new_tokens=21, assistant_model=target, num_assistant_tokens=4, stats=stats)
    assert stats["acceptance_rate"] == 1.0 and stats["target_forwards"] == 5  # 1 + 4 * (4 + 1) = 21 tokens
    assert torch.equal(out, target.generate(ids, max_new_tokens=21))


# ---- sampling: the distribution of the target, exactly ---------------------------------------------
def _exact_distribution(model, prompt, n, temperature, top_k):
    """Probability of every continuation of `n` tokens (V^n, ordered like itertools.product)."""
    V = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V^n, n)
    full = torch.cat((torch.tensor(prompt).expand(len(seqs), -1), seqs), 1)
    with torch.no_grad():
        logits = model(full)[:, len(prompt) - 1:-1].double() / temperature  # (V^n, n, V)
    if top_k:
        logits = top_k_filter(logits.reshape(-1, V), top_k).view(logits.shape)
    logp = logits.log_softmax(-1).gather(2, seqs[:, :, None]).squeeze(2).sum(1)
    return logp.exp()


def _chi_square_p_value(samples, probs):
    V_n = probs.numel()
    counts = torch.bincount(samples, minlength=V_n).double()
    expected = probs * samples.numel()
    big = expected >= 5
    obs = torch.cat((counts[big], counts[~big].sum()[None]))
    exp = torch.cat((expected[big], expected[~big].sum()[None]))
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.8, 3)])
def test_speculative_sampling_follows_the_target_distribution(tmp_path, temperature, top_k):
    V, n, N, prompt = 4, 4, 30_000, [1, 3, 2]
    kw = dict(vocab_size=V, n_embd=16, n_head=2, n_positions=16, initializer_range=0.25, bos_token_id=0, eos_token_id=0)
    target = build(tmp_path / "t", 0, n_layer=2, **kw)
    draft = build(tmp_path / "d", 5, n_layer=1, **kw)
    probs = _exact_distribution(target, prompt, n, temperature, top_k)
    ids = torch.tensor([prompt]).expand(N, -1).contiguous()
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, max_new_tokens=n, pad_token_id=0)
    stats = {}
    spec = target.generate(ids, assistant_model=draft, num_assistant_tokens=2, stats=stats,
                           generator=torch.Generator().manual_seed(0), **sampling)[:, len(prompt):]
    code = (spec * V ** torch.arange(n - 1, -1, -1)).sum(1)  # sequence -> its index in itertools.product
    assert 0.2 < stats["acceptance_rate"] < 0.95  # both accept and reject branches ran
    assert _chi_square_p_value(code, probs) > 1e-4
    # Control: the draft's own samples are told apart from the target distribution by the same test.
    own = draft.generate(ids, generator=torch.Generator().manual_seed(0), **sampling)[:, len(prompt):]
    assert _chi_square_p_value((own * V ** torch.arange(n - 1, -1, -1)).sum(1), probs) < 1e-6
    plain = target.generate(ids, generator=torch.Generator().manual_seed(1), **sampling)[:, len(prompt):]
    assert _chi_square_p_value((plain * V ** torch.arange(n - 1, -1, -1)).sum(1), probs) > 1e-4


def test_assistant_errors(models, tmp_path):
    target, good, _ = models
    ids = torch.tensor([[1, 2, 3]])
    wrong_vocab = build(tmp_path, 2, vocab_size=50, n_layer=1)
    for kwargs, message in ((dict(assistant_model=wrong_vocab), "same vocabulary"),
                            (dict(assistant_model=good, num_beams=2), "num_beams=1"),
                            (dict(assistant_model=good, repetition_penalty=1.2), "repetition_penalty"),
                            (dict(assistant_model=good, compile=True), "compile"),
                            (dict(assistant_model=good, num_assistant_tokens=0), "num_assistant_tokens")):
        with pytest.raises(ValueError, match=message):
            target.generate(ids, max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("draft_kind", ["good", "unrelated"])
@pytest.mark.parametrize("kwargs", [dict(eos_token_id=6), dict(do_sample=True, top_k=20, eos_token_id=10)])
def test_on_token_sees_the_returned_tokens_in_order(models, draft_kind, kwargs):
    """Rows commit different numbers of tokens per verify step and finish at different times:
    on_token still gets each new-token index once, in order, with pad for finished rows."""
    target, good, other = models
    ids, mask = left_pad(PROMPTS, PAD)
    seen = []
    out = target.generate(ids, mask, max_new_tokens=20, pad_token_id=PAD, assistant_model=good if draft_kind == "good"
                          else other, generator=torch.Generator().manual_seed(0), on_token=lambda t: seen.append(t.clone()),
                          **kwargs)
    assert torch.equal(torch.stack(seen, 1), out[:, ids.shape[1]:])
    assert bool((out[:, ids.shape[1]:] == PAD).any())  # some row finished early: the pad case is exercised
