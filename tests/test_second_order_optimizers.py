"""Tests for optim.SOAP and optim.Shampoo against pytorch-optimizer 4.1.0 (an independent port of the
SOAP authors' code, and the original Shampoo), against our AdamW for the fallback tensors, and for
exact resumption from a state_dict.

Gradients in the reference comparisons are fixed random tensors that do not depend on the
parameters, so both optimizers see the same sequence and every difference is the update rule's.
"""

import io

import pytest
import pytorch_optimizer  # test-only dependency, pinned in requirements.txt
import torch

from optim import SOAP, Shampoo, count_preconditioned
from training.optimizers import param_groups
from optimizer import AdamW

SHAPES = [(6, 6), (4, 7), (8, 3)]  # square and both rectangles


def _tensors(shapes, steps, dtype, seed=0):
    """(initial values, gradients[step]) as fixed random tensors."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]
    return init, grads


def _params(init):
    return [torch.nn.Parameter(t.clone()) for t in init]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()  # pytorch-optimizer's Shampoo transposes p.grad in place
    opt.step()


def _trajectories(make_a, make_b, shapes, steps, dtype=torch.float32):
    """Parameters after each step of two optimizers fed the same gradients: two lists of lists."""
    init, grads = _tensors(shapes, steps, dtype)
    a, b = _params(init), _params(init)
    opt_a, opt_b = make_a(a), make_b(b)
    out_a, out_b = [[t.clone() for t in init]], [[t.clone() for t in init]]
    for grad in grads:
        _step(opt_a, a, grad)
        _step(opt_b, b, grad)
        out_a.append([p.detach().clone() for p in a])
        out_b.append([p.detach().clone() for p in b])
    return out_a, out_b


def _max_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


# ---- SOAP against pytorch-optimizer's SOAP (the authors' algorithm) -------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_soap_matches_pytorch_optimizer(dtype, correct_bias):
    # 13 steps with precondition_frequency 3: the first initialises, then 4 QR refreshes
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, shampoo_beta=0.8, precondition_frequency=3,
              correct_bias=correct_bias, weight_decay=0.0)
    ours, ref = _trajectories(lambda p: SOAP(p, **hp),
                              lambda p: pytorch_optimizer.SOAP(p, max_precondition_dim=10000, **hp),
                              SHAPES, steps=13, dtype=dtype)
    assert _max_diff(ours[1], ours[0]) == 0.0  # the first step only builds the eigenbases
    moved = _max_diff(ours[-1], ours[0])
    assert moved > 0.02
    # the reference's QR runs in fp32 even for fp64 tensors, hence the same bound for both dtypes
    for x, y in zip(ours, ref):
        assert _max_diff(x, y) <= 1e-6


def test_soap_weight_decay_order_is_the_only_difference():
    # ours: W <- W (1 - lr wd) - a U (AdamW's order); the authors': W <- (W - a U)(1 - lr wd).
    # With parameter-independent gradients U is the same sequence, so the per-step updates
    # -a U = W_t - W_{t-1} (1 - lr wd) (ours) and W_t / (1 - lr wd) - W_{t-1} (theirs) agree.
    lr, wd = 1e-2, 0.5
    hp = dict(lr=lr, betas=(0.9, 0.95), weight_decay=wd, precondition_frequency=2)
    ours, ref = _trajectories(lambda p: SOAP(p, **hp), lambda p: pytorch_optimizer.SOAP(p, **hp),
                              SHAPES, steps=8)
    keep = 1.0 - lr * wd
    for t in range(2, len(ours)):
        ours_update = [x - y * keep for x, y in zip(ours[t], ours[t - 1])]
        ref_update = [x / keep - y for x, y in zip(ref[t], ref[t - 1])]
        assert _max_diff(ours_update, ref_update) <= 1e-6
    assert _max_diff(ours[-1], ref[-1]) > 1e-5  # and the two orders really differ


def test_soap_power_iteration_converges_to_the_factors_eigenbasis():
    # with one gradient repeated, L and R converge to G G^T and G^T G (up to scale), and the
    # refreshes (one power-iteration step each, Algorithm 4) to their eigenvectors, sorted
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(5, 4, generator=g, dtype=torch.float64)
    param = torch.nn.Parameter(torch.zeros(5, 4, dtype=torch.float64))
    opt = SOAP([param], shampoo_beta=0.5, precondition_frequency=1)
    for _ in range(60):
        param.grad = grad.clone()
        opt.step()
    state = opt.state[param]
    assert state["step"] == 59
    for q, factor in zip(state["Q"], state["GG"]):
        assert torch.allclose(q.mT @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12)
        rotated = q.mT @ factor @ q  # diagonal in the eigenbasis
        diag = rotated.diagonal()
        assert (rotated - torch.diag(diag)).abs().max() <= 1e-8 * diag.max()
        assert torch.all(diag[:-1] >= diag[1:])
        expected = torch.linalg.eigvalsh(factor).flip(0)
        assert torch.allclose(diag, expected, atol=1e-10)
    # V was re-sorted with the basis: the squared rotated gradient lines up with it
    rotated_grad = state["Q"][0].mT @ grad @ state["Q"][1]
    debias = 1 - opt.param_groups[0]["betas"][1] ** 59
    assert torch.allclose(state["exp_avg_sq"], debias * rotated_grad**2, rtol=1e-6, atol=1e-12)


# ---- Shampoo against pytorch-optimizer's Shampoo (Gupta et al.'s Algorithm 1) -------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_shampoo_without_grafting_matches_pytorch_optimizer(dtype, tol):
    # the paper's step: L = eps I + sum G G^T, W <- W - lr L^-1/4 G R^-1/4, roots every step
    ours, ref = _trajectories(
        lambda p: Shampoo(p, lr=1e-2, betas=(0.0, 0.9), shampoo_beta=1.0, matrix_eps=1e-3,
                          precondition_frequency=1, grafting="none"),
        lambda p: pytorch_optimizer.Shampoo(p, lr=1e-2, momentum=0.0, matrix_eps=1e-3,
                                            preconditioning_compute_steps=1),
        SHAPES, steps=10, dtype=dtype)
    assert _max_diff(ours[-1], ours[0]) > 0.01
    for x, y in zip(ours, ref):
        assert _max_diff(x, y) <= tol


def test_shampoo_adam_grafting_is_shampoo_direction_with_adamw_step_norm():
    # each per-step update = (pytorch-optimizer's Shampoo step) * ||our AdamW step|| / ||its norm||
    dtype, steps = torch.float64, 8
    init, grads = _tensors(SHAPES, steps, dtype)
    runs = {
        "ours": lambda p: Shampoo(p, lr=1e-2, betas=(0.0, 0.9), eps=1e-8, shampoo_beta=1.0,
                                  matrix_eps=1e-3, precondition_frequency=1, grafting="adam"),
        "shampoo": lambda p: pytorch_optimizer.Shampoo(p, lr=1.0, momentum=0.0, matrix_eps=1e-3),
        "adamw": lambda p: AdamW(p, lr=1e-2, betas=(0.0, 0.9), eps=1e-8),
    }
    params = {k: _params(init) for k in runs}
    opts = {k: make(params[k]) for k, make in runs.items()}
    for grad in grads:
        before = {k: [p.detach().clone() for p in ps] for k, ps in params.items()}
        for k in runs:
            _step(opts[k], params[k], grad)
        for i in range(len(SHAPES)):
            d = {k: params[k][i].detach() - before[k][i] for k in runs}
            expected = d["shampoo"] * d["adamw"].norm() / d["shampoo"].norm()
            assert (d["ours"] - expected).abs().max() <= 1e-12
            assert (d["ours"] - d["adamw"]).abs().max() > 1e-4  # the direction is not Adam's


def test_shampoo_decayed_factors_momentum_and_stale_roots_match_a_float64_derivation():
    import scipy.linalg as scipy_linalg  # installed with scikit-learn; an independent matrix power

    lr, b1, bs, meps, freq, steps = 1e-2, 0.9, 0.7, 1e-3, 3, 7
    init, grads = _tensors([(4, 5)], steps, torch.float64)
    params = _params(init)
    opt = Shampoo(params, lr=lr, betas=(b1, 0.99), shampoo_beta=bs, matrix_eps=meps,
                  precondition_frequency=freq, grafting="none")
    w, m = init[0].numpy().copy(), 0.0
    left, right = 0.0, 0.0
    for t, (grad,) in enumerate(grads, start=1):
        _step(opt, params, [grad])
        g = grad.numpy()
        m = b1 * m + (1 - b1) * g
        left = bs * left + (1 - bs) * g @ g.T
        right = bs * right + (1 - bs) * g.T @ g
        if (t - 1) % freq == 0:  # roots refreshed at t = 1, 4, 7 and stale in between
            root_l = scipy_linalg.fractional_matrix_power(left + meps * torch.eye(4).numpy(), -0.25)
            root_r = scipy_linalg.fractional_matrix_power(right + meps * torch.eye(5).numpy(), -0.25)
        w = w - lr * (root_l @ m @ root_r).real / (1 - b1**t)
        assert abs(params[0].detach().numpy() - w).max() <= 1e-8  # scipy's root: Schur-Pade


# ---- the fallback rule -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda groups: SOAP(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_precond_dim=50),
    lambda groups: Shampoo(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_precond_dim=50),
], ids=["soap", "shampoo"])
def test_fallback_tensors_equal_our_adamw_exactly(make):
    # 1-D, a dimension above max_precond_dim, 3-D, and a precondition=False group fall back;
    # the (6, 6) matrix is preconditioned and so must differ from AdamW
    shapes = [(7,), (60, 4), (3, 4, 2), (5, 5), (6, 6)]
    init, grads = _tensors(shapes, 6, torch.float32)
    ours, adam = _params(init), _params(init)
    opt = make([{"params": ours[:3]}, {"params": ours[3:4], "precondition": False}, {"params": ours[4:]}])
    ref = AdamW(adam, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert count_preconditioned(opt) == (1, 4)
    for grad in grads:
        _step(opt, ours, grad)
        _step(ref, adam, grad)
    for a, b in zip(ours[:4], adam[:4]):
        assert torch.equal(a, b)
    assert (ours[4] - adam[4]).abs().max() > 1e-3


def test_param_groups_gpt2_tied_embedding_falls_back():
    from models import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_name_or_path("tiny")  # vocab 50257, width 64, 512 positions
    wte, wpe = model.gpt.word_embedding.weight, model.gpt.pos_embedding.weight
    for precondition_embeddings in (False, True):
        opt = SOAP(param_groups(model, 0.1, precondition_embeddings=precondition_embeddings), lr=1e-3)
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
        assert groups[id(wte)]["precondition"] is precondition_embeddings
        matrices = [p for p in model.parameters() if p.dim() == 2 and p is not wte and p is not wpe]
        # wte is 50257 x 64 > max_precond_dim either way; wpe (512 x 64) only when asked
        assert count_preconditioned(opt) == (len(matrices) + precondition_embeddings,
                                             len(list(model.parameters())) - len(matrices) - precondition_embeddings)
        assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if g["params"][0].dim() < 2)


# ---- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ps: SOAP(ps, lr=1e-2, weight_decay=0.1, precondition_frequency=3, max_precond_dim=50),
    lambda ps: Shampoo(ps, lr=1e-2, weight_decay=0.1, precondition_frequency=3, max_precond_dim=50),
    lambda ps: Shampoo(ps, lr=1e-2, precondition_frequency=2, grafting="none", shampoo_beta=1.0),
], ids=["soap", "shampoo", "shampoo-none"])
def test_state_dict_resume_is_bit_exact(make):
    n, k = 11, 5  # k lands between refreshes, so the resumed run must carry stale bases/roots
    shapes = [(6, 5), (5,), (60, 3)]
    init, grads = _tensors(shapes, n, torch.float32)
    straight = _params(init)
    opt = make(straight)
    for grad in grads:
        _step(opt, straight, grad)

    first = _params(init)
    opt = make(first)
    for grad in grads[:k]:
        _step(opt, first, grad)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in first], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt = make(resumed)
    opt.load_state_dict(saved["opt"])
    for grad in grads[k:]:
        _step(opt, resumed, grad)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_resume_with_another_max_precond_dim_is_refused():
    init, grads = _tensors([(6, 5)], 3, torch.float32)
    params = _params(init)
    opt = SOAP(params)
    for grad in grads:
        _step(opt, params, grad)
    other = SOAP(params)
    other.load_state_dict(opt.state_dict())  # the saved groups come back with max_precond_dim=10000
    other.param_groups[0]["max_precond_dim"] = 4  # as a run that re-applies a changed config would
    params[0].grad = grads[0][0].clone()
    with pytest.raises(ValueError, match="max_precond_dim"):
        other.step()


# ---- training and bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ps: SOAP(ps, lr=3e-2, precondition_frequency=5),
    lambda ps: Shampoo(ps, lr=3e-2, precondition_frequency=5),
], ids=["soap", "shampoo"])
def test_loss_falls_on_least_squares(make):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 12, generator=g) @ torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    x = x * torch.logspace(0, -1.5, 12)  # ill-conditioned inputs
    y = x @ torch.randn(12, 8, generator=g)
    w = torch.nn.Parameter(torch.zeros(12, 8))
    b = torch.nn.Parameter(torch.zeros(8))
    opt = make([w, b])
    losses = []
    for _ in range(150):
        loss = ((x @ w + b - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_state_stays_in_the_parameter_dtype(dtype):
    init, grads = _tensors([(6, 5)], 4, dtype)
    for make in (lambda p: SOAP(p, precondition_frequency=2), lambda p: Shampoo(p, precondition_frequency=2)):
        params = _params(init)
        opt = make(params)
        for grad in grads:
            _step(opt, params, grad)
        state = opt.state[params[0]]
        tensors = [v for v in state.values() if torch.is_tensor(v)] + [t for v in state.values()
                                                                        if isinstance(v, list) for t in v]
        assert all(t.dtype == dtype for t in tensors) and torch.isfinite(params[0]).all()


@pytest.mark.parametrize("cls,kwargs,field", [
    (SOAP, dict(precondition_frequency=0), "precondition_frequency"),
    (SOAP, dict(max_precond_dim=2.5), "max_precond_dim"),
    (SOAP, dict(shampoo_beta=1.0), "shampoo_beta"),
    (SOAP, dict(lr=-1.0), "learning rate"),
    (Shampoo, dict(shampoo_beta=1.5), "shampoo_beta"),
    (Shampoo, dict(grafting="sgd"), "grafting"),
    (Shampoo, dict(matrix_eps=0.0), "matrix_eps"),
    (Shampoo, dict(betas=(0.9, 1.0)), "betas"),
])
def test_invalid_hyperparameters_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls([torch.nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_sparse_gradients_raise():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    for opt in (SOAP(embedding.parameters()), Shampoo(embedding.parameters())):
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()


def test_sharded_parameters_are_refused():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        param.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
        for opt in (SOAP([param]), Shampoo([param])):
            with pytest.raises(TypeError, match="fsdp"):
                opt.step()
    finally:
        dist.destroy_process_group()


# ---- through the shared trainer: every script takes --optimizer soap|shampoo and resumes exactly ----
@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_classifier_trains_and_resumes_exactly_with_second_order_optimizers(tmp_path, tokenizer_dir, name):
    import classifier
    from cs224n_files import keyword_sentiment, write_sentiment

    files = []
    for split, n, test in (("train", 12, False), ("dev", 6, False), ("test", 4, True)):
        path = write_sentiment(tmp_path / f"{split}.csv", keyword_sentiment(n, len(files)), test=test)
        files += [f"--cfimdb_{split}", str(path)]
    common = ["--model_size", "tiny", "--no_progress", "--batch_size", "4", "--tokenizer", str(tokenizer_dir),
              "--datasets", "cfimdb", "--fine-tune-mode", "full-model", "--epochs", "2", "--lr", "3e-3",
              "--optimizer", name, "--precondition_frequency", "2", *files]

    def run(tag, *extra):
        return classifier.main([*common, "--run_dir", str(tmp_path / tag), "--predictions_dir",
                                str(tmp_path / f"{tag}-pred"), *extra])

    full = run("a")
    assert run("b", "--stop_after_epoch", "1") == {}
    assert run("b", "--resume", str(tmp_path / "b")) == full
    a = torch.load(tmp_path / "a" / "cfimdb" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "cfimdb" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # some matrices really were preconditioned (Kronecker factors in the saved optimiser state)
    assert any("GG" in s for s in a["optimizer"]["state"].values())
