"""Regression tests of issue 14 that need no kill: stray quotes and ids in == ids out (item 3), flags
checked at start-up and what --resume accepts (5), long prompts (6), mismatched data, sonnet sets and
tokenizers (8), encodings (9) and the smaller items (11).  Kills, corruption, torn logs and
concurrent runs: tests/test_fault_injection.py."""
from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError, DataError, UserError
from conftest import CS224N_DATA, ROOT, SHARED_DATA, tiny_hf_config
from cs224n_files import keyword_sentiment, quora_pairs, sonnet_text, write_quora, write_sentiment, write_sonnets
from tasks.data import SENTIMENT_HEADER, clean_text, read_paraphrase, read_predictions, read_sentiment
from tasks.sonnets import read_numbered_sonnets, write_generated_sonnets

FAST = ["--model_size", "tiny", "--no_progress", "--batch_size", "4"]
BOM = "\ufeff".encode()


# ---- item 3: a stray quote keeps every row; ids in == ids out -------------------------------
def write_test_student(path: Path, rows) -> Path:
    """A `*-test-student.csv` (header `0, , id, sentence`) whose sentences start right after the tab."""
    path.write_text("0\t\tid\tsentence\n" + "".join(f"{i + 1}\t{float(i)}\t{id_}\t{text}\n"
                                                     for i, (id_, text, _) in enumerate(rows)), encoding="utf-8")
    return path


def test_a_stray_opening_quote_no_longer_swallows_the_rows_after_it(tmp_path, capsys):
    rows = keyword_sentiment(6, seed=1)
    rows[2] = (rows[2][0], '"A stray quote opens this sentence', rows[2][2])
    test = read_sentiment(write_test_student(tmp_path / "sst-test.csv", rows), 5, labeled=False)
    assert [e.id for e in test] == [r[0] for r in rows]
    assert test[2].text == '"A stray quote opens this sentence'
    assert "sst-test.csv: 1 field(s) open a quote they do not close (lines 4)" in capsys.readouterr().err
    pairs = quora_pairs(6, 2)
    pairs[1] = (pairs[1][0], pairs[1][1], '"Why does this question start with a quote?', 0)
    quora = read_paraphrase(write_quora(tmp_path / "quora-test.csv", pairs, labels=False), labeled=False)
    assert [e.id for e in quora] == [p[0] for p in pairs] and quora[1].sentence2.startswith('"Why')
    # Well-formed quoting still reads as csv reads it (the starter's reader).
    (tmp_path / "q.tsv").write_text('\tid\tsentence\tsentiment\n0\tx1\t"He said ""no"""\t1\n1\tx2\t say "yes"\t0\n')
    assert [e.text for e in read_sentiment(tmp_path / "q.tsv", 2)] == ['He said "no"', 'say "yes"']


needs_real_data = pytest.mark.skipif(not CS224N_DATA.is_dir(), reason=f"{CS224N_DATA} missing")


@needs_real_data
@pytest.mark.parametrize("name", ["cs224n/ids-sst-train.csv", "cs224n/ids-cfimdb-test-student.csv",
                                  "cs224n/quora-dev.csv", "quora/quora-train-pre-left.csv"])
def test_the_real_files_read_as_pythons_csv_reads_them(name):
    """Every real row is well formed: the line reader must give exactly csv's ids and texts (csv is
    the independent reference here), the two quora-dev rows with an unbalanced quote included."""
    path = SHARED_DATA / name
    with open(path, newline="", encoding="utf-8") as f:
        reference = list(csv.reader(f, delimiter="\t"))
    if "quora" in name:
        ours = read_paraphrase(path, labeled=False)
        first = 0 if "pre-left" in name else 1
        assert [(e.id, e.sentence1, e.sentence2) for e in ours] == [(r[1], r[2].strip(), r[3].strip())
                                                                   for r in reference[first:]]
    else:
        ours = read_sentiment(path, 5, labeled=False)
        id_col, text_col = reference[0].index("id"), reference[0].index("sentence")
        assert [(e.id, e.text) for e in ours] == [(r[id_col].strip(), clean_text(r[text_col])) for r in reference[1:]]


def test_classifier_writes_one_prediction_per_input_id(tmp_path, tokenizer_dir):
    import classifier

    train, dev, test = keyword_sentiment(8, 1), keyword_sentiment(4, 2), keyword_sentiment(6, 3)
    test[2] = (test[2][0], '"stray quote at the start of the last column', 0)
    files = []
    for split, rows in (("train", train), ("dev", dev)):
        files += [f"--sst_{split}", str(write_sentiment(tmp_path / f"{split}.csv", rows))]
    files += ["--sst_test", str(write_test_student(tmp_path / "test.csv", test))]
    (tmp_path / "dev.csv").write_bytes(BOM + (tmp_path / "dev.csv").read_bytes())  # a BOM before the header
    classifier.main([*FAST, "--tokenizer", str(tokenizer_dir), "--datasets", "sst", "--epochs", "1", *files,
                     "--predictions_dir", str(tmp_path / "pred"), "--run_dir", str(tmp_path / "run")])
    for split, rows in (("dev", dev), ("test", test)):
        written = read_predictions(tmp_path / "pred" / f"last-linear-layer-sst-{split}-out.csv", SENTIMENT_HEADER,
                                   range(5))
        assert [i for i, _ in written] == [r[0] for r in rows]


# ---- item 9: byte-order marks and invalid UTF-8 in every reader -----------------------------
def test_a_bom_is_dropped_by_every_reader(tmp_path):
    from lm.corpus import read_documents

    def with_bom(path):
        path.write_bytes(BOM + path.read_bytes())
        return path

    pairs = quora_pairs(3, 1)
    headerless = with_bom(write_quora(tmp_path / "q.csv", pairs, header=False, index=False))
    assert [e.id for e in read_paraphrase(headerless)] == [p[0] for p in pairs]
    id_header = with_bom(write_quora(tmp_path / "q2.csv", pairs, index=False))  # the header starts with `id`
    assert [e.id for e in read_paraphrase(id_header)] == [p[0] for p in pairs]
    sonnets = tmp_path / "sonnets.txt"
    sonnets.write_bytes(BOM + b"1\nFirst sonnet, line one,\n\n2\nSecond sonnet.\n")  # no header: 1 comes first
    assert read_numbered_sonnets(sonnets) == [(1, "First sonnet, line one,"), (2, "Second sonnet.")]
    text = tmp_path / "corpus.txt"
    text.write_bytes(BOM + b"plain text\n")
    assert read_documents(text) == ["plain text\n"]
    poems = tmp_path / "poems.csv"
    poems.write_bytes(BOM + b"Title,Poem\nT,\"A poem\"\n")
    assert read_documents(poems) == ["A poem"]


def test_invalid_utf8_names_file_and_line_in_every_reader(tmp_path):
    from lm.corpus import read_documents

    bad = b"\xff\xfe not UTF-8"
    cases = [
        ("s.csv", b"\tid\tsentence\tsentiment\n0\ta\tok\t1\n1\tb\t" + bad + b"\t0\n", lambda p: read_sentiment(p, 5),
         3),
        ("q.csv", b"\tid\tsentence1\tsentence2\tis_duplicate\n0\ta\t" + bad + b"\tx\t1\n", read_paraphrase, 2),
        ("sonnets.txt", b"Sonnets\n\n1\n" + bad + b"\n", read_numbered_sonnets, 4),
        ("corpus.txt", b"one\ntwo\n" + bad, read_documents, 3),
        ("poems.csv", b"Title,Poem\nT,\"" + bad + b"\"\n", read_documents, 2),
    ]
    for name, raw, reader, line in cases:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(DataError, match=rf"{name}, line {line}: byte \d+ .* is not valid UTF-8"):
            reader(tmp_path / name)


# ---- item 5: flags checked at start-up; what --resume accepts -------------------------------
def sonnet_files(tmp_path):
    rng = random.Random(0)
    gold = {n: sonnet_text(rng) for n in (132, 133)}
    return {"--sonnet_path": write_sonnets(tmp_path / "sonnets.txt", [(i, sonnet_text(rng)) for i in range(1, 5)]),
            "--gold_dev_path": write_sonnets(tmp_path / "TRUE_dev.txt", list(gold.items())),
            "--held_out_dev_path": write_sonnets(tmp_path / "dev.txt", [(n, "\n".join(t.split("\n")[:3]))
                                                                        for n, t in gold.items()]),
            "--held_out_sonnet_path": write_sonnets(tmp_path / "test.txt", [(145, sonnet_text(rng, 3))])}


def sonnet_args(tmp_path, tokenizer_dir, files, *extra):
    return [*FAST, "--tokenizer", str(tokenizer_dir), "--epochs", "2", "--max_new_tokens", "8",
            *[str(x) for kv in files.items() for x in kv], "--sonnet_out", str(tmp_path / "out" / "test.txt"),
            "--sonnet_dev_out", str(tmp_path / "out" / "dev.txt"), *extra]


def test_sonnet_decoding_flags_fail_before_any_work(tmp_path, tokenizer_dir):
    import sonnet_generation as sg

    files = sonnet_files(tmp_path)
    for bad, field in ((["--top_p", "1.5"], "top_p"), (["--temperature", "0"], "temperature"),
                       (["--repetition_penalty", "-1"], "repetition_penalty")):
        with pytest.raises(ConfigError, match=f"^{field}"):
            sg.main(sonnet_args(tmp_path, tokenizer_dir, files, "--run_dir", str(tmp_path / "run"), *bad))
    assert not (tmp_path / "run").exists()  # refused before a run directory was made


def test_resume_accepts_decoding_and_output_changes_and_refuses_training_changes(tmp_path, tokenizer_dir):
    import sonnet_generation as sg

    files = sonnet_files(tmp_path)
    run = tmp_path / "run"
    assert sg.main(sonnet_args(tmp_path, tokenizer_dir, files, "--select_by", "loss", "--run_dir", str(run),
                               "--stop_after_epoch", "1")) is None
    resume = sonnet_args(tmp_path, tokenizer_dir, files, "--select_by", "loss", "--resume", str(run))
    with pytest.raises(UserError, match=r"\(--lr: saved 1e-05, now 2e-05\)"):
        sg.main([*resume, "--lr", "2e-5"])
    original = files["--sonnet_path"].read_bytes()
    files["--sonnet_path"].write_bytes(original.replace(b"\n1\n", b"\n1\n\nAn added line,", 1))
    changed = rf"training data changed .*--sonnet_path: sha256 \w+ of {files['--sonnet_path']}"
    with pytest.raises(UserError, match=changed):
        sg.main(resume)
    files["--sonnet_path"].write_bytes(original)
    metrics = sg.main([*resume, "--top_p", "0.5", "--temperature", "0.8", "--sonnet_out", str(tmp_path / "t2.txt")])
    assert metrics is not None and (tmp_path / "t2.txt").is_file()

    chrf_run = tmp_path / "chrf"  # with --select_by chrf decoding picks the best epoch: it may not change
    assert sg.main(sonnet_args(tmp_path, tokenizer_dir, files, "--run_dir", str(chrf_run),
                               "--stop_after_epoch", "1")) is None
    with pytest.raises(UserError, match=r"--top_p: saved 0.9, now 0.5"):
        sg.main(sonnet_args(tmp_path, tokenizer_dir, files, "--resume", str(chrf_run), "--top_p", "0.5"))


# ---- item 6: every prompt its own budget ----------------------------------------------------
def test_long_prompts_are_cut_alike_whatever_the_batch_size(tokenizer_dir):
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from tasks.completion import SonnetWriter

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_name_or_path("tiny", max_position_embeddings=64).eval()
    tok = load_tokenizer(str(tokenizer_dir))
    long = "\n".join(f"line {i} of a prompt far longer than the context" for i in range(12))  # > 100 tokens
    prompts = ["Shall I compare thee", long, "To a summer's day?\nThou art more lovely"]
    outputs, reports = [], []
    for batch_size in (1, 3):
        writer = SonnetWriter(tok, torch.device("cpu"), batch_size=batch_size, max_new_tokens=16, seed=0,
                              generate_kwargs={"do_sample": False}, report=reports.append)
        outputs.append(writer.complete(model, prompts))
    assert outputs[0] == outputs[1]
    assert len(tok(outputs[0][0])["input_ids"]) > len(tok(prompts[0])["input_ids"])  # short prompts generate
    assert "1 prompt(s) longer than 48 tokens" in reports[0] and "prompts [1]" in reports[0]


# ---- item 8: mismatched sonnet sets, tokenizers, data (data: the resume test above) ----------
def numbered_generated(path, items):
    """A generated-sonnets file numbered by sonnet number (what this project wrote before it took the
    starter's 0-based positions; evaluate_sonnets reads both)."""
    path.write_text("--Generated Sonnets-- \n\n" + "".join(f"\n{n}\n{t}\n\n" for n, t in items), encoding="utf-8")
    return path


def test_evaluate_sonnets_pairs_by_number_and_refuses_other_sets(tmp_path, capsys):
    import evaluate_sonnets

    write_generated_sonnets = numbered_generated
    rng = random.Random(1)
    a, b = sonnet_text(rng), sonnet_text(rng)
    gold = write_sonnets(tmp_path / "gold.txt", [(132, a), (133, b)])
    swapped = write_generated_sonnets(tmp_path / "gen.txt", [(133, b), (132, a)])
    result = evaluate_sonnets.main(["--generated", str(swapped), "--gold", str(gold)])
    assert [r["chrf"] for r in result["rows"]] == [pytest.approx(100.0)] * 2  # each with its own gold
    test = write_generated_sonnets(tmp_path / "test.txt", [(145, a), (146, b)])
    with pytest.raises(UserError, match="145, 146 without gold, 132, 133 not generated"):
        evaluate_sonnets.main(["--generated", str(test), "--gold", str(gold)])
    starter = write_generated_sonnets(tmp_path / "starter.txt", [(0, a), (1, b)])  # the starter writes positions
    assert evaluate_sonnets.main(["--generated", str(starter), "--gold", str(gold)])["overall"]["chrf"] > 99
    assert "(numbered 0..1, the starter's positions)" in capsys.readouterr().err
    other = write_generated_sonnets(tmp_path / "other.txt", [(0, sonnet_text(rng)), (1, sonnet_text(rng))])
    with pytest.raises(UserError, match="no generated sonnet starts with the first line of the gold sonnet"):
        evaluate_sonnets.main(["--generated", str(other), "--gold", str(gold)])
    twice = write_generated_sonnets(tmp_path / "twice.txt", [(132, a), (132, b)])
    with pytest.raises(DataError, match="sonnet 132 appears twice"):
        evaluate_sonnets.main(["--generated", str(twice), "--gold", str(gold)])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_build(tmp_path, tokenizer_dir):
    import transformers

    import pretrain

    transformers.GPT2LMHeadModel(tiny_hf_config(vocab_size=1000)).save_pretrained(tmp_path / "small-vocab")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a few words\n" * 2000)
    with pytest.raises(ConfigError, match=r"^tokenizer: the tokenizer has 50,257 tokens but the model .* only 1,000"):
        pretrain.main(["--model_size", str(tmp_path / "small-vocab"), "--tokenizer", str(tokenizer_dir), "--corpus",
                       str(corpus), "--run_dir", str(tmp_path / "run"), "--no_progress"])
    assert not (tmp_path / "run" / "last.pt").exists()


# ---- item 11 --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_lr_must_be_finite(value):
    import argparse

    from training.cli import add_common_args, build_configs

    with pytest.raises(ConfigError, match="^lr: must be a finite number"):
        build_configs(add_common_args(argparse.ArgumentParser()).parse_args([f"--lr={value}"]))


def test_a_quora_dev_file_without_labels_stops_before_training(tmp_path, tokenizer_dir):
    import paraphrase_detection as para

    train = write_quora(tmp_path / "train.csv", quora_pairs(8, 1))
    dev = tmp_path / "dev.csv"
    dev.write_text("\tid\tsentence1\tsentence2\tis_duplicate\n0\ta\tx?\ty?\t\n1\tb\tz?\tw?\t\n")
    test = write_quora(tmp_path / "test.csv", quora_pairs(3, 3), labels=False)
    with pytest.raises(DataError, match="dev.csv: no labelled pair to score"):
        para.main([*FAST, "--tokenizer", str(tokenizer_dir), "--para_train", str(train), "--para_dev", str(dev),
                   "--para_test", str(test), "--run_dir", str(tmp_path / "run"), "--para_dev_out", str(tmp_path / "d"),
                   "--para_test_out", str(tmp_path / "t")])
    assert not (tmp_path / "run" / "last.pt").exists()


def test_script_flag_ranges_are_usage_errors():
    import distill
    import lm_baselines

    with pytest.raises(UserError, match="--student_layers must be >= 1, got 0"):
        distill.parse_args(["--task", "lm", "--train_file", "x.txt", "--teacher", "tiny", "--student_layers", "0"])
    with pytest.raises(UserError, match="--kl_weight must be a finite number >= 0, got nan"):
        distill.parse_args(["--task", "lm", "--train_file", "x.txt", "--teacher", "tiny", "--kl_weight", "nan"])
    with pytest.raises(UserError, match="--bptt must be >= 1, got 0"):
        lm_baselines.parse_args(["--bptt", "0"])
    with pytest.raises(UserError, match="--temperature must be a finite number >= 0"):
        lm_baselines.parse_args(["--temperature", "-1"])


def test_outputs_that_collide_with_each_other_or_an_input_are_refused_at_start(tmp_path):
    """Exit status 2 and one line, before a run directory exists (a real process: entry_point)."""
    import evaluate_sonnets
    import paraphrase_detection as para

    quora = write_quora(tmp_path / "q.csv", quora_pairs(4, 1))
    same = tmp_path / "pred.csv"
    argv = ["--model_size", "tiny", "--para_train", str(quora), "--para_dev", str(quora), "--para_test", str(quora),
            "--run_dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, str(ROOT / "paraphrase_detection.py"), *argv, "--para_dev_out", str(same),
                           "--para_test_out", str(same)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert f"--para_dev_out and --para_test_out both write {same}" in done.stderr
    with pytest.raises(UserError, match=f"--para_test_out {quora} is also the input --para_train {quora}"):
        para.main([*argv, "--para_dev_out", str(same), "--para_test_out", str(quora)])
    assert not (tmp_path / "run").exists()
    gold = write_sonnets(tmp_path / "gold.txt", [(1, "A line.")])
    generated = write_generated_sonnets(tmp_path / "gen.txt", ["A line."])
    with pytest.raises(UserError, match=f"--json {gold} is also the input --gold"):
        evaluate_sonnets.main(["--generated", str(generated), "--gold", str(gold), "--json", str(gold)])


@pytest.mark.parametrize("flags,flag", [
    (["--precondition_frequency", "3"], "--precondition_frequency"),  # adamw: no preconditioner
    (["--optimizer", "soap", "--matrix_eps", "1e-3"], "--matrix_eps"),  # Shampoo's only
    (["--reft_rank", "8"], "--reft_rank"),  # no --peft reft
    (["--qat", "int8", "--qat_group_size", "32"], "--qat_group_size"),  # int8 is per channel
    (["--smart_eps", "1e-3"], "--smart_eps"),  # --smart_lambda 0: SMART off
    (["--smart_lambda", "1", "--bregman_beta", "0.5"], "--bregman_beta"),  # --bregman_mu 0
])
def test_a_flag_that_would_do_nothing_is_refused_at_start(flags, flag, capsys):
    import classifier
    from training.cli import entry_point

    with pytest.raises(SystemExit) as exc:
        entry_point(classifier.main)(["--fine-tune-mode", "full-model", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"error: {flag}: has no effect" in err and "Traceback" not in err, err


def test_resume_accepts_a_shared_flag_added_since_the_run_started_only_at_its_default(tmp_path):
    from training.checkpoint import check_signature
    from training.cli import shared_defaults

    now = {"--lr": 1e-5, "--qat": "none", "--optimizer": "adamw"}
    saved = {"--lr": 1e-5, "--optimizer": "adamw"}  # started before --qat existed
    assert shared_defaults()["--qat"] == "none"
    check_signature(saved, now, tmp_path)
    with pytest.raises(UserError, match="other settings.*--qat: saved None, now 'int8'"):
        check_signature(saved, {**now, "--qat": "int8"}, tmp_path)
    with pytest.raises(UserError, match="other settings.*--my_script_flag"):  # not a shared flag: no default known
        check_signature(saved, {**now, "--my_script_flag": 3}, tmp_path)
    with pytest.raises(UserError, match="other settings.*--optimizer"):  # a flag the run had still must match
        check_signature(saved, {**now, "--optimizer": "soap"}, tmp_path)
