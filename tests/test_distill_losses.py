"""Distillation losses and teacher/student plumbing: values against hand computations and torch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from distillation.losses import (Critic, HiddenStateAligner, LayerwiseWasserstein, evenly_spaced_layer_map,
                            gradient_penalty, hidden_mse_loss, kd_kl_loss, parse_layer_map)
from distillation.models import (Distiller, StudentWithAligner, every_kth_layers, forward_with_hiddens,
                            init_student_from_teacher)
from models.gpt2 import GPT2LMHeadModel


def small(layers=4, hidden=32, heads=4, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return GPT2LMHeadModel(cfg)


def lm_logits(model, final, batch):
    return model.backbone.hidden_state_to_token(final), batch["attention_mask"]


def lm_ce(logits, batch):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["input_ids"][:, 1:].reshape(-1))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---- KL -----------------------------------------------------------------------------------------
def test_kl_matches_torch_kl_div_times_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7, 11), torch.randn(4, 7, 11)
    T = 2.5
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum") / 28 * T * T
    assert torch.allclose(kd_kl_loss(s, t, T), ref, atol=1e-6)
    assert kd_kl_loss(s, s.clone(), T).abs() < 1e-6
    assert kd_kl_loss(s, t, T) > 0.01


def test_kl_ignores_padding_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = kd_kl_loss(s, t, 1.0, mask)
    s2 = s.clone()
    s2[0, 3:] = 100 * torch.randn(2, 9)  # garbage at padded positions
    assert torch.allclose(kd_kl_loss(s2, t, 1.0, mask), base)
    per_pos = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(base, per_pos[mask.bool()].mean(), atol=1e-6)


def test_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- layer maps, MSE -------------------------------------------------------------------------------
def test_layer_maps():
    assert evenly_spaced_layer_map(2, 12) == [5, 11]
    assert evenly_spaced_layer_map(3, 12) == [3, 7, 11]
    assert evenly_spaced_layer_map(4, 4) == [0, 1, 2, 3]
    assert parse_layer_map("0,3", 2, 4) == [0, 3]
    with pytest.raises(ValueError, match="--layer_map"):
        parse_layer_map("0,4", 2, 4)
    with pytest.raises(ValueError):
        evenly_spaced_layer_map(5, 4)


def test_mse_zero_for_equal_states_positive_otherwise_and_projection_when_widths_differ():
    torch.manual_seed(0)
    hs = [torch.randn(2, 5, 8) for _ in range(4)]
    same = HiddenStateAligner(8, 8, [1, 3])
    fake, real = same([hs[1], hs[3]], hs)
    assert all(isinstance(p, nn.Identity) for p in same.projections)
    assert hidden_mse_loss(fake, real) == 0
    assert hidden_mse_loss([h + 0.5 for h in fake], real) == pytest.approx(0.25, abs=1e-6)
    wide = HiddenStateAligner(4, 8, [0, 2])
    fake, real = wide([torch.randn(2, 5, 4), torch.randn(2, 5, 4)], hs)
    assert all(isinstance(p, nn.Linear) and p.weight.shape == (8, 4) for p in wide.projections)
    assert fake[0].shape == (2, 5, 8) and real[1] is hs[2]
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    a, b = torch.zeros(2, 5, 3), torch.zeros(2, 5, 3)
    b[0, 2:] = 7.0  # differences only at padding
    assert hidden_mse_loss([a], [b], mask) == 0


# ---- gradient penalty and Wasserstein ------------------------------------------------------------
def test_gradient_penalty_linear_critic_is_weight_norm():
    lin = nn.Linear(6, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -1.2, 0.5, 2.0, 0.0, -0.7]]))
    real, fake = torch.randn(9, 6), torch.randn(9, 6)
    gp = gradient_penalty(lambda x: lin(x).squeeze(-1), real, fake)
    assert gp.item() == pytest.approx((lin.weight.norm().item() - 1) ** 2, rel=1e-6)


def test_gradient_penalty_uses_per_sample_interpolates():
    # D(x) = 0.5 ||x||^2 has gradient x, so the penalty is mean((||x_hat|| - 1)^2) at the interpolates.
    real, fake = torch.randn(7, 5), torch.randn(7, 5) * 3
    gp = gradient_penalty(lambda x: 0.5 * x.pow(2).sum(-1), real, fake, torch.Generator().manual_seed(3))
    eps = torch.rand(7, 1, generator=torch.Generator().manual_seed(3))
    x_hat = eps * real + (1 - eps) * fake
    assert gp.item() == pytest.approx(((x_hat.norm(dim=1) - 1) ** 2).mean().item(), rel=1e-6)
    # one eps per row: a single shared eps gives another value
    shared = eps[0] * real + (1 - eps[0]) * fake
    assert abs(gp.item() - ((shared.norm(dim=1) - 1) ** 2).mean().item()) > 1e-4


def test_gradient_penalty_trains_the_critic():
    critic = Critic(4, 16)
    gp = gradient_penalty(critic, torch.randn(5, 4), torch.randn(5, 4))
    gp.backward()
    # every weight matters to the gradient w.r.t. the input; the output bias does not
    assert all(p.grad is not None for n, p in critic.named_parameters() if n != "net.4.bias")
    assert critic.net[4].bias.grad is None


def test_wasserstein_estimate_zero_for_equal_positive_for_shifted_distributions():
    torch.manual_seed(0)
    wd = LayerwiseWasserstein(4, 1, hidden=32)
    real = [torch.randn(64, 4)]
    assert wd.estimate(real, [real[0].clone()]).abs() < 1e-6
    fake = [torch.randn(64, 4) + 2.0]
    opt = torch.optim.Adam(wd.parameters(), lr=1e-2, betas=(0.0, 0.9))
    for _ in range(40):
        opt.zero_grad()
        wd.critic_loss(real, fake).backward()
        opt.step()
    # W1 between N(0, I) and N(2*1, I) in 4-d is ||shift|| = 4; a trained critic gets a good share of it
    assert wd.estimate(real, fake).item() > 1.0
    assert wd.estimate(real, [real[0].clone()]).abs() < 1e-6


# ---- teacher / student ---------------------------------------------------------------------------
def test_every_kth_and_init_student_copies_the_right_layers():
    teacher, student = small(layers=4, seed=0), small(layers=2, seed=1)
    layers = every_kth_layers(4, 2)
    assert layers == [1, 3]
    init_student_from_teacher(student, teacher, layers)
    ts, ss = teacher.state_dict(), student.state_dict()
    for i, j in enumerate(layers):
        for key in teacher.gpt.gpt_layers[j].state_dict():
            assert torch.equal(ss[f"gpt.gpt_layers.{i}.{key}"], ts[f"gpt.gpt_layers.{j}.{key}"])
    for key in ("gpt.word_embedding.weight", "gpt.pos_embedding.weight", "gpt.final_layer_norm.weight",
                "gpt.final_layer_norm.bias"):
        assert torch.equal(ss[key], ts[key])
    assert not torch.equal(ss["gpt.gpt_layers.0.interm_dense.weight"], ts["gpt.gpt_layers.0.interm_dense.weight"])
    # a 4-layer student initialised with k=1 is the teacher
    clone = small(layers=4, seed=5)
    init_student_from_teacher(clone, teacher, every_kth_layers(4, 1))
    ids = batch()["input_ids"]
    assert torch.equal(clone(ids), teacher(ids))


def test_init_student_errors_name_the_problem():
    with pytest.raises(ValueError, match="hidden_size"):
        init_student_from_teacher(small(layers=2, hidden=16), small(layers=4), [1, 3])
    with pytest.raises(ValueError, match="layer count to 2"):
        init_student_from_teacher(small(layers=3), small(layers=4), [1, 3])
    with pytest.raises(ValueError, match="--init_every_k"):
        every_kth_layers(4, 5)


def test_forward_with_hiddens_gives_each_layer_output():
    model = small(layers=3)
    b = batch()
    final, layers = forward_with_hiddens(model, b["input_ids"], b["attention_mask"])
    assert len(layers) == 3 and all(h.shape == (3, 10, 32) for h in layers)
    assert torch.allclose(final, model.gpt.final_layer_norm(layers[-1]))
    assert torch.allclose(final, model.gpt.encode(b["input_ids"], b["attention_mask"]))


def make_distiller(teacher, student, **weights):
    d = Distiller(teacher, temperature=2.0, critic_hidden=16, **weights)
    return d, StudentWithAligner(student, d.make_aligner(student))


def test_losses_zero_when_student_is_teacher():
    teacher = small(layers=2)
    student = copy.deepcopy(teacher)
    d, model = make_distiller(teacher, student, kl_weight=1.0, mse_weight=1.0, wd_weight=1.0, hard_weight=0.0)
    _, parts = d.loss(model, batch(), lm_logits, lm_ce)
    assert parts["kl"] < 1e-6 and parts["mse"] < 1e-10 and abs(parts["wd"]) < 1e-5
    other = small(layers=2, seed=7)
    d, model = make_distiller(teacher, other, kl_weight=1.0, mse_weight=1.0, wd_weight=1.0, hard_weight=0.0)
    _, parts = d.loss(model, batch(), lm_logits, lm_ce)
    assert parts["kl"] > 1e-4 and parts["mse"] > 1e-3


def test_only_student_projections_and_critics_get_gradients():
    teacher, student = small(layers=4, hidden=32), small(layers=2, hidden=16, seed=3)
    d, model = make_distiller(teacher, student, kl_weight=1.0, mse_weight=1.0, wd_weight=1.0, hard_weight=1.0)
    assert d.layer_map == [1, 3]
    assert all(isinstance(p, nn.Linear) for p in model.aligner.projections)
    model.train()
    total, parts = d.loss(model, batch(), lm_logits, lm_ce)
    assert set(parts) == {"hard", "kl", "mse", "wd"}
    total.backward()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in model.aligner.parameters())
    # the student's backward left the critics alone; the trainer's micro-batch hook then steps them
    # with their own optimizer on the samples the loss stashed
    assert d.critics is not None and all(p.grad is None for p in d.critics.parameters())
    assert all(p.requires_grad for p in d.critics.parameters()) and not d.critic_opt.state
    d.on_micro_batch_end(None, batch())
    assert d.critic_opt.state and all(s["step"] == 1 for s in d.critic_opt.state.values())
    assert all(p.grad is None for p in d.critics.parameters())


def test_distiller_state_round_trip():
    teacher, student = small(layers=2), small(layers=2, seed=2)
    d, model = make_distiller(teacher, student, wd_weight=1.0)
    model.train()
    d.loss(model, batch(), lm_logits, lm_ce)
    d.on_micro_batch_end(None, batch())
    state = d.state_dict()
    d2, _ = make_distiller(teacher, student, wd_weight=1.0)
    d2.load_state_dict(state)
    for a, b in zip(d.critics.parameters(), d2.critics.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(d.generator.get_state(), d2.generator.get_state())


def test_distiller_rejects_bad_weights():
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(None, kl_weight=1.0)
    with pytest.raises(ValueError, match="--mse_weight"):
        Distiller(small(), mse_weight=-1.0)
