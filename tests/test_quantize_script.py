"""quantize.py end to end on a tiny random checkpoint: the report, loadable models (perplexity.py,
generation, a task script's prediction step) and the flag checks."""
from __future__ import annotations

import json
import math

import pytest
import torch

import perplexity
import quantize
from models.gpt2 import GPT2LMHeadModel
from models.quant import QuantizedEmbedding, QuantizedLinear

TEXT = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building , and the tallest "
        "structure in Paris . Its base is square , measuring 125 metres on each side . ") * 12


@pytest.fixture(scope="module")
def quantized(tiny_hf_checkpoint, tokenizer_dir, tmp_path_factory):
    directory, _ = tiny_hf_checkpoint
    tmp = tmp_path_factory.mktemp("quantize")
    (tmp / "eval.txt").write_text(TEXT)
    (tmp / "calib.txt").write_text(TEXT[::-1])
    argv = ["--model", str(directory), "--methods", "int8", "int4", "gptq", "bf16", "--eval_corpus", str(tmp / "eval.txt"),
            "--max_tokens", "300", "--out", str(tmp / "out"), "--calib_corpus", str(tmp / "calib.txt"),
            "--calib_tokens", "256", "--group_size", "64", "--window", "64", "--speed_repeats", "1", "--speed_batch", "1"]
    report = quantize.main(argv)
    return tmp, report


def test_report_and_sizes(quantized):
    tmp, _ = quantized
    on_disk = json.loads((tmp / "out" / "report.json").read_text())
    assert on_disk["methods"].keys() == {"int8", "int4", "gptq", "bf16"}
    for method, row in on_disk["methods"].items():
        for key in ("linear_bytes", "linear_bytes_fp32", "ppl", "ppl_fp32", "tokens_per_s", "tokens_per_s_fp32"):
            assert math.isfinite(row[key]) and row[key] > 0, (method, key)
        assert row["linear_bytes_fp32"] == 2 * 4 * (4 * 64 * 64 + 2 * 64 * 256)  # 2 blocks, float32
        assert row["ppl_fp32"] == on_disk["fp32"]["ppl"]
    methods = on_disk["methods"]
    assert methods["int8"]["linear_ratio"] <= 0.30 and methods["int4"]["linear_ratio"] <= 0.20
    assert methods["gptq"]["linear_ratio"] == methods["int4"]["linear_ratio"]
    assert methods["bf16"]["linear_ratio"] == 0.5
    assert on_disk["scored_tokens"] == 299 and on_disk["calibration"]["blocks"] == [4, 64]


@pytest.mark.parametrize("method", ["int8", "gptq", "bf16"])
def test_saved_models_score_the_same_through_perplexity_py(quantized, method):
    tmp, report = quantized
    results = perplexity.main(["--model", str(tmp / "out" / method), "--text_file", str(tmp / "eval.txt"),
                               "--max_tokens", "300", "--window", "64", "--stride", "32"])
    ppl = next(iter(results[str(tmp / "out" / method)].values()))["perplexity"]
    expected = report["methods"][method]["ppl"]
    # bf16 is saved as a bf16 checkpoint but loads into float32 parameters (same values, fp32 compute).
    assert ppl == pytest.approx(expected, rel=1e-6 if method != "bf16" else 2e-2)


def test_quantized_model_generates_and_predicts(quantized):
    tmp, _ = quantized
    model = GPT2LMHeadModel.from_name_or_path(str(tmp / "out" / "int4")).eval()
    assert isinstance(model.gpt.gpt_layers[0].interm_dense, QuantizedLinear)
    prompt = torch.tensor([[464, 8765, 318]])
    cached = model.generate(prompt, max_new_tokens=6)
    ids = prompt
    for _ in range(6):  # uncached greedy decoding through the full forward
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_quantize_embedding_and_task_prediction(tiny_hf_checkpoint, tokenizer_dir, tmp_path):
    directory, _ = tiny_hf_checkpoint
    (tmp_path / "eval.txt").write_text(TEXT)
    report = quantize.main(["--model", str(directory), "--methods", "int8", "--eval_corpus", str(tmp_path / "eval.txt"),
                            "--max_tokens", "200", "--out", str(tmp_path / "out"), "--window", "64",
                            "--quantize_embedding", "--speed_repeats", "1", "--speed_batch", "1"])
    row = report["methods"]["int8"]
    assert row["quantization"]["embedding"] == {"bits": 8, "group_size": None}
    assert row["model_ratio"] < 0.3  # the embedding dominates the tiny model's bytes
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out" / "int8"))
    assert isinstance(model.gpt.word_embedding, QuantizedEmbedding)


@pytest.mark.parametrize("extra,message", [
    (["--methods", "int4", "--group_size", "48"], "--group_size 48 must divide"),
    (["--methods", "gptq", "--group_size", "64"], "--methods gptq needs --calib_corpus"),
    (["--methods", "int8", "--window", "4096"], "--window must be in"),
    (["--methods", "int8", "int8"], "--methods lists a method twice"),
    (["--methods", "int8", "--calib_corpus", "x.txt"], "--calib_corpus: only used by --methods gptq"),
    (["--methods", "int8", "--gptq_bits", "8", "--gptq_damp", "0.1"],
     "--gptq_bits, --gptq_damp: only used by --methods gptq"),
    (["--methods", "int8", "--group_size", "64"], "--group_size is only used by --methods int4"),
    (["--methods", "int8", "--max_tokens", "1"], "--max_tokens must be >= 2"),
])
def test_bad_flags_are_refused_before_any_work(tiny_hf_checkpoint, tmp_path, capsys, extra, message):
    directory, _ = tiny_hf_checkpoint
    (tmp_path / "eval.txt").write_text(TEXT)
    argv = ["--model", str(directory), "--eval_corpus", str(tmp_path / "eval.txt"), "--max_tokens", "100",
            "--out", str(tmp_path / "out")] + extra
    with pytest.raises(SystemExit):
        quantize.main(argv)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_an_already_quantized_model(quantized, tmp_path, capsys):
    tmp, _ = quantized
    with pytest.raises(SystemExit):
        quantize.main(["--model", str(tmp / "out" / "int8"), "--methods", "int8", "--eval_corpus", str(tmp / "eval.txt"),
                       "--max_tokens", "100", "--out", str(tmp_path / "o")])
    assert "is already quantized" in capsys.readouterr().err


# ---- --qat through the shared trainer ---------------------------------------------------------
def test_pretrain_with_qat_trains_fake_quantized_resumes_and_saves_the_quantized_model(tmp_path, tokenizer_dir):
    """`--qat int4` on a training script: the block linears compute with fake-quantized weights, the run
    resumes exactly, and pretrain.py also writes the quantized model, whose logits are the fake-quantized
    model's (the weights training computed with)."""
    import pretrain
    from common.errors import UserError
    from models.quant import FakeQuantLinear

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 4)
    common = ["--model_size", "tiny", "--corpus", str(corpus), "--tokenizer", str(tokenizer_dir), "--max_length", "32",
              "--epochs", "2", "--batch_size", "4", "--limit", "4", "--lr", "1e-3", "--no_progress",
              "--qat", "int4", "--qat_group_size", "32"]
    full = pretrain.main([*common, "--run_dir", str(tmp_path / "a")])
    assert pretrain.main([*common, "--run_dir", str(tmp_path / "b"), "--stop_after_epoch", "1"])["interrupted"]
    resumed = pretrain.main([*common, "--run_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b")])
    assert resumed["best"] == full["best"]
    fake = GPT2LMHeadModel.from_pretrained(str(full["model_dir"]))  # the latent fp32 weights
    from models.quant.qat import prepare_qat, qat_spec

    prepare_qat(fake, qat_spec("int4", 32))
    assert isinstance(fake.gpt.gpt_layers[0].interm_dense, FakeQuantLinear)
    quantized = GPT2LMHeadModel.from_pretrained(str(full["quantized_dir"]))
    assert isinstance(quantized.gpt.gpt_layers[0].interm_dense, QuantizedLinear)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in full["quantized_dir"].iterdir()}
    ids = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(quantized(ids), fake.eval()(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="qat_group_size"):  # 48 divides no width of the tiny model
        pretrain.main([*common[:-2], "--qat_group_size", "48", "--run_dir", str(tmp_path / "c")])
    with pytest.raises(UserError, match="^peft: lora on a quantized model"):
        pretrain.main(["--model_size", str(full["quantized_dir"]), "--corpus", str(corpus), "--tokenizer",
                       str(tokenizer_dir), "--max_length", "32", "--limit", "4", "--no_progress", "--peft", "lora",
                       "--run_dir", str(tmp_path / "d")])
