"""Weight-only quantization (models/quant/): the round-to-nearest quantizer against its analytic bound and
torchao, int4 packing, quantized layers and models, GPTQ against RTN and a plain reference of its
recursion, quantized checkpoints, and the QAT fake-quant wrapper."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models.quant as quant
from config import GPT2Config
from models.gpt2 import GPT2LMHeadModel, GPT2Model
from models.quant.gptq import HessianAccumulator
from models.quant.primitives import group_scales

SPECS = [quant.QuantSpec(8), quant.QuantSpec(4, 64), quant.QuantSpec(4, 16)]


def small_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return GPT2LMHeadModel(cfg).eval()


# ---- the quantizer -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_error_within_analytic_bound(spec):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3  # rows of different ranges
    q, scales = quant.quantize(w, spec)
    qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    assert q.dtype == torch.int8 and q.min() >= qmin and q.max() <= qmax
    group = spec.group_size or w.shape[1]
    amax = w.reshape(48, -1, group).abs().amax(-1)  # (N, G)
    torch.testing.assert_close(scales, amax / (2 ** (spec.bits - 1) - 0.5))
    err = (w - quant.dequantize(q, scales)).abs().reshape(48, -1, group)
    bound = (amax / (2 ** spec.bits - 1))[..., None]  # s / 2 = max|w| / (2^b - 1)
    ulps = 4 * torch.finfo(torch.float32).eps * amax[..., None]  # float32 rounding of w - s q
    assert (err <= bound + ulps).all()
    assert (err.amax(-1) > 0.5 * bound[..., 0]).all()  # the bound is what RTN really reaches


def test_rtn_by_hand():
    # One 4-bit group with max|w| = 7.5: scale 7.5 / 7.5 = 1, so q = clamp(round(w), -8, 7).
    w = torch.tensor([[7.5, -3.2, 0.6, -7.5, 2.5, -0.4]])
    q, scales = quant.quantize(w, quant.QuantSpec(4, 6))
    assert scales.tolist() == [[1.0]]
    assert q.tolist() == [[7, -3, 1, -8, 2, 0]]  # 7.5 -> 8 clamped to 7; -7.5 -> -8 (in range); 2.5 -> 2 (ties to even)
    # 8-bit per channel: row max 2.55 -> scale 0.02, 2.55 / 0.02 = 127.5 -> clamped to 127.
    q8, s8 = quant.quantize(torch.tensor([[2.55, 1.0, -0.011]], dtype=torch.float64), quant.QuantSpec(8))
    assert s8.item() == pytest.approx(0.02) and q8.tolist() == [[127, 50, -1]]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_matches_torchao(spec):
    """torchao's symmetric affine quantizer (an independent implementation) gives the same scales
    and integers; the only allowed difference is the tie w / s = -(2^(b-1) - 1/2) at a group's
    most negative weight, which torchao rounds up and we round half-to-even (both err by s/2).
    torchao is not a project dependency (peft imports it whenever it is installed, slowly and
    noisily, in every LoRA run): `pip install --no-deps torchao==0.18.0` to run this test."""
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    torch.manual_seed(1)
    w = torch.randn(40, 128)
    qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    block = (1, spec.group_size or 128)
    s_ref, zero = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, block, torch.int8,
                                           quant_min=qmin, quant_max=qmax)
    q_ref = qp.quantize_affine(w, block, s_ref, zero, torch.int8, qmin, qmax)
    q, scales = quant.quantize(w, spec)
    torch.testing.assert_close(scales.reshape(s_ref.shape), s_ref, rtol=0, atol=0)
    differ = q != q_ref
    group = block[1]
    is_row_min = w == w.reshape(40, -1, group).amin(-1).repeat_interleave(group, dim=1)
    assert (differ <= is_row_min).all()
    assert ((q.int() - q_ref.int()).abs() <= 1).all()


def test_pack_int4_roundtrip_and_layout():
    torch.manual_seed(2)
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every value
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert torch.equal(quant.unpack_int4(packed), q)
    assert packed[0, 0].item() == (-8 + 8) | ((-7 + 8) << 4)  # column 0 low nibble, column 1 high
    with pytest.raises(ValueError, match="4-bit range"):
        quant.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="group_size 48 does not divide"):
        quant.QuantSpec(4, 48).groups(64)


# ---- layers and models -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantized_linear_forward_and_storage(spec):
    torch.manual_seed(3)
    linear = nn.Linear(128, 96)
    layer = quant.QuantizedLinear.from_linear(linear, spec)
    x = torch.randn(5, 128)
    w_hat = quant.fake_quantize(linear.weight, spec)
    torch.testing.assert_close(layer(x), F.linear(x, w_hat, linear.bias), rtol=0, atol=0)
    stored = layer.qweight.nbytes + layer.scales.nbytes
    assert layer.qweight.dtype == (torch.uint8 if spec.bits == 4 else torch.int8)
    assert stored / linear.weight.nbytes <= (0.30 if spec.bits == 8 else 0.20)


@pytest.mark.parametrize("spec,tol", [(quant.QuantSpec(8), 0.02), (quant.QuantSpec(4, 16), 0.3)], ids=str)
def test_quantized_model_close_to_fp32_and_exactly_its_dequantized_weights(spec, tol):
    model = small_model()
    ids = torch.randint(0, 512, (2, 24))
    ref = model(ids)
    # The same model with every linear weight replaced by dequantize(quantize(W)), as plain nn.Linear.
    emulated = copy.deepcopy(model)
    for layer in quant.linear_layers(emulated).values():
        with torch.no_grad():
            layer.weight.copy_(quant.fake_quantize(layer.weight, spec))
    q_model = quant.quantize_linears(copy.deepcopy(model), spec)
    assert all(isinstance(m, quant.QuantizedLinear) for m in quant.linear_layers(q_model).values())
    out = q_model(ids)
    torch.testing.assert_close(out, emulated(ids), rtol=1e-5, atol=1e-5)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < tol
    stored, fp32 = quant.linear_bytes(q_model)
    assert stored / fp32 <= (0.30 if spec.bits == 8 else 0.20)


def test_quantized_embedding_is_one_tied_matrix():
    model = small_model()
    spec = quant.QuantSpec(8)
    q_model = quant.quantize_embedding(copy.deepcopy(model), spec)
    emb = q_model.gpt.word_embedding
    w_hat = quant.fake_quantize(model.gpt.word_embedding.weight, spec)
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(emb(ids), w_hat[ids], rtol=0, atol=0)  # the input embedding
    torch.testing.assert_close(q_model.lm_head_weight, w_hat, rtol=0, atol=0)  # the output layer
    stored = emb.qweight.nbytes + emb.scales.nbytes
    assert stored / model.gpt.word_embedding.weight.nbytes <= 0.30


# ---- GPTQ --------------------------------------------------------------------------------------
def reference_gptq(W: torch.Tensor, H: torch.Tensor, spec: quant.QuantSpec, damp: float):
    """The GPTQ recursion as the paper states it (eqs. 2-4), without Cholesky or lazy batches:
    quantize column i, spread its error with the current inverse Hessian, eliminate column i."""
    W, H = W.clone().double(), H.clone().double()
    n, k = W.shape
    H.diagonal().add_(damp * torch.diag(H).mean())
    Hinv = torch.linalg.inv(H)
    group = spec.group_size or k
    Q, scales = torch.zeros(n, k, dtype=torch.int8), torch.zeros(n, k // group, dtype=torch.float64)
    qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    for i in range(k):
        if i % group == 0:
            scales[:, i // group] = W[:, i:i + group].abs().amax(1) / (2 ** (spec.bits - 1) - 0.5)
        s = scales[:, i // group]
        q = torch.round(W[:, i] / s).clamp(qmin, qmax)
        Q[:, i] = q.to(torch.int8)
        err = (W[:, i] - q * s) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q, scales


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("spec,block", [(quant.QuantSpec(4, 6), 8), (quant.QuantSpec(4, 6), 4),
                                        (quant.QuantSpec(8), 5), (quant.QuantSpec(4, 12), 24)], ids=str)
def test_gptq_matches_reference_recursion(spec, block):
    torch.manual_seed(4)
    W = torch.randn(8, 24, dtype=torch.float64)
    X = correlated_inputs(64, 24, seed=5).double()
    H = 2 * X.t() @ X / X.shape[0]
    Q, scales = quant.gptq_quantize_weight(W, H, spec, damp=0.01, block_size=block)
    Q_ref, scales_ref = reference_gptq(W, H, spec, damp=0.01)
    torch.testing.assert_close(scales, scales_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(Q, Q_ref)


@pytest.mark.parametrize("spec", [quant.QuantSpec(4, 16), quant.QuantSpec(8)], ids=str)
def test_gptq_beats_round_to_nearest_on_calibration_outputs(spec):
    torch.manual_seed(6)
    layer = nn.Linear(64, 48)
    X = correlated_inputs(512, 64, seed=7)
    acc = HessianAccumulator(64, torch.device("cpu"))
    acc.add(X.reshape(8, 64, 64))  # any leading shape
    torch.testing.assert_close(acc.hessian(), 2 * X.t() @ X / 512)
    q, scales = quant.gptq_quantize_weight(layer.weight, acc.hessian(), spec)
    w_gptq = quant.dequantize(q, scales)
    w_rtn = quant.fake_quantize(layer.weight.detach(), spec)
    err_gptq = (X @ (layer.weight - w_gptq).t()).pow(2).sum()
    err_rtn = (X @ (layer.weight - w_rtn).t()).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn
    assert (q.min() >= -(2 ** (spec.bits - 1))) and (q.max() <= 2 ** (spec.bits - 1) - 1)


def test_gptq_model_quantizes_every_layer_and_fits_calibration_better():
    model = small_model()
    calibration = torch.randint(0, 512, (16, 32))
    spec = quant.QuantSpec(4, 16)
    seen = []
    gptq = quant.gptq_quantize_model(copy.deepcopy(model), calibration, spec, batch_size=5, progress=seen.append)
    rtn = quant.quantize_linears(copy.deepcopy(model), spec)
    assert seen == list(quant.linear_layers(model))
    assert all(isinstance(m, quant.QuantizedLinear) for m in quant.linear_layers(gptq).values())
    assert gptq.gpt.quantization["algorithm"] == "gptq" and not gptq.training
    with torch.no_grad():
        ref = model.gpt.encode(calibration)
        err = {name: (m.gpt.encode(calibration) - ref).pow(2).sum() for name, m in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < err["rtn"]


def test_gptq_key_and_value_use_the_hessian_of_their_own_inputs():
    """q/k/v share one Hessian: it is the one each of them accumulates from its own inputs."""
    model = small_model()
    calibration = torch.randint(0, 512, (6, 16))
    spec = quant.QuantSpec(4, 16)
    attention = model.gpt.gpt_layers[0].self_attention
    own = {name: HessianAccumulator(getattr(attention, name).in_features, torch.device("cpu")) for name in ("key", "value")}
    handles = [getattr(attention, name).register_forward_hook(lambda m, a, o, acc=acc: acc.add(a[0]))
               for name, acc in own.items()]
    with torch.no_grad():
        for batch in calibration.split(8):
            model.gpt.encode(batch)
    for h in handles:
        h.remove()
    quantized = quant.gptq_quantize_model(copy.deepcopy(model), calibration, spec)
    for name, acc in own.items():
        q, scales = quant.gptq_quantize_weight(getattr(attention, name).weight, acc.hessian(), spec)
        layer = getattr(quantized.gpt.gpt_layers[0].self_attention, name)
        assert torch.equal(layer.integers(), q) and torch.equal(layer.scales, scales)


# ---- quantized checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8", "int4", "gptq", "int4+embedding"])
def test_save_load_roundtrip_identical_logits(method, tmp_path, tokenizer_dir):
    model = small_model()
    spec = quant.QuantSpec(8) if method == "int8" else quant.QuantSpec(4, 16)
    if method == "gptq":
        quant.gptq_quantize_model(model, torch.randint(0, 512, (4, 16)), spec)
    else:
        quant.quantize_linears(model, spec)
    if method.endswith("embedding"):
        quant.quantize_embedding(model, quant.QuantSpec(8))
    quant.save_quantized(model, tmp_path / "q", tokenizer_dir)
    assert (tmp_path / "q" / "vocab.json").is_file() and not (tmp_path / "q" / "model.safetensors").exists()
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert (meta["bits"], meta["group_size"]) == (spec.bits, spec.group_size)
    loaded = GPT2LMHeadModel.from_name_or_path(str(tmp_path / "q"))
    assert loaded.gpt.quantization == model.gpt.quantization
    ids = torch.randint(0, 512, (2, 20))
    assert torch.equal(loaded(ids), model(ids))
    backbone = GPT2Model.from_pretrained(str(tmp_path / "q"))
    assert torch.equal(backbone(ids)["last_hidden_state"], model.gpt(ids)["last_hidden_state"])
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    # save_pretrained of a quantized model writes the same format, which loads again.
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(GPT2LMHeadModel.from_pretrained(str(tmp_path / "again"))(ids), model(ids))


def test_load_refuses_a_weights_file_that_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    model = quant.quantize_linears(small_model(), quant.QuantSpec(4, 16))
    quant.save_quantized(model, tmp_path / "q")
    weights = tmp_path / "q" / "quantized_model.safetensors"
    state = load_file(str(weights))
    state["gpt_layers.0.interm_dense.qweight"] = state["gpt_layers.0.interm_dense.qweight"].to(torch.int8)
    del state["gpt_layers.1.out_dense.scales"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing gpt_layers\.1\.out_dense\.scales.*interm_dense\.qweight: file"):
        GPT2LMHeadModel.from_pretrained(str(tmp_path / "q"))
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    (tmp_path / "q" / "quantization.json").write_text(json.dumps({**meta, "bits": 3}))
    with pytest.raises(ValueError, match="bits 3, expected 4 or 8"):
        GPT2LMHeadModel.from_pretrained(str(tmp_path / "q"))


# ---- quantization-aware training ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fake_quant_forward_and_straight_through_gradient(mode):
    spec = quant.qat_spec(mode, group_size=16)
    torch.manual_seed(8)
    linear = nn.Linear(64, 32)
    weight = linear.weight
    fq = quant.FakeQuantLinear.from_linear(linear, spec)
    assert fq.weight is weight and isinstance(fq, nn.Linear)
    x = torch.randn(6, 64)
    w_hat = quant.fake_quantize(weight.detach(), spec)
    out = fq(x)
    torch.testing.assert_close(out, F.linear(x, w_hat, linear.bias), rtol=0, atol=0)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    # Straight through: dL/dW is dL/dW_hat, i.e. upstream^T x, as if W_hat were W.
    torch.testing.assert_close(weight.grad, upstream.t() @ x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fq.bias.grad, upstream.sum(0), rtol=1e-6, atol=1e-6)


def test_prepare_and_convert_qat(tmp_path):
    model = small_model()
    params = {id(p) for p in model.parameters()}
    spec = quant.qat_spec("int4", group_size=16)
    quant.prepare_qat(model, spec)
    assert {id(p) for p in model.parameters()} == params  # an optimiser built before keeps working
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 512, (2, 16))
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        fake = model(ids)
    model.save_pretrained(tmp_path / "qat")  # plain HF checkpoint of the latent weights
    reloaded = quant.quantize_linears(GPT2LMHeadModel.from_pretrained(str(tmp_path / "qat")).eval(), spec)
    converted = quant.convert_qat(model)
    assert all(isinstance(m, quant.QuantizedLinear) for m in quant.linear_layers(converted).values())
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), fake, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(reloaded(ids), fake, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="plain nn.Linear"):
        quant.prepare_qat(converted, spec)
    with pytest.raises(ValueError, match="qat must be one of"):
        quant.qat_spec("int2")


def test_group_scales_of_zero_group_are_positive():
    scales = group_scales(torch.zeros(2, 8), quant.QuantSpec(4, 4))
    assert (scales > 0).all()
    q, s = quant.quantize(torch.zeros(2, 8), quant.QuantSpec(4, 4))
    assert torch.equal(quant.dequantize(q, s), torch.zeros(2, 8))
