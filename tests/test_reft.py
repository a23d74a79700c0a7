"""ReFT (LoReFT interventions, training/reft.py): the paper's formula by hand, identity at
initialisation, orthonormal R under real optimiser steps, the positions of right- and left-padded
rows, the hooked model against an explicit layer-by-layer reference (training, gradient
checkpointing, KV-cached generation), adapter-only checkpoints through the one loader."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from config import GPT2Config
from models.gpt2 import GPT2LMHeadModel, GPT2Model
from training import checkpoint
from training.config import EfficiencyConfig
from training.efficient import efficiency_report, model_state, prepare_model
from training.reft import (LoReFT, Positions, apply_reft, interventions, orthonormality_error, parse_positions,
                           reft_settings, reft_state, select_positions, trainable_sizes)


def tiny(layers: int = 3, dropout: float = 0.0, init: float = 0.02) -> GPT2Config:
    return GPT2Config(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      initializer_range=init)


class Classifier(torch.nn.Module):
    head_modules = ("classifier_head",)

    def __init__(self, config):
        super().__init__()
        self.gpt = GPT2Model(config)
        self.classifier_head = torch.nn.Linear(config.hidden_size, 3)

    def forward(self, ids, mask=None):
        return self.classifier_head(self.gpt(ids, mask)["last_token"])


def right_padded(seed=1, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def perturb(model, seed=0, scale=0.5):
    """Move every intervention away from the identity (W, b random), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in interventions(model).values():
            m.source.weight.add_(scale * torch.randn(m.source.weight.shape, generator=g))
            m.source.bias.copy_(scale * torch.randn(m.source.bias.shape, generator=g))


def reference_encode(model, ids, mask, sel, positions=None):
    """Our layers one by one with the interventions applied by hand at `sel` (B, T): independent of the hooks."""
    gpt = model.gpt if hasattr(model, "gpt") else model
    T = ids.size(1)
    pos = torch.arange(T)[None] if positions is None else positions
    from modules.attention import build_attention_mask

    attn, causal = build_attention_mask(mask, T, 0, ids.device)
    h = gpt.embed(ids, pos)
    for layer in gpt.gpt_layers:
        h = layer.forward(h, attn, causal, None)  # .forward: the hooks do not run
        if hasattr(layer, "reft"):
            R, W, b = layer.reft.rotation.weight, layer.reft.source.weight, layer.reft.source.bias
            edited = h + (h @ W.T + b - h @ R.T) @ R  # the paper's Phi(h) = h + R^T (W h + b - R h)
            h = torch.where(sel[..., None], edited, h)
    return gpt.final_layer_norm(h)


# ---- the intervention ---------------------------------------------------------------------
def test_fresh_intervention_with_w_equal_r_is_the_identity_and_matches_the_formula():
    torch.manual_seed(0)
    iv = LoReFT(32, 4)
    h = torch.randn(5, 7, 32)
    assert torch.equal(iv.source.weight, iv.rotation.weight) and torch.equal(iv.source.bias, torch.zeros(4))
    assert torch.equal(iv(h), h)  # fresh: W = R, b = 0, exactly the identity
    iv, h = iv.double(), h.double()
    R = iv.rotation.weight
    with torch.no_grad():
        iv.source.weight.copy_(R)
    assert torch.equal(iv(h), h)
    with torch.no_grad():  # any W, b: the paper's formula, computed by hand
        iv.source.weight.normal_()
        iv.source.bias.normal_()
    W, b = iv.source.weight, iv.source.bias
    expected = h + torch.einsum("rd,...r->...d", R, torch.einsum("rd,...d->...r", W, h) + b - torch.einsum(
        "rd,...d->...r", R, h))
    torch.testing.assert_close(iv(h), expected, rtol=0, atol=1e-12)
    # The edit lives in R's row space: the component orthogonal to it is untouched.
    P = torch.eye(32, dtype=torch.float64) - R.T @ R
    torch.testing.assert_close((iv(h) - h) @ P, torch.zeros_like(h), rtol=0, atol=1e-12)
    assert (R @ R.T - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-12


def test_fresh_reft_model_computes_the_base_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny()).eval()
    ids, mask = right_padded()
    base = model(ids, mask)
    apply_reft(model, rank=4, layers="all", positions="f2+l3")
    assert torch.equal(model(ids, mask), base)
    assert model.gpt.word_embedding.weight is model.lm_head_weight  # still tied


@pytest.mark.parametrize("spec,first,last,every", [("f2", 2, 0, False), ("l3", 0, 3, False),
                                                   ("f1+l2", 1, 2, False), ("all", 0, 0, True)])
def test_positions_follow_each_rows_real_tokens_on_either_padding_side(spec, first, last, every):
    where = parse_positions(spec)
    assert where == Positions(first, last, every)
    lengths = [10, 6, 3, 1]
    for side in ("right", "left"):
        valid = torch.zeros(4, 10, dtype=torch.bool)
        for b, n in enumerate(lengths):
            valid[b, :n] = True
            if side == "left":
                valid[b] = valid[b].flip(0)
        got = select_positions(valid, 10, where, torch.device("cpu"))
        for b, n in enumerate(lengths):
            real = [t for t in range(10) if valid[b, t]]
            want = set(real) if every else set(real[:first]) | set(real[max(0, n - last):])
            assert {t for t in range(10) if got[b, t]} == want, (spec, side, b)


@pytest.mark.parametrize("bad", ["", "x3", "f", "l0", "f0+l1", "f2l3", "l2+f1", "f1+", "3"])
def test_bad_positions_are_refused(bad):
    with pytest.raises(ValueError, match="reft_positions"):
        parse_positions(bad)


# ---- the hooked model against the reference -------------------------------------------------
@pytest.mark.parametrize("positions", ["f1+l2", "l1", "all"])
def test_hooked_forward_equals_explicit_reference(positions):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny()).eval()
    apply_reft(model, rank=3, layers="0,2", positions=positions)
    perturb(model)
    ids, mask = right_padded()
    sel = select_positions(mask.bool(), 10, parse_positions(positions), ids.device)
    ref = reference_encode(model, ids, mask, sel)
    torch.testing.assert_close(model.gpt(ids, mask)["last_hidden_state"], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(ids, mask), model.gpt.hidden_state_to_token(ref), rtol=0, atol=1e-5)
    assert sorted(interventions(model)) == ["gpt.gpt_layers.0.reft", "gpt.gpt_layers.2.reft"]


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Classifier(tiny())
        prepare_model(model, EfficiencyConfig(peft="reft", reft_rank=2, reft_positions="f1+l2",
                                              grad_checkpointing=ckpt))
        perturb(model)
        model.train()
        ids, mask = right_padded()
        model(ids, mask).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(".reft." in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-6)


def test_direct_encode_needs_the_mask_for_first_last_positions():
    torch.manual_seed(0)
    model = GPT2Model(tiny())
    apply_reft(model, positions="l2")
    ids, mask = right_padded()
    with pytest.raises(ValueError, match="reft_positions"):
        model.encode(ids, mask)
    model(ids, mask)  # through forward the mask is known
    every = GPT2Model(tiny())
    apply_reft(every, positions="all")
    every.encode(ids, mask)


# ---- generation with the KV cache -----------------------------------------------------------
@pytest.mark.parametrize("positions", ["all", "f2", "l2", "f1+l1"])
def test_cached_generation_intervenes_the_prompt_at_prefill(positions):
    """Greedy tokens of generate() (KV cache, left-padded batch) = greedy decoding by full reference
    forwards where the intervened tokens are the prompt's chosen ones (all: every real token)."""
    from models.generation import left_pad

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny(init=0.5)).eval()  # large weights: greedy tokens that do not just repeat
    apply_reft(model, rank=4, layers="all", positions=positions)
    perturb(model, scale=2.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (6, 3, 9)]
    ids, mask = left_pad(prompts, pad_id=0)
    out = model.generate(ids, mask, max_new_tokens=6, do_sample=False)
    where = parse_positions(positions)
    P = ids.size(1)
    prompt_sel = select_positions(mask.bool(), P, where, ids.device)
    seq, full_mask = ids, mask
    with torch.no_grad():
        for _ in range(6):
            sel = full_mask.bool() if where.all else F.pad(prompt_sel, (0, seq.size(1) - P), value=False)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.gpt.hidden_state_to_token(reference_encode(model, seq, full_mask, sel, pos))
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, full_mask = torch.cat([seq, nxt], 1), F.pad(full_mask, (0, 1), value=1)
    assert torch.equal(out, seq)
    assert len(set(out[:, P:].flatten().tolist())) > 3
    plain = GPT2LMHeadModel(tiny()).eval()  # the interventions do change what is generated
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".reft." not in k})
    assert not torch.equal(plain.generate(ids, mask, max_new_tokens=6, do_sample=False), out)


# ---- training --------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "soap", "sgd"])
def test_r_stays_orthonormal_and_only_interventions_and_head_train(optimizer):
    from training.config import TrainConfig
    from training.optimizers import build_optimizer

    torch.manual_seed(0)
    model = Classifier(tiny())
    prepare_model(model, EfficiencyConfig(peft="reft", reft_rank=4, reft_layers="1,2", reft_positions="l2"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rotations = {n: m.rotation.weight.detach().clone() for n, m in interventions(model).items()}
    cfg = TrainConfig(lr=5e-2, weight_decay=0.1, optimizer=optimizer, precondition_frequency=1)
    opt = build_optimizer(model, cfg, [])
    ids, mask = right_padded()
    labels = torch.tensor([0, 1, 2])
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(ids, mask), labels).backward()
        opt.step()
    assert orthonormality_error(model) < 1e-5
    for n, m in interventions(model).items():
        assert (m.rotation.weight - rotations[n]).abs().max() > 1e-3, n  # R did move
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert trainable == {f"gpt.gpt_layers.{i}.reft.{t}" for i in (1, 2) for t in
                         ("rotation.parametrizations.weight.original", "source.weight", "source.bias")} \
        | {"classifier_head.weight", "classifier_head.bias"}
    report = efficiency_report(model, "cpu")
    assert report["trainable_params"] == trainable_sizes(32, 4, [1, 2]) + 32 * 3 + 3
    assert report["reft"] == {"rank": 4, "layers": "1,2", "positions": "l2", "modules_to_save": ["classifier_head"]}


def test_adapter_checkpoint_round_trip_through_the_one_loader(tmp_path):
    torch.manual_seed(0)
    model = Classifier(tiny())
    prepare_model(model, EfficiencyConfig(peft="reft", reft_rank=2, reft_positions="f1+l1"), head=["classifier_head"])
    perturb(model)
    state = model_state(model)
    assert state["format"] == "reft-adapter" and state["reft"]["modules_to_save"] == ["classifier_head"]
    assert all(".reft." in k or k.startswith("classifier_head.") for k in state["tensors"])
    assert sum(v.numel() for v in state["tensors"].values()) == trainable_sizes(32, 2, [0, 1, 2]) + 32 * 3 + 3
    path = checkpoint.save_atomic({"model": state}, tmp_path / "best.pt")
    ids, mask = right_padded()
    model.eval()
    fresh = Classifier(tiny()).eval()  # other random head and interventions: the load must replace them
    fresh.gpt.load_state_dict({k[4:]: v for k, v in model.state_dict().items() if k.startswith("gpt.")
                               and ".reft." not in k})
    checkpoint.load_weights(fresh, tmp_path)
    assert reft_settings(fresh) == reft_settings(model)
    torch.testing.assert_close(fresh(ids, mask), model(ids, mask), rtol=0, atol=0)
    # A classifier's interventions load into an LM for generation (the head left out).
    lm = GPT2LMHeadModel(tiny()).eval()
    lm.gpt.load_state_dict(fresh.gpt.state_dict(), strict=False)
    checkpoint.load_weights(lm, path)
    assert reft_settings(lm).modules_to_save == []
    torch.testing.assert_close(lm.gpt(ids, mask)["last_hidden_state"],
                               model.gpt(ids, mask)["last_hidden_state"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="ReFT"):
        apply_reft(lm)


def test_interventions_load_onto_a_quantized_base(tmp_path):
    """The deployment route of a ReFT run on a quantized model (--qat with reft is refused: it would
    fake-quantize only frozen weights): quantize the frozen base (quantize.py's round-to-nearest) and
    load the run's adapter checkpoint onto it through the one loader; the result is the quantized
    layers with the paper's formula applied by hand at the chosen positions."""
    from models import quant

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny()).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_reft(model, rank=2, layers="0,2", positions="l2")
    perturb(model)
    checkpoint.save_atomic({"model": reft_state(model)}, tmp_path / "best.pt")
    deployed = GPT2LMHeadModel(tiny())
    deployed.load_state_dict(base)
    quant.quantize_linears(deployed.eval(), quant.qat_spec("int8"))
    checkpoint.load_weights(deployed, tmp_path)
    assert reft_settings(deployed) == reft_settings(model)
    assert all(isinstance(m, quant.QuantizedLinear) for m in quant.linear_layers(deployed).values())
    ids, mask = right_padded()
    sel = select_positions(mask.bool(), ids.size(1), parse_positions("l2"), ids.device)
    with torch.no_grad():
        got = deployed.gpt(ids, mask)["last_hidden_state"]
        torch.testing.assert_close(got, reference_encode(deployed, ids, mask, sel), rtol=1e-5, atol=1e-5)
        assert (got - reference_encode(deployed, ids, mask, torch.zeros_like(sel))).abs().max() > 1e-2
        assert (got - model.gpt(ids, mask)["last_hidden_state"]).abs().max() < 0.1  # int8 stays close to fp32


def test_config_errors_name_the_field():
    for kwargs, field in (({"reft_positions": "x3"}, "reft_positions"), ({"reft_layers": "1,a"}, "reft_layers"),
                          ({"reft_rank": 0}, "reft_rank"), ({"merge_lora": True}, "merge_lora"),
                          ({"freeze": "all-but-head"}, "peft"), ({"qat": "int8"}, "qat")):
        with pytest.raises(ConfigError) as exc:
            EfficiencyConfig(peft="reft", **kwargs).validate()
        assert exc.value.field == field
    model = GPT2LMHeadModel(tiny())
    with pytest.raises(ConfigError) as exc:
        prepare_model(model, EfficiencyConfig(peft="reft", reft_layers="5"))
    assert exc.value.field == "reft_layers"
    with pytest.raises(ConfigError) as exc:
        prepare_model(GPT2LMHeadModel(tiny()), EfficiencyConfig(peft="reft", reft_layers="0", freeze="first-n",
                                                                freeze_layers=1))
    assert exc.value.field == "freeze"
    with pytest.raises(ConfigError) as exc:
        prepare_model(GPT2LMHeadModel(tiny()), EfficiencyConfig(peft="reft", reft_rank=33))
    assert exc.value.field == "reft_rank"


def test_every_task_script_takes_the_reft_flags():
    import classifier
    import paraphrase_detection
    import pretrain
    import sonnet_generation
    from common.errors import UserError
    from training.cli import check_common_args

    flags = ["--peft", "reft", "--reft_rank", "8", "--reft_layers", "0,1", "--reft_positions", "f2+l3"]
    for module, extra in ((classifier, ["--fine-tune-mode", "full-model"]), (paraphrase_detection, []),
                          (sonnet_generation, []), (pretrain, ["--corpus", __file__])):
        cfg = check_common_args(module.parse_args([*flags, *extra])).efficiency
        assert (cfg.peft, cfg.reft_rank, cfg.reft_layers, cfg.reft_positions) == ("reft", 8, "0,1", "f2+l3")
        with pytest.raises(UserError, match="--reft_positions"):
            check_common_args(module.parse_args(["--peft", "reft", "--reft_positions", "last4", *extra]))


def test_reft_learns_a_task_read_at_the_last_token():
    """The interventions alone (base frozen) learn a label that the last token decides."""
    from training.config import TrainConfig
    from training.optimizers import build_optimizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))
    prepare_model(model, EfficiencyConfig(peft="reft", reft_rank=4, reft_positions="l1"))
    opt = build_optimizer(model, TrainConfig(lr=1e-2), [])
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        ids = torch.randint(0, 97, (32, 8), generator=g)
        logits = F.linear(model.gpt(ids)["last_token"], model.lm_head_weight[[5, 7]])
        loss = F.cross_entropy(logits, ids[:, -1] % 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[:10]) / 10 > 0.65 and sum(losses[-10:]) / 10 < 0.5
