"""pretrain.py end to end on a tiny random GPT-2: it trains, reports per-epoch perplexity, and the
saved HF directory holds exactly the trained (best-epoch) weights, loadable as --model_size DIR."""
from __future__ import annotations

import argparse
import csv

import pytest

from common.errors import UserError
from training.config import ModelConfig
import torch

from models.gpt2 import GPT2LMHeadModel


@pytest.fixture()
def poems_csv(tmp_path):
    path = tmp_path / "PoetryFoundationData.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "Title", "Poem", "Poet", "Tags"])
        for i in range(12):
            w.writerow([i, f"T{i}", f"\r\r\nThe rose is red, the sky is blue,\r\r\nand poem {i} is true.\r\r\n", "P", ""])
        w.writerow([12, "blank", "  \r\r\n ", "P", ""])
    return path


def test_pretrain_end_to_end_saves_trained_weights(poems_csv, tmp_path, tokenizer_dir, monkeypatch, capsys):
    import pretrain
    from training.build import build_model, seed_everything

    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    run_dir = tmp_path / "run"
    out = pretrain.main(["--model_size", "tiny", "--corpus", str(poems_csv), "--max_length", "16", "--epochs", "2",
                         "--batch_size", "2", "--limit", "4", "--lr", "1e-2", "--warmup_ratio", "0",
                         "--run_dir", str(run_dir), "--no_progress", "--seed", "5"])
    printed = capsys.readouterr().out
    assert "| epoch | train loss | train ppl | valid loss | valid ppl |" in printed
    assert "train: 11 documents" in printed and "valid: 1 documents" in printed  # 12 poems: blank one dropped
    assert len(out["epochs"]) == 2

    model_dir = out["model_dir"]
    assert (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file()
    reloaded = build_model(GPT2LMHeadModel, ModelConfig(model_size=str(model_dir))).eval()
    best = GPT2LMHeadModel.from_name_or_path("tiny").eval()
    best.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True)["model"])
    seed_everything(5)
    initial = GPT2LMHeadModel.from_name_or_path("tiny").eval()  # what pretrain.py started from

    ids = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids), best(ids), atol=1e-5)
        assert not torch.allclose(reloaded(ids), initial(ids), atol=1e-3)  # training changed the weights
    assert out["best"]["valid_ppl"] < 50257 * 0.9  # learned something in 4 steps


def test_pretrain_rejects_missing_corpus(tmp_path):
    import pretrain

    with pytest.raises(UserError, match="--corpus .*nope.txt: no such file"):
        pretrain.parse_args(["--corpus", str(tmp_path / "nope.txt")])


def test_init_checkpoint_starts_task_scripts_from_the_saved_weights(tmp_path):
    """`--init_checkpoint DIR` (what pretrain.py prints) makes every script build its model from DIR."""
    from training.build import build_model
    from training.cli import add_common_args, check_common_args

    torch.manual_seed(7)
    saved = GPT2LMHeadModel.from_name_or_path("tiny")
    saved.save_pretrained(tmp_path / "model")
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model_size", "gpt2", "--init_checkpoint", str(tmp_path / "model")])
    model = build_model(GPT2LMHeadModel, check_common_args(args).model)
    for (name, a), b in zip(saved.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="--init_checkpoint: .*config.json"):
        check_common_args(parser.parse_args(["--init_checkpoint", str(tmp_path)]))
    with pytest.raises(UserError, match="random_init"):
        check_common_args(parser.parse_args(["--init_checkpoint", str(tmp_path / "model"), "--random_init"]))


def test_pretrain_with_lora_saves_the_merged_model(poems_csv, tmp_path, tokenizer_dir, monkeypatch):
    """RUN_DIR/model of a LoRA run is a complete model: the trained adapters merged into the weights."""
    import pretrain
    from training.build import build_model, seed_everything
    from training.checkpoint import load_model

    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    run_dir = tmp_path / "run"
    out = pretrain.main(["--model_size", "tiny", "--corpus", str(poems_csv), "--max_length", "16", "--epochs", "1",
                         "--batch_size", "2", "--limit", "4", "--lr", "1e-2", "--warmup_ratio", "0", "--peft", "lora",
                         "--lora_dropout", "0", "--run_dir", str(run_dir), "--no_progress", "--seed", "5"])
    merged = build_model(GPT2LMHeadModel, ModelConfig(model_size=str(out["model_dir"]))).eval()
    seed_everything(5)  # the run's random tiny base, then the adapters of best.pt on it
    adapted = load_model(GPT2LMHeadModel, "tiny", run_dir).eval()
    ids = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        assert torch.allclose(merged(ids), adapted(ids), atol=1e-5)
        assert not torch.allclose(merged(ids), GPT2LMHeadModel.from_name_or_path("tiny").eval()(ids), atol=1e-4)


def test_pretrain_refuses_qat_with_lora(tmp_path, poems_csv):
    import pretrain

    with pytest.raises(UserError, match="--qat int8 with --peft lora"):
        pretrain.parse_args(["--corpus", str(poems_csv), "--qat", "int8", "--peft", "lora"])
