"""Prepared inference copies (modules/inference_weights.py): packed and input-major linears equal
F.linear to float32 rounding, are used only for plain fp32 no-grad inference inside `active`, the kind
follows the rows and threads, and a cached copy is not used after its weight changed, including
through `.data` (no version bump; changes below one float32 rounding step of a row's dot product with
the fingerprint vector are the documented exception)."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import build_pair
from modules import inference_weights as iw

pytestmark = pytest.mark.skipif(not iw.packing_works(torch.device("cpu")), reason="no oneDNN packed linears")


@pytest.fixture()
def threads():
    """Run a test body on a set number of torch threads (the copies' kind depends on it)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _layer(seed=0, d_in=48, d_out=80):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


@torch.no_grad()
def test_packed_linear_matches_f_linear_and_is_used_only_where_it_applies():
    layer = _layer()
    x2, x3, x1 = torch.randn(12, 48), torch.randn(3, 5, 48), torch.randn(1, 1, 48)
    assert torch.equal(iw.linear(layer, x2), layer(x2))  # outside `active`: the module itself
    with iw.active([layer], [], rows=12):
        assert layer in iw._state.modules
        for x in (x2, x3, x1):
            out = iw.linear(layer, x)
            assert out.shape == layer(x).shape
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
        with torch.enable_grad():  # training never uses the copy; gradients reach the weight
            y = iw.linear(layer, x2.requires_grad_())
            assert torch.equal(y, layer(x2))
            y.sum().backward()
            assert layer.weight.grad is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert iw.linear(layer, x2).dtype == torch.bfloat16  # autocast: the module's own path
    assert not getattr(iw._state, "modules", None)


@torch.no_grad()
def test_input_major_linear_for_one_row_decoding_matches_f_linear(threads):
    threads(1)
    layer, no_bias = _layer(), nn.Linear(48, 80, bias=False)
    with iw.active([layer, no_bias], [], rows=1):
        assert iw._state.modules[layer][0] == "input_major"
        for x in (torch.randn(1, 48), torch.randn(1, 1, 48), torch.randn(2, 7, 48)):  # steps, and the prefill
            for m in (layer, no_bias):
                out = iw.linear(m, x)
                assert out.shape == m(x).shape
                torch.testing.assert_close(out, F.linear(x, m.weight, m.bias), rtol=0, atol=1e-5)


@torch.no_grad()
def test_only_plain_fp32_linears_are_prepared_and_the_kind_follows_rows_and_threads(threads):
    class Wrapped(nn.Linear):  # stands for peft's LoRA or a quantized layer: not a plain nn.Linear
        pass

    plain, wrapped, half = _layer(), Wrapped(48, 80), _layer().to(torch.bfloat16)
    head = torch.randn(100, 48)
    with iw.active([plain, wrapped, half], [head], rows=4):
        assert set(iw._state.modules) == {plain} and iw._state.modules[plain][0] == "packed"
        assert iw.form(head, "packed") is not None and iw.form(head, "input_major") is None
    threads(1)
    with iw.active([plain, wrapped], [head], rows=1):  # one row, one thread: input-major copies
        assert iw._state.modules[plain][0] == "input_major" and set(iw._state.modules) == {plain}
        assert torch.equal(iw.form(head, "input_major"), head.t().contiguous())
        assert iw.form(head, "packed") is None
    threads(2)
    with iw.active([plain], [head], rows=1):  # two threads: oneDNN's packed product uses both
        assert iw._state.modules[plain][0] == "packed" and iw.form(head, "packed") is not None
    with iw.active([plain], [head], rows=1, compiled=True):  # a compiled step can use input-major ones only
        assert iw._state.modules[plain][0] == "input_major"
    assert iw.form(head, "input_major") is None  # outside `active`


@pytest.mark.parametrize("rows", [6, 1])  # packed, input-major
@torch.no_grad()
def test_cached_copy_is_reused_and_rebuilt_after_any_change_to_the_weight(rows, threads):
    threads(1)
    layer, x = _layer(), torch.randn(rows, 48)
    with iw.active([layer], [], rows=rows):
        first = iw._state.modules[layer][1]
    with iw.active([layer], [], rows=rows):
        assert iw._state.modules[layer][1] is first  # unchanged weights: the cached copy
    for change in (lambda w: w.mul_(2.0),  # an optimizer step: bumps the version counter
                   lambda w: w.data.mul_(0.5),  # peft's merge writes through .data: no version bump
                   lambda w: w.data[3].add_(1.0)):  # one row edited through .data
        change(layer.weight)
        with iw.active([layer], [], rows=rows):
            torch.testing.assert_close(iw.linear(layer, x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
    layer.weight.data = torch.randn(80, 48)  # a new tensor behind the parameter
    with iw.active([layer], [], rows=rows):
        torch.testing.assert_close(iw.linear(layer, x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)


@torch.no_grad()
def test_budget_and_a_failing_probe_leave_everything_unpacked(monkeypatch):
    layer, head, x = _layer(), torch.randn(100, 48), torch.randn(6, 48)
    monkeypatch.setattr(iw, "BUDGET_BYTES", 1000)
    with iw.active([layer], [head], rows=6):
        assert not iw._state.modules and iw.form(head, "packed") is None
        assert torch.equal(iw.linear(layer, x), layer(x))
    monkeypatch.setattr(iw, "BUDGET_BYTES", 2 ** 30)
    monkeypatch.setattr(iw, "_probes", {})

    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(iw, "_pack", broken)
    assert not iw.packing_works(torch.device("cpu"))
    with iw.active([layer], [head], rows=6):  # packing refused: the head's input-major copy still helps
        assert not iw._state.modules and iw.form(head, "input_major") is not None
    monkeypatch.setattr(iw, "_probes", {})


@torch.no_grad()
def test_copies_are_per_thread():
    layer, x, seen = _layer(), torch.randn(6, 48), []
    with iw.active([layer], [], rows=6):
        worker = threading.Thread(target=lambda: seen.append(torch.equal(iw.linear(layer, x), layer(x))))
        worker.start()
        worker.join()
    assert seen == [True]


def test_generation_after_a_data_edit_equals_a_fresh_model(tmp_path):
    """End to end: generate, edit the weights through .data (as a LoRA merge does), generate again:
    the tokens are those of a model built with the edited weights from the start."""
    ours, _ = build_pair(tmp_path / "a", final_ln_scale=8.0)
    fresh, _ = build_pair(tmp_path / "b", final_ln_scale=8.0)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        before = ours.generate(ids, max_new_tokens=8, pad_token_id=0)  # fills the cache
        for model in (ours, fresh):
            for layer in model.gpt.gpt_layers:
                layer.interm_dense.weight.data.mul_(-3.0)
            model.gpt.word_embedding.weight.data[:, :8].mul_(-1.0)
        after = ours.generate(ids, max_new_tokens=8, pad_token_id=0)
        assert torch.equal(after, fresh.generate(ids, max_new_tokens=8, pad_token_id=0))
        assert not torch.equal(after, before)  # the edit matters: stale copies would have repeated `before`


@pytest.mark.parametrize("register", [lambda layer, hook: layer.register_forward_hook(hook),
                                      lambda layer, hook: torch.nn.modules.module.register_module_forward_hook(hook)],
                         ids=["module hook", "global hook"])
@torch.no_grad()
def test_a_hooked_linear_runs_its_own_forward(register):
    layer, calls = _layer(), []
    handle = register(layer, lambda *args: calls.append(1))
    try:
        with iw.active([layer], [], rows=6):
            iw.linear(layer, torch.randn(6, 48))
    finally:
        handle.remove()
    assert calls == [1]


def test_lora_wrapped_projections_get_no_copies_and_generate_as_without_copies(tmp_path, monkeypatch):
    from models.generation.decoder import inference_copies
    from training.efficient import apply_lora

    ours, _ = build_pair(tmp_path, final_ln_scale=8.0)
    apply_lora(ours, r=4, alpha=8.0, targets="attn")
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # adapters that change the output
    layer = ours.gpt.gpt_layers[0]
    with inference_copies([ours], 3):
        prepared = set(iw._state.modules)
    assert layer.interm_dense in prepared and layer.out_dense in prepared  # not LoRA targets: plain nn.Linear
    assert all(m not in prepared and m.base_layer not in prepared
               for m in (layer.self_attention.query, layer.self_attention.value, layer.attention_dense))
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        with_copies = ours.generate(ids, max_new_tokens=8, pad_token_id=0)
        monkeypatch.setattr(iw, "DEVICES", ())
        assert torch.equal(with_copies, ours.generate(ids, max_new_tokens=8, pad_token_id=0))


@torch.no_grad()
def test_the_cache_keeps_at_most_its_budget_dropping_the_least_recently_used(monkeypatch, threads):
    threads(1)  # rows 1: input-major, rows 4: packed
    iw.clear()
    a, b = _layer(0), _layer(1)
    size = a.weight.numel() * a.weight.element_size()
    monkeypatch.setattr(iw, "BUDGET_BYTES", 3 * size)  # room for three copies
    for rows in (4, 1):  # both kinds of a: two copies
        with iw.active([a], [], rows=rows):
            pass
    with iw.active([b], [], rows=4):  # a third: still within the budget
        pass
    assert set(iw._cache[a.weight]) == {"packed", "input_major"} and set(iw._cache[b.weight]) == {"packed"}
    kept = iw._cache[a.weight]["input_major"][2]
    with iw.active([b], [], rows=1):  # a fourth: a's packed copy, the least recently used, goes first
        assert set(iw._cache[a.weight]) == {"input_major"} and set(iw._cache[b.weight]) == {"packed", "input_major"}
        x = torch.randn(1, 48)
        torch.testing.assert_close(iw.linear(b, x), b(x), rtol=0, atol=1e-5)
    with iw.active([a], [], rows=1):
        assert iw._state.modules[a][1] is kept  # reused, not rebuilt
    iw.clear()


@torch.no_grad()
def test_clear_frees_the_copies_of_given_weights_or_all():
    a, b = _layer(0), _layer(1)
    with iw.active([a, b], [], rows=4):
        pass
    iw.clear(a.parameters())
    assert a.weight not in iw._cache and b.weight in iw._cache
    iw.clear()
    assert b.weight not in iw._cache


@torch.no_grad()
def test_a_stale_copy_is_freed_before_its_replacement_is_built_and_not_held_during_the_call():
    import weakref

    layer = _layer()
    with iw.active([layer], [], rows=4):
        old = weakref.ref(iw._state.modules[layer][1])
    layer.weight.mul_(2.0)
    with iw.active([layer], [], rows=4):
        assert old() is None  # only the new copy is alive while the call runs


def test_weights_made_in_inference_mode_and_cast_models(tmp_path):
    with torch.inference_mode():
        layer = _layer()
    x = torch.randn(4, 48)
    with torch.no_grad(), iw.active([layer], [], rows=4):
        torch.testing.assert_close(iw.linear(layer, x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
    plain = _layer()
    with torch.no_grad(), iw.active([plain], [], rows=4):
        pass
    plain.to(torch.bfloat16)  # same Parameter objects, new data: the fp32 copies are of no use any more
    with torch.no_grad(), iw.active([plain], [], rows=4):
        assert plain.weight not in iw._cache and not iw._state.modules


def test_two_threads_generate_at_once(tmp_path):
    """Two models (a model's KV cache is its own: one model is not shared between threads) preparing
    and using their copies concurrently: the shared cache stays consistent."""
    models = [build_pair(tmp_path / str(i), final_ln_scale=8.0)[0] for i in range(2)]
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    expected = models[0].generate(ids, max_new_tokens=6, pad_token_id=0)
    iw.clear()
    results, errors = [], []

    def work(model):
        try:
            for _ in range(3):
                results.append(model.generate(ids, max_new_tokens=6, pad_token_id=0))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(m,)) for m in models]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and len(results) == 6 and all(torch.equal(r, expected) for r in results)
