"""End-to-end runs of classifier.py, paraphrase_detection.py and sonnet_generation.py with the tiny model
on small synthetic files in the exact CS224N layouts; learnability; exact resume."""
from __future__ import annotations

import random

import pytest

from common.errors import ConfigError, UserError
import torch

from cs224n_files import keyword_sentiment, quora_pairs, sonnet_text, write_quora, write_sentiment, write_sonnets
from starter import assert_starter_layout
from tasks.data import NO_TOKEN_ID, PARAPHRASE_HEADER, SENTIMENT_HEADER, YES_TOKEN_ID, read_predictions

FAST = ["--model_size", "tiny", "--no_progress", "--batch_size", "8"]


def sentiment_files(d, name, num_labels, n_train, n_dev, n_test, seed=0):
    out = []
    for split, n, test in (("train", n_train, False), ("dev", n_dev, False), ("test", n_test, True)):
        rows = keyword_sentiment(n, seed + len(out), num_labels)
        out += [f"--{name}_{split}", str(write_sentiment(d / f"ids-{name}-{split}.csv", rows, test=test))]
    return out


def classifier_args(tmp_path, tokenizer_dir, *extra):
    return [*FAST, "--tokenizer", str(tokenizer_dir), "--predictions_dir", str(tmp_path / "pred"),
            "--run_dir", str(tmp_path / "run"), *extra]


def test_classifier_end_to_end_both_datasets(tmp_path, tokenizer_dir):
    import classifier

    files = sentiment_files(tmp_path, "sst", 5, 16, 9, 7) + sentiment_files(tmp_path, "cfimdb", 2, 16, 6, 5, seed=10)
    results = classifier.main(classifier_args(tmp_path, tokenizer_dir, "--epochs", "1", *files))
    assert set(results) == {"sst", "cfimdb"} and 0 <= results["sst"]["accuracy"] <= 1
    for name, n_dev, n_test, labels in (("sst", 9, 7, range(5)), ("cfimdb", 6, 5, range(2))):
        for split, n in (("dev", n_dev), ("test", n_test)):
            path = tmp_path / "pred" / f"last-linear-layer-{name}-{split}-out.csv"
            assert path.read_text().startswith("id \t Predicted_Sentiment \n")
            rows = read_predictions(path, SENTIMENT_HEADER, labels)
            src = files[files.index(f"--{name}_{split}") + 1]
            assert [r[0] for r in rows] == [line.split("\t")[1 if split == "dev" else 2]
                                            for line in open(src).read().splitlines()[1:]]
            assert len(rows) == n
            assert_starter_layout(path, tmp_path)
    assert (tmp_path / "run" / "sst" / "metrics.jsonl").is_file()
    assert (tmp_path / "run" / "cfimdb" / "best.pt").is_file()


def test_classifier_learns_a_keyword_task(tmp_path, tokenizer_dir):
    """Label = which keyword the short text holds; the tiny model must reach > 90 % dev accuracy."""
    import classifier

    files = sentiment_files(tmp_path, "cfimdb", 2, 96, 48, 4, seed=3)
    results = classifier.main(classifier_args(tmp_path, tokenizer_dir, "--datasets", "cfimdb", "--fine-tune-mode",
                                              "full-model", "--lr", "2e-3", "--epochs", "4", "--warmup_ratio", "0",
                                              "--hidden_dropout_prob", "0.0", *files))
    assert results["cfimdb"]["accuracy"] > 0.9


def test_resume_gives_the_uninterrupted_result(tmp_path, tokenizer_dir):
    import classifier

    files = sentiment_files(tmp_path, "cfimdb", 2, 24, 8, 6, seed=5)
    common = ["--datasets", "cfimdb", "--fine-tune-mode", "full-model", "--lr", "1e-3", "--epochs", "2", *files]
    full = classifier.main(classifier_args(tmp_path / "a", tokenizer_dir, *common))
    assert classifier.main(classifier_args(tmp_path / "b", tokenizer_dir, *common, "--stop_after_epoch", "1")) == {}
    assert not (tmp_path / "b" / "pred").exists()
    with pytest.raises(UserError, match="--lr: saved 0.001, now 0.002"):
        classifier.main(classifier_args(tmp_path / "b", tokenizer_dir, *common, "--lr", "2e-3",
                                        "--resume", str(tmp_path / "b" / "run")))
    resumed = classifier.main(classifier_args(tmp_path / "b", tokenizer_dir, *common, "--resume", str(tmp_path / "b" / "run")))
    assert resumed == full
    for split in ("dev", "test"):
        name = f"full-model-cfimdb-{split}-out.csv"
        assert (tmp_path / "a" / "pred" / name).read_bytes() == (tmp_path / "b" / "pred" / name).read_bytes()
    for ckpt in ("best.pt", "last.pt"):
        a = torch.load(tmp_path / "a" / "run" / "cfimdb" / ckpt, weights_only=True)["model"]
        b = torch.load(tmp_path / "b" / "run" / "cfimdb" / ckpt, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    events = [line for line in open(tmp_path / "b" / "run" / "cfimdb" / "metrics.jsonl")]
    assert any('"event": "resume"' in e for e in events)


def test_paraphrase_end_to_end(tmp_path, tokenizer_dir):
    import paraphrase_detection as para

    train = write_quora(tmp_path / "train.csv", quora_pairs(16, 1), header=False)  # quora-train-pre-left layout
    dev = write_quora(tmp_path / "dev.csv", quora_pairs(10, 2))
    test = write_quora(tmp_path / "test.csv", quora_pairs(7, 3), labels=False)
    out_dev, out_test = tmp_path / "p" / "para-dev-output.csv", tmp_path / "p" / "para-test-output.csv"
    metrics = para.main([*FAST, "--tokenizer", str(tokenizer_dir), "--epochs", "1", "--run_dir", str(tmp_path / "run"),
                         "--para_train", str(train), "--para_dev", str(dev), "--para_test", str(test),
                         "--para_dev_out", str(out_dev), "--para_test_out", str(out_test)])
    assert set(metrics) == {"accuracy", "f1"}
    for path, n, pairs in ((out_dev, 10, quora_pairs(10, 2)), (out_test, 7, quora_pairs(7, 3))):
        rows = read_predictions(path, PARAPHRASE_HEADER, (YES_TOKEN_ID, NO_TOKEN_ID))
        assert [r[0] for r in rows] == [p[0] for p in pairs] and len(rows) == n
        assert_starter_layout(path, tmp_path)


def test_paraphrase_prompt_and_truncation(tokenizer_dir):
    from models.tokenizer import load_tokenizer
    from tasks.paraphrase import encode_pairs

    tok = load_tokenizer(str(tokenizer_dir))
    [full], n = encode_pairs(tok, [("Is it red?", "Is it blue?")], 1024)
    assert n == 0 and tok.decode(full).endswith('Question 2: "Is it blue?"\nAre these two questions asking the same thing? Answer yes or no.\n')
    assert tok.decode(full + [YES_TOKEN_ID]).endswith("\nyes") and tok.decode([NO_TOKEN_ID]) == "no"
    long = " ".join(["word"] * 100)
    [cut], n = encode_pairs(tok, [(long, "Short?")], 60)
    text = tok.decode(cut)
    assert n == 1 and len(cut) == 60 and text.endswith('"Short?"\nAre these two questions asking the same thing? Answer yes or no.\n')


def test_sonnet_end_to_end(tmp_path, tokenizer_dir):
    import sonnet_generation as sg
    from tasks.sonnets import read_generated_sonnets

    rng = random.Random(0)
    train = write_sonnets(tmp_path / "sonnets.txt", [(i, sonnet_text(rng)) for i in range(1, 7)])
    gold = {n: sonnet_text(rng) for n in (132, 133, 134)}
    gold_path = write_sonnets(tmp_path / "TRUE_dev.txt", list(gold.items()))
    dev = write_sonnets(tmp_path / "dev.txt", [(n, "\n".join(t.split("\n")[:3])) for n, t in gold.items()])
    test_prompts = [(n, "\n".join(sonnet_text(rng, 3).split("\n"))) for n in (145, 146)]
    test = write_sonnets(tmp_path / "test.txt", test_prompts)
    out, dev_out = tmp_path / "p" / "generated_sonnets.txt", tmp_path / "p" / "dev.txt"
    args = [*FAST, "--tokenizer", str(tokenizer_dir), "--epochs", "1", "--run_dir", str(tmp_path / "run"),
            "--sonnet_path", str(train), "--held_out_sonnet_path", str(test), "--held_out_dev_path", str(dev),
            "--gold_dev_path", str(gold_path), "--sonnet_out", str(out), "--sonnet_dev_out", str(dev_out),
            "--max_new_tokens", "12"]
    metrics = sg.main(args)
    assert metrics["loss"] > 0 and 0 <= metrics["chrf"] <= 100
    written = read_generated_sonnets(out)
    assert [n for n, _ in written] == [0, 1]  # the starter's 0-based index
    assert all(text.startswith(prompt) for (_, text), (_, prompt) in zip(written, test_prompts))
    assert out.read_text().startswith("--Generated Sonnets-- \n\n\n0\n")
    assert_starter_layout(out, tmp_path)
    assert [n for n, _ in read_generated_sonnets(dev_out)] == [0, 1, 2]
    # The same seed gives the same sonnets, also when the best epoch is chosen by dev loss.
    # The same seed gives the same sonnets (one epoch: the best epoch is the same whatever selects it).
    first = out.read_text()
    assert sg.main([*args, "--run_dir", str(tmp_path / "run2"), "--select_by", "loss"]) == metrics
    assert out.read_text() == first


def test_sonnet_decoding_flags():
    import sonnet_generation as sg
    from training.cli import generation_config

    assert generation_config(sg.parse_args(["--decoding", "top-k-p", "--top_k", "5"])).kwargs() == dict(
        repetition_penalty=1.0, no_repeat_ngram_size=0, do_sample=True, temperature=1.2, top_k=5, top_p=0.9)
    assert generation_config(sg.parse_args(["--decoding", "beam", "--num_beams", "3"])).kwargs()["num_beams"] == 3
    # Defaults where a decoding needs them; --num_beams with a sampling decoding is beam sampling.
    assert generation_config(sg.parse_args(["--decoding", "beam"])).kwargs()["num_beams"] == 4
    assert generation_config(sg.parse_args(["--decoding", "top-k"])).kwargs()["top_k"] == 50
    assert generation_config(sg.parse_args(["--num_beams", "2"])).kwargs() == dict(
        repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=2, do_sample=True, temperature=1.2, top_p=0.9)
    for bad, field in ((["--top_k", "5"], "top_k"), (["--decoding", "beam", "--num_beams", "1"], "num_beams"),
                       (["--decoding", "greedy", "--num_beams", "2"], "num_beams"), (["--num_beams", "0"], "num_beams"),
                       (["--top_p", "0"], "top_p"), (["--temperature", "nan"], "temperature"),
                       (["--max_new_tokens", "0"], "max_new_tokens")):
        with pytest.raises(ConfigError, match=f"^{field}"):
            generation_config(sg.parse_args(bad))


def test_classifier_truncation_keeps_the_end(tokenizer_dir):
    from tasks.sentiment import encode_texts
    from models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    [cut, short, empty], n = encode_texts(tok, ["one two three four five six seven eight nine ten", "hi", ""], 4)
    assert n == 1 and tok.decode(cut) == " seven eight nine ten" and tok.decode(short) == "hi"
    assert empty == [tok.eos_token_id]
