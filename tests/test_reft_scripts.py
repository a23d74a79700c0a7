"""`--peft reft` from every training script: adapter-only checkpoints, exact resume, and the one
loader (training.checkpoint.load_model) turning a ReFT run back into a model that predicts."""
from __future__ import annotations


import torch

from cs224n_files import keyword_sentiment, quora_pairs, write_quora, write_sentiment, sonnet_task_files

FAST = ["--model_size", "tiny", "--no_progress", "--batch_size", "4", "--peft", "reft", "--reft_rank", "2"]


def adapter(path):
    return torch.load(path, weights_only=True)["model"]


def only_interventions(ckpt, heads=()):
    return ckpt["format"] == "reft-adapter" and ckpt["tensors"] and all(
        ".reft." in k or k.startswith(tuple(f"{h}." for h in heads)) for k in ckpt["tensors"])


def test_classifier_reft_with_soap_resumes_exactly(tmp_path, tokenizer_dir):
    import classifier

    files = []
    for split, n, test in (("train", 8, False), ("dev", 6, False), ("test", 5, True)):
        path = write_sentiment(tmp_path / f"{split}.csv", keyword_sentiment(n, len(files)), test=test)
        files += [f"--cfimdb_{split}", str(path)]
    common = [*FAST, "--tokenizer", str(tokenizer_dir), "--datasets", "cfimdb", "--fine-tune-mode", "full-model",
              "--epochs", "2", "--limit", "8", "--lr", "1e-2", "--reft_positions", "l2", "--reft_layers", "odd",
              "--optimizer", "soap", "--precondition_frequency", "1", *files]  # R, W: preconditioned, in the checkpoint

    def run(name, *extra):
        return classifier.main([*common, "--run_dir", str(tmp_path / name / "run"),
                                "--predictions_dir", str(tmp_path / name / "pred"), *extra])

    full = run("a")
    ckpt = adapter(tmp_path / "a" / "run" / "cfimdb" / "best.pt")
    assert only_interventions(ckpt, ["classifier_head"]) and ckpt["reft"]["layers"] == "odd"
    assert run("b", "--stop_after_epoch", "1") == {}
    assert run("b", "--resume", str(tmp_path / "b" / "run")) == full
    last = [adapter(tmp_path / r / "run" / "cfimdb" / "last.pt")["tensors"] for r in ("a", "b")]
    assert last[0].keys() == last[1].keys() and all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    for split in ("dev", "test"):
        name = f"full-model-cfimdb-{split}-out.csv"
        assert (tmp_path / "a" / "pred" / name).read_bytes() == (tmp_path / "b" / "pred" / name).read_bytes()


def test_paraphrase_reft_run_loads_back_for_prediction(tmp_path, tokenizer_dir):
    import paraphrase_detection as para
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from tasks.data import read_paraphrase, read_predictions, PARAPHRASE_HEADER, YES_TOKEN_ID, NO_TOKEN_ID
    from tasks.paraphrase import LABEL_TOKENS, encode_pairs, two_way_logits
    from training.batching import pad_right
    from training.build import seed_everything
    from training.checkpoint import load_model

    train = write_quora(tmp_path / "train.csv", quora_pairs(8, 1), header=False)
    dev = write_quora(tmp_path / "dev.csv", quora_pairs(6, 2))
    test = write_quora(tmp_path / "test.csv", quora_pairs(5, 3), labels=False)
    out_dev = tmp_path / "p" / "dev.csv"
    para.main([*FAST, "--tokenizer", str(tokenizer_dir), "--epochs", "1", "--lr", "1e-2", "--run_dir",
               str(tmp_path / "run"), "--para_train", str(train), "--para_dev", str(dev), "--para_test", str(test),
               "--para_dev_out", str(out_dev), "--para_test_out", str(tmp_path / "p" / "test.csv"),
               "--seed", "3", "--reft_positions", "f1+l3"])
    assert only_interventions(adapter(tmp_path / "run" / "best.pt"))
    seed_everything(3)  # the tiny preset is random: the same seed rebuilds the run's frozen base
    model = load_model(GPT2LMHeadModel, "tiny", tmp_path / "run")
    tok = load_tokenizer(str(tokenizer_dir))
    pairs = read_paraphrase(str(dev), labeled=True)
    seqs, _ = encode_pairs(tok, [(e.sentence1, e.sentence2) for e in pairs], 1024)
    ids, mask = pad_right(seqs, tok.eos_token_id)
    with torch.no_grad():
        tokens = LABEL_TOKENS[two_way_logits(model, ids, mask).argmax(-1)].tolist()
    written = read_predictions(out_dev, PARAPHRASE_HEADER, (YES_TOKEN_ID, NO_TOKEN_ID))
    assert [int(r[1]) for r in written] == tokens
    seed_everything(3)
    base = load_model(GPT2LMHeadModel, "tiny")  # the same frozen base without the trained interventions
    with torch.no_grad():
        assert (two_way_logits(model, ids, mask) - two_way_logits(base, ids, mask)).abs().max() > 1e-4


def test_sonnet_reft_trains_and_generates(tmp_path, tokenizer_dir):
    import sonnet_generation as sg
    from tasks.sonnets import read_generated_sonnets

    f = sonnet_task_files(tmp_path)
    train, dev, gold_path, test = f["train"], f["dev"], f["gold_path"], f["test"]
    out = tmp_path / "p" / "generated.txt"
    sg.main([*FAST, "--tokenizer", str(tokenizer_dir), "--epochs", "1", "--limit", "8", "--run_dir",
             str(tmp_path / "run"), "--sonnet_path", str(train), "--held_out_sonnet_path", str(test),
             "--held_out_dev_path", str(dev), "--gold_dev_path", str(gold_path), "--sonnet_out", str(out),
             "--sonnet_dev_out", str(tmp_path / "p" / "dev.txt"), "--max_new_tokens", "8", "--reft_positions", "f4"])
    assert [n for n, _ in read_generated_sonnets(out)] == [0]  # numbered by position, as the starter writes
    assert only_interventions(adapter(tmp_path / "run" / "best.pt"))


def test_pretrain_reft_resumes_exactly(tmp_path, tokenizer_dir, monkeypatch):
    import pretrain

    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the rose is red and line {i} is true" for i in range(60)) + "\n")
    common = ["--model_size", "tiny", "--corpus", str(corpus), "--max_length", "16", "--epochs", "2",
              "--batch_size", "2", "--limit", "4", "--lr", "1e-2", "--no_progress", "--peft", "reft",
              "--reft_positions", "all", "--reft_layers", "1"]
    full = pretrain.main([*common, "--run_dir", str(tmp_path / "a")])
    assert pretrain.main([*common, "--run_dir", str(tmp_path / "b"), "--stop_after_epoch", "1"])["interrupted"]
    resumed = pretrain.main([*common, "--resume", str(tmp_path / "b")])
    assert resumed["best"] == full["best"]
    last = [adapter(tmp_path / r / "last.pt") for r in ("a", "b")]
    assert only_interventions(last[0]) and set(last[0]["tensors"]) == {
        "gpt.gpt_layers.1.reft.rotation.parametrizations.weight.original", "gpt.gpt_layers.1.reft.source.weight",
        "gpt.gpt_layers.1.reft.source.bias"}
    assert all(torch.equal(last[0]["tensors"][k], last[1]["tensors"][k]) for k in last[0]["tensors"])
    # Adapter-only on disk: one layer's (R, W, b) at rank 4 against the saved 3.3 M-parameter base.
    assert (tmp_path / "a" / "best.pt").stat().st_size < 0.01 * (tmp_path / "a" / "model" / "model.safetensors").stat().st_size


def test_generate_py_applies_a_pretrain_runs_interventions(tmp_path, tokenizer_dir, monkeypatch):
    """generate.py --model_size RUN/model --checkpoint RUN: the saved frozen base + the run's
    interventions, greedy text = a full-recomputation greedy loop of the one loader's model."""
    import generate
    import pretrain
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from training.checkpoint import load_model

    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the rose is red and line {i} is true" for i in range(60)) + "\n")
    run = tmp_path / "run"
    pretrain.main(["--model_size", "tiny", "--corpus", str(corpus), "--max_length", "16", "--epochs", "1",
                   "--batch_size", "2", "--limit", "8", "--lr", "3e-2", "--no_progress", "--peft", "reft",
                   "--reft_positions", "all", "--reft_rank", "4", "--run_dir", str(run)])
    rows = generate.main(["--model_size", str(run / "model"), "--checkpoint", str(run), "--prompt", "the rose is",
                          "--decoding", "greedy", "--max_new_tokens", "6", "--tokenizer", str(tokenizer_dir)])
    tok = load_tokenizer(str(tokenizer_dir))
    model = load_model(GPT2LMHeadModel, str(run / "model"), run)
    base = load_model(GPT2LMHeadModel, str(run / "model"))
    ids = torch.tensor([tok.encode("the rose is")])
    with torch.no_grad():
        assert (model(ids) - base(ids)).abs().max() > 1e-3  # the interventions trained and are applied
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert rows[0]["text"] == tok.decode(ids[0].tolist())


def test_bad_reft_values_exit_2_naming_the_flag(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """Every script: a bad --reft_* / --qat value ends with status 2 and one line naming the flag,
    whether refused by the config (before any work) or by prepare_model (layer / rank out of range)."""
    import pytest

    import classifier
    import paraphrase_detection
    import pretrain
    import sonnet_generation
    from training.cli import FIELD_FLAGS, entry_point

    monkeypatch.setenv("GPT2_TOKENIZER_DIR", str(tokenizer_dir))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the rose is red and line {i} is true" for i in range(40)) + "\n")
    para = [a for f in ("train", "dev", "test") for a in (f"--para_{f}", str(corpus))] + [
        "--para_dev_out", str(tmp_path / "d.csv"), "--para_test_out", str(tmp_path / "t.csv")]  # files checked first
    sonnet = [a for f in ("sonnet_path", "held_out_sonnet_path", "held_out_dev_path", "gold_dev_path")
              for a in (f"--{f}", str(corpus))] + ["--sonnet_out", str(tmp_path / "s.txt"),
                                                   "--sonnet_dev_out", str(tmp_path / "sd.txt")]
    cases = [(module, [*extra, *bad], flag) for module, extra in (
        (classifier, ["--fine-tune-mode", "full-model"]), (paraphrase_detection, para), (sonnet_generation, sonnet),
        (pretrain, ["--corpus", str(corpus)])) for bad, flag in (
        (["--reft_positions", "last4"], "--reft_positions"), (["--reft_layers", "1,x"], "--reft_layers"),
        (["--reft_rank", "0"], "--reft_rank"), (["--qat", "int8"], "--qat"),
        (["--export_hf", str(tmp_path / "hf")], "--export_hf"))]  # interventions have no transformers form
    run_common = ["--corpus", str(corpus), "--max_length", "16", "--limit", "4", "--batch_size", "2",
                  "--epochs", "1", "--no_progress", "--model_size", "tiny"]
    cases += [(pretrain, [*run_common, "--run_dir", str(tmp_path / f"r{i}"), *bad], flag) for i, (bad, flag) in
              enumerate(((["--reft_layers", "7"], "--reft_layers"), (["--reft_rank", "4096"], "--reft_rank")))]
    for module, argv, flag in cases:
        with pytest.raises(SystemExit) as exit_info:
            entry_point(module.main, getattr(module, "FIELD_FLAGS", FIELD_FLAGS))(["--peft", "reft", *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in err and "Traceback" not in err, (argv, err)
        assert f"error: {flag}" in err, (argv, err)
