"""Exports for transformers' real clients: `save_pretrained` and `--export_hf DIR` write a directory that
AutoModelForCausalLM + AutoTokenizer + pipeline load and that decodes greedily to the same tokens as our
generate(); LoRA runs also write peft's adapter format, which PeftModel.from_pretrained restores; a
sparse-attention model records its pattern and is not exported dense without being told."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers

from common.errors import ConfigError
from config import GPT2Config
from cs224n_files import quora_pairs, write_quora
from models import GPT2LMHeadModel, GPT2Model
from models.hf_export import ADAPTER_DIR
from models.tokenizer import load_tokenizer

EXPORT_FILES = ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
                "vocab.json"]
PROMPT = "Shall I compare thee to a summer's day?"


def _ours_greedy(model, tok, n=12):
    ids = torch.tensor([tok(PROMPT).input_ids])
    with torch.no_grad():
        return model.eval().generate(ids, torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0].tolist()


def _check_transformers_clients(directory, expected_ids, n=12):
    """AutoTokenizer + AutoModelForCausalLM + pipeline on `directory` alone, greedy, == expected_ids."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert tok(PROMPT).input_ids == expected_ids[:len(tok(PROMPT).input_ids)] and tok.pad_token_id == 50256
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=n, do_sample=False)
    assert out[0].tolist() == expected_ids
    pipe = transformers.pipeline("text-generation", model=str(directory), device="cpu")
    text = pipe(PROMPT, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(expected_ids) and len(text) > len(PROMPT)  # not the prompt returned unchanged


def test_save_pretrained_is_a_complete_transformers_directory(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(GPT2Config.from_name("tiny")).eval()
    tok = load_tokenizer(str(tokenizer_dir))
    ours.save_pretrained(tmp_path / "export", tokenizer=tok)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == EXPORT_FILES
    assert (tmp_path / "export" / "vocab.json").read_bytes() == (tokenizer_dir / "vocab.json").read_bytes()
    gen = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == 50256
    _check_transformers_clients(tmp_path / "export", _ours_greedy(ours, tok))
    assert load_tokenizer(None, str(tmp_path / "export"))("yes").input_ids == [8505]  # our loader reads it too
    ours.save_pretrained(tmp_path / "sampling", tokenizer=tok, generation={"do_sample": True, "top_p": 0.9})
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "sampling")
    assert gen.do_sample and gen.top_p == 0.9 and gen.eos_token_id == 50256


def test_export_never_replaces_a_foreign_directory(tmp_path, tokenizer_dir):
    model = GPT2Model(GPT2Config.from_name("tiny"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds notes.txt, which writing an export there would delete"):
        model.save_pretrained(tmp_path / "mine", tokenizer=str(tokenizer_dir))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    model.save_pretrained(tmp_path / "export", tokenizer=str(tokenizer_dir))
    model.save_pretrained(tmp_path / "export", tokenizer=str(tokenizer_dir))  # a previous export is replaced


def test_sparse_model_records_its_pattern_and_warns(tmp_path, tokenizer_dir):
    torch.manual_seed(1)
    ours = GPT2LMHeadModel(GPT2Config.from_name("tiny", attention="local", attention_window=4)).eval()
    with pytest.warns(UserWarning, match="transformers .* will run every layer DENSE"):
        ours.save_pretrained(tmp_path / "sparse", tokenizer=str(tokenizer_dir))
    saved = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert saved["sparse_attention"]["attention"] == "local" and saved["sparse_attention"]["attention_window"] == 4
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "sparse"))
    assert again.config.attention == "local" and again.config.attention_window == 4
    ids = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert torch.allclose(again(ids), ours(ids), atol=1e-5)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "sparse").eval()
        assert (hf(ids).logits - ours(ids)).abs().max() > 1e-3  # what the warning is about: dense there
    dense = GPT2LMHeadModel(GPT2Config.from_name("tiny"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense.save_pretrained(tmp_path / "dense", tokenizer=str(tokenizer_dir))


# ---- --export_hf on the training scripts ------------------------------------------------------------
def _para_args(tmp_path, tokenizer_dir, model_dir, *extra):
    train = write_quora(tmp_path / "train.csv", quora_pairs(12, 1))
    dev = write_quora(tmp_path / "dev.csv", quora_pairs(6, 2))
    test = write_quora(tmp_path / "test.csv", quora_pairs(4, 3), labels=False)
    return ["--model_size", str(model_dir), "--no_progress", "--batch_size", "4", "--tokenizer", str(tokenizer_dir),
            "--epochs", "1", "--lr", "1e-2", "--run_dir", str(tmp_path / "run"), "--para_train", str(train),
            "--para_dev", str(dev), "--para_test", str(test), "--para_dev_out", str(tmp_path / "p" / "dev.csv"),
            "--para_test_out", str(tmp_path / "p" / "test.csv"), *extra]


@pytest.mark.parametrize("merge", [False, True])
def test_lora_run_exports_merged_weights_and_a_peft_adapter(tmp_path, tokenizer_dir, tiny_hf_checkpoint, merge):
    """paraphrase_detection.py --peft lora --export_hf DIR [--merge_lora]: DIR decodes in transformers like
    the trained model; DIR/lora_adapter restores the adapters on the base model through peft."""
    from peft import PeftModel

    import paraphrase_detection as para
    from training.checkpoint import load_model

    base_dir = tiny_hf_checkpoint[0]
    export = tmp_path / "export"
    para.main(_para_args(tmp_path, tokenizer_dir, base_dir, "--peft", "lora", "--lora_r", "4", "--lora_targets", "all",
                         "--lora_dropout", "0", "--export_hf", str(export), *(["--merge_lora"] if merge else [])))
    assert sorted(p.name for p in export.iterdir()) == sorted([*EXPORT_FILES, ADAPTER_DIR])
    assert sorted(p.name for p in (export / ADAPTER_DIR).iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    trained = load_model(GPT2LMHeadModel, str(base_dir), tmp_path / "run")  # base + the run's adapters (best.pt)
    base = GPT2LMHeadModel.from_pretrained(str(base_dir))
    tok = load_tokenizer(str(tokenizer_dir))
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert (trained(ids) - base(ids)).abs().max() > 1e-4  # training changed the model
        restored = PeftModel.from_pretrained(copy.deepcopy(base), str(export / ADAPTER_DIR)).eval()
        assert (restored(ids) - trained(ids)).abs().max() < 1e-5
        merged = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        assert (merged(input_ids=ids).logits - trained(ids)).abs().max() < 1e-4
    _check_transformers_clients(export, _ours_greedy(trained, tok))


def test_export_flags_are_checked_before_training(tmp_path, tokenizer_dir, tiny_hf_checkpoint):
    import paraphrase_detection as para

    args = _para_args(tmp_path, tokenizer_dir, tiny_hf_checkpoint[0])
    with pytest.raises(ConfigError, match="local attention, which transformers does not have") as exc:
        para.main([*args, "--attention", "local", "--export_hf", str(tmp_path / "e")])
    assert exc.value.field == "export_hf"
    with pytest.raises(ConfigError) as exc:
        para.main([*args, "--export_allow_dense"])
    assert exc.value.field == "export_allow_dense"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "data.csv").write_text("x")
    with pytest.raises(ConfigError, match="already holds data.csv"):
        para.main([*args, "--export_hf", str(tmp_path / "taken")])
    assert not (tmp_path / "run").exists()  # nothing started


def test_sparse_checkpoint_is_refused_at_build_unless_allowed(tmp_path, tokenizer_dir):
    """A pattern that comes from a checkpoint's config.json (no --attention flag) is caught once the
    model is built, before training; --export_allow_dense exports it, warning."""
    import paraphrase_detection as para

    sparse_dir = tmp_path / "sparse-ckpt"
    with pytest.warns(UserWarning):
        GPT2LMHeadModel(GPT2Config.from_name("tiny", attention="local", attention_window=4)).save_pretrained(
            sparse_dir, tokenizer=str(tokenizer_dir))
    args = _para_args(tmp_path, tokenizer_dir, sparse_dir, "--export_hf", str(tmp_path / "e"))
    with pytest.raises(ConfigError, match="run every layer DENSE.*export_allow_dense"):
        para.main(args)
    assert not (tmp_path / "run" / "best.pt").exists()
    with pytest.warns(UserWarning, match="DENSE"):
        para.main([*args, "--export_allow_dense", "--run_dir", str(tmp_path / "run2")])
    assert json.loads((tmp_path / "e" / "config.json").read_text())["sparse_attention"]["attention"] == "local"


def test_classifier_exports_each_dataset_backbone(tmp_path, tokenizer_dir, tiny_hf_checkpoint, capsys):
    """classifier.py trains one model per dataset: DIR/sst, DIR/cfimdb; a second run may reuse DIR."""
    import classifier
    from cs224n_files import keyword_sentiment, write_sentiment
    from tasks.sentiment import GPT2SentimentClassifier
    from training.checkpoint import load_weights

    files = []
    for name, k in (("sst", 5), ("cfimdb", 2)):
        for split, test in (("train", False), ("dev", False), ("test", True)):
            rows = keyword_sentiment(8, len(name + split), k)
            files += [f"--{name}_{split}", str(write_sentiment(tmp_path / f"{name}-{split}.csv", rows, test=test))]
    args = ["--model_size", str(tiny_hf_checkpoint[0]), "--no_progress", "--tokenizer", str(tokenizer_dir),
            "--epochs", "1", "--fine-tune-mode", "full-model", "--lr", "1e-2", "--predictions_dir", str(tmp_path / "p"),
            "--export_hf", str(tmp_path / "export"), *files]
    classifier.main([*args, "--run_dir", str(tmp_path / "run")])
    assert capsys.readouterr().out.count("the task head stays in the run's best.pt") == 2
    for name, k in (("sst", 5), ("cfimdb", 2)):
        exported = GPT2Model.from_pretrained(str(tmp_path / "export" / name))
        clf = GPT2SentimentClassifier(GPT2Model.from_pretrained(str(tiny_hf_checkpoint[0])), k, 0.0)
        load_weights(clf, tmp_path / "run" / name)
        assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), clf.gpt.state_dict().values()))
    classifier.main([*args, "--run_dir", str(tmp_path / "run2"), "--datasets", "sst"])  # DIR holds sst/, cfimdb/
