"""Tests for optimizer.AdamW: numbers against references, state round trips, errors on bad input."""

import io

import pytest
import torch

import optimizer_test
from optimizer import AdamW


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_float64_handout_reference(correct_bias, foreach):
    diff = optimizer_test.max_diff_vs_reference(torch.float64, correct_bias=correct_bias,
                                                foreach=foreach)
    assert diff <= optimizer_test.FLOAT64_ATOL


def test_float32_model_close_to_float64_reference():
    diff = optimizer_test.max_diff_vs_reference(torch.float32, correct_bias=True)
    assert diff <= optimizer_test.FLOAT32_ATOL


@pytest.mark.parametrize("weight_decay", [optimizer_test.WEIGHT_DECAY, 0.5])
def test_matches_torch_adamw_with_eps_zero(weight_decay):
    diff = optimizer_test.max_diff_vs_torch(steps=300, weight_decay=weight_decay)
    assert diff <= optimizer_test.FLOAT64_ATOL


def _params(seed=0, dtype=torch.float32):
    """A few tensors of different shapes, with deterministic gradients set by _set_grads."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        _set_grads(params, step)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_and_loop_are_bit_identical(dtype):
    results = []
    for foreach in (True, False):
        params = _params(dtype=dtype)
        opt = AdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
        _run(opt, params, 20)
        results.append([p.detach().clone() for p in params])
        assert all(opt.state[p]["exp_avg"].dtype == dtype for p in params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_state_dict_round_trip_continues_identically():
    params = _params()
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    _run(opt, params, 5)

    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    _run(opt, params, 5, start=5)  # the uninterrupted run

    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    resumed_opt = AdamW(resumed, lr=1.0)  # hyperparameters come from the state dict
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    assert resumed_opt.state[resumed[0]]["step"] == 5
    _run(resumed_opt, resumed, 5, start=5)

    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1e-3),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(betas=(-0.1, 0.999)),
        dict(weight_decay=-0.1),
    ],
)
def test_invalid_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        AdamW(_params(), **kwargs)


def test_zero_eps_and_zero_lr_are_allowed():
    AdamW(_params(), lr=0.0, eps=0.0, betas=(0.0, 0.0))


def test_sparse_gradients_raise():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    opt = AdamW(embedding.parameters())
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_params_without_grad_are_untouched(foreach):
    params = _params()
    frozen = params[1]
    before = frozen.detach().clone()
    opt = AdamW(params, lr=1e-2, weight_decay=0.5, foreach=foreach)
    for step in range(3):
        _set_grads(params, step)
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before)
    assert frozen not in opt.state
    assert opt.state[params[0]]["step"] == 3


def test_params_with_different_step_counts_use_their_own_bias_correction():
    # params[0] skips the first two steps, so it is at step 3 while the others are at step 5
    params = _params()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    ref_opt = AdamW(reference, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(5):
        for ps, o in ((params, opt), (reference, ref_opt)):
            _set_grads(ps, step)
            if step < 2:
                ps[0].grad = None
            o.step()
    assert opt.state[params[0]]["step"] == 3
    for a, b in zip(params, reference):
        assert torch.equal(a, b)


def test_param_groups_use_their_own_lr_and_weight_decay():
    params = _params()
    groups = [
        dict(params=params[:2], lr=1e-2, weight_decay=0.1),
        dict(params=params[2:], lr=1e-3, weight_decay=0.0, correct_bias=False),
    ]
    opt = AdamW(groups, lr=5e-2, weight_decay=0.7)
    # each group alone must give the same result as an optimizer built with its settings
    singles = []
    for group in groups:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]
        settings = {k: v for k, v in group.items() if k != "params"}
        singles.append((ps, AdamW(ps, **settings)))
    for step in range(10):
        _set_grads(params, step)
        opt.step()
        ps_all = [p for ps, _ in singles for p in ps]
        _set_grads(ps_all, step)
        for _, o in singles:
            o.step()
    for a, b in zip(params, [p for ps, _ in singles for p in ps]):
        assert torch.equal(a, b)
    # and the groups really differ: the second group did not take the first group's settings
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["weight_decay"] == 0.0


def test_step_returns_closure_loss():
    params = _params()
    opt = AdamW(params)

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert opt.state[params[0]]["step"] == 1
