"""Tiny end-to-end runs of distill.py (LM and paraphrase tasks), exact resume with the critic, errors."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from common.errors import UserError
from cs224n_files import quora_pairs, write_quora
from models.gpt2 import GPT2LMHeadModel
from training.checkpoint import load



def distill_script():
    import distill

    return distill


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran in the park while birds sang over green hills".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)))
    return path


def lm_args(tmp_path, tokenizer_dir, corpus, run, *extra):
    return ["--task", "lm", "--teacher", "tiny", "--train_file", str(corpus), "--tokenizer", str(tokenizer_dir),
            "--block_size", "16", "--batch_size", "4", "--limit", "8", "--no_progress", "--lr", "1e-3",
            "--run_dir", str(tmp_path / run), *extra]


def test_lm_distillation_end_to_end_all_losses(tmp_path, tokenizer_dir, corpus):
    report = distill_script().main(lm_args(tmp_path, tokenizer_dir, corpus, "run", "--student_layers", "1",
                                           "--init_every_k", "2", "--kl_weight", "1", "--mse_weight", "1",
                                           "--wd_weight", "0.1", "--critic_hidden", "16"))
    rows = report["rows"]
    assert set(rows) == {"teacher", "student"} and report["metric"] == "perplexity"
    assert rows["student"]["layers"] == 1 and rows["teacher"]["layers"] == 2
    assert rows["student"]["parameters"] < rows["teacher"]["parameters"]
    assert all(r["perplexity"] > 1 and r["eval_tokens_per_s"] > 0 for r in rows.values())
    assert report["layer_map"] == [1]
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == report
    saved = GPT2LMHeadModel.from_pretrained(str(tmp_path / "run" / "student"))
    assert saved.config.num_hidden_layers == 1
    (critic,) = load(tmp_path / "run" / "last.pt")["callbacks"]  # inside the run's checkpoint, not beside it
    assert critic["layer_map"] == [1] and "critics.0.net.0.weight" in critic["critics"]
    assert not (tmp_path / "run" / "critic.pt").exists()


def test_lm_resume_continues_student_and_critic_exactly(tmp_path, tokenizer_dir, corpus):
    script = distill_script()
    common = ("--student_layers", "1", "--student_hidden", "32", "--wd_weight", "1", "--kl_weight", "1",
              "--critic_hidden", "16", "--epochs", "2", "--limit", "4")
    full = script.main(lm_args(tmp_path, tokenizer_dir, corpus, "full", *common))
    assert script.main(lm_args(tmp_path, tokenizer_dir, corpus, "cut", *common, "--stop_after_epoch", "1")) is None
    resumed = script.main(lm_args(tmp_path, tokenizer_dir, corpus, "cut", *common, "--resume", str(tmp_path / "cut")))
    assert resumed["rows"]["student"]["perplexity"] == pytest.approx(full["rows"]["student"]["perplexity"], rel=1e-6)
    a, b = (load(tmp_path / run / "last.pt")["callbacks"][0] for run in ("full", "cut"))
    assert all(torch.allclose(a["critics"][k], b["critics"][k], atol=1e-6) for k in a["critics"])


def test_para_distillation_with_projection(tmp_path, tokenizer_dir):
    train = write_quora(tmp_path / "train.csv", quora_pairs(12, 1))
    dev = write_quora(tmp_path / "dev.csv", quora_pairs(8, 2))
    report = distill_script().main(["--task", "para", "--teacher", "tiny", "--tokenizer", str(tokenizer_dir),
                                    "--para_train", str(train), "--para_dev", str(dev), "--student_layers", "1",
                                    "--student_hidden", "32", "--kl_weight", "1", "--mse_weight", "1",
                                    "--batch_size", "4", "--max_length", "64", "--no_progress",
                                    "--run_dir", str(tmp_path / "run")])
    assert report["metric"] == "accuracy" and 0 <= report["rows"]["student"]["accuracy"] <= 1
    assert report["rows"]["student"]["hidden"] == 32


def test_errors_name_the_flag(tmp_path, tokenizer_dir, corpus, capsys):
    from training.cli import entry_point

    script = distill_script()
    with pytest.raises(SystemExit) as exit_info:
        entry_point(script.main)(lm_args(tmp_path, tokenizer_dir, corpus, "a", "--student_hidden", "32",
                                         "--init_every_k", "2"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"error: --init_every_k: 2: .*hidden_size", err) and "Traceback" not in err and "\n" not in err
    with pytest.raises(UserError, match="--teacher is needed"):
        script.main(["--task", "lm", "--train_file", str(corpus), "--kl_weight", "1", "--model_size", "tiny"])
    with pytest.raises(UserError, match="layer_map"):
        script.main(lm_args(tmp_path, tokenizer_dir, corpus, "b", "--student_layers", "1", "--layer_map", "0,1",
                            "--mse_weight", "1"))
