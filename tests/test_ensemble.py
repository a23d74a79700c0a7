"""Ensembling (objectives/ensemble.py, ensemble.py, tasks/run_outputs.py): mean and weighted vote by
hand, the chrF consensus against sacrebleu, refusal of mismatched members, and classifier / sonnet
runs whose saved outputs are ensembled end to end."""
from __future__ import annotations

import json

import pytest
import torch

from common.errors import DataError, UserError
from cs224n_files import keyword_sentiment, write_sentiment, sonnet_task_files
from objectives.ensemble import check_members, combine, combine_probabilities, consensus_choice, score
from tasks.run_outputs import RunOutputs, outputs_path, read_outputs, write_class_outputs, write_text_outputs


def member(probs, ids=("a", "b", "c"), task="sst", labels=(0, 1, 2), path="m"):
    probs = [list(p) for p in probs]
    return RunOutputs(task, "dev", f"full-model-{task}-dev-out.csv", list(ids), probs, len(probs[0]),
                      list(labels), path=path)


def test_mean_and_weighted_vote_by_hand():
    probs = torch.tensor([[[0.6, 0.4], [0.2, 0.8]],  # member 0: examples 0 and 1
                          [[0.3, 0.7], [0.45, 0.55]],  # member 1
                          [[0.1, 0.9], [0.9, 0.1]]], dtype=torch.float64)  # member 2
    w = torch.tensor([0.3, 0.35, 0.35], dtype=torch.float64)
    mean, pred = combine_probabilities(probs, w, "mean")
    # p(1) = 0.3*0.4 + 0.35*0.7 + 0.35*0.9 = 0.68 and 0.3*0.8 + 0.35*0.55 + 0.35*0.1 = 0.4675
    assert mean[:, 1].tolist() == pytest.approx([0.68, 0.4675]) and pred == [1, 0]
    shares, votes = combine_probabilities(probs, w, "vote")
    # Example 0: class 0 gets 0.3, class 1 gets 0.7.  Example 1: class 1 gets 0.3 + 0.35, class 0 gets 0.35.
    assert votes == [1, 1] and shares[:, 1].tolist() == pytest.approx([0.7, 0.65])
    # A vote tie goes to the higher mean probability.
    tie = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]], dtype=torch.float64)
    assert combine_probabilities(tie, torch.tensor([0.5, 0.5], dtype=torch.float64), "vote")[1] == [0]
    # Classes 0 and 2 tie with 0.35 of the votes each, class 1 has 0.3 (fewer votes, by less than any
    # weight) and the highest mean probability: the tie between 0 and 2 is broken by their means, 1 never wins.
    three = torch.tensor([[[0.0, 1.0, 0.0]], [[0.5, 0.2, 0.3]], [[0.3, 0.3, 0.4]]], dtype=torch.float64)
    assert combine_probabilities(three, w, "vote")[1] == [0] and combine_probabilities(three, w, "mean")[1] == [1]


def test_mean_prediction_is_the_argmax_of_the_mean():
    probs = torch.tensor([[[0.2, 0.8], [0.2, 0.8]], [[0.45, 0.55], [0.9, 0.1]]], dtype=torch.float64)
    mean, pred = combine_probabilities(probs, torch.tensor([0.5, 0.5], dtype=torch.float64), "mean")
    assert pred == [1, 0] and torch.allclose(mean.sum(-1), torch.ones(2, dtype=torch.float64))


def test_members_are_aligned_by_id_and_mismatches_refused():
    a = member([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], path="a")
    b = member([[0.2, 0.2, 0.6], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], ids=("c", "a", "b"), labels=(2, 0, 1), path="b")
    aligned = check_members([a, b])[1]
    assert aligned.ids == ["a", "b", "c"] and aligned.probs == a.probs and aligned.labels == [0, 1, 2]
    result = combine([a, b])
    assert result.predictions == [0, 1, 2] and score(result.outputs, result.predictions)["accuracy"] == 1.0
    with pytest.raises(DataError, match="ids differ"):
        check_members([a, member(a.probs, ids=("a", "b", "d"), path="d")])
    with pytest.raises(DataError, match="task 'cfimdb'"):
        check_members([a, member(a.probs, task="cfimdb", path="x")])
    with pytest.raises(ValueError, match="2 weights for 3 runs"):
        combine([a, a, a], weights=[1, 2])


def test_consensus_picks_the_sonnet_the_others_agree_with():
    from sacrebleu.metrics import CHRF

    shared = "Shall I compare thee to a summer's day\nThou art more lovely and more temperate"
    texts = [[shared + "\nRough winds do shake"], [shared + "\nRough winds do shake the buds"],
             ["Completely different words about the sea and the stars above"]]
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    chosen = consensus_choice(texts, w)
    metric = CHRF()
    mean = [sum(metric.sentence_score(texts[m][0], [texts[o][0]]).score for o in range(3) if o != m) / 2
            for m in range(3)]
    assert chosen == [max(range(3), key=lambda m: mean[m])] and chosen[0] != 2
    # Weight on the outlier alone makes the others agree with it the most.
    assert consensus_choice(texts, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))[0] in (0, 1)


def test_outputs_files_are_checked(tmp_path):
    path = write_class_outputs(tmp_path, "sst", "dev", "f.csv", ["x", "y"], torch.tensor([[0.5, 0.5], [1.0, 0.0]]),
                               [1, None])
    assert path == outputs_path(tmp_path, "sst", "dev") and read_outputs(path).labels == [1, None]
    path.write_text(json.dumps({"task": "sst", "split": "dev", "prediction_file": "f", "ids": ["x"], "classes": 2,
                                "probs": [[0.9, 0.9]]}))
    with pytest.raises(DataError, match="not a probability distribution"):
        read_outputs(path)


def cfimdb_run(tmp_path, tokenizer_dir, name, seed, n_dev=10):
    import classifier

    files = []
    for split, n, test in (("train", 24, False), ("dev", n_dev, False), ("test", 5, True)):
        path = write_sentiment(tmp_path / f"cf-{split}-{n}.csv", keyword_sentiment(n, 7 + len(files), 2), test=test)
        files += [f"--cfimdb_{split}", str(path)]
    run = tmp_path / name
    dev = classifier.main(["--model_size", "tiny", "--no_progress", "--tokenizer", str(tokenizer_dir), "--datasets",
                           "cfimdb", "--fine-tune-mode", "full-model", "--lr", "1e-3", "--epochs", "1", "--seed",
                           str(seed), "--predictions_dir", str(run / "pred"), "--run_dir", str(run), *files])
    return run, dev["cfimdb"]


def test_two_classifier_seeds_are_ensembled_end_to_end(tmp_path, tokenizer_dir):
    import ensemble
    from tasks.data import SENTIMENT_HEADER, read_predictions

    (a, dev_a), (b, dev_b) = cfimdb_run(tmp_path, tokenizer_dir, "a", 1), cfimdb_run(tmp_path, tokenizer_dir, "b", 2)
    for run in (a, b):  # the saved probabilities are the ones the prediction file was written from
        outs = read_outputs(outputs_path(run, "cfimdb", "dev"))
        rows = read_predictions(run / "pred" / "full-model-cfimdb-dev-out.csv", SENTIMENT_HEADER, (0, 1))
        assert [r[0] for r in rows] == outs.ids
        assert [r[1] for r in rows] == torch.tensor(outs.probs).argmax(-1).tolist()
    summary = ensemble.main(["--runs", str(a), str(b), "--out", str(tmp_path / "ens")])
    entry = summary["results"]["cfimdb-dev"]
    assert [m["dev"]["accuracy"] for m in entry["members"]] == [dev_a["accuracy"], dev_b["accuracy"]]
    pa, pb = (torch.tensor(read_outputs(outputs_path(r, "cfimdb", "dev")).probs) for r in (a, b))
    labels = read_outputs(outputs_path(a, "cfimdb", "dev")).labels
    want = ((pa + pb) / 2).argmax(-1)
    assert entry["ensemble"]["accuracy"] == pytest.approx((want == torch.tensor(labels)).float().mean().item())
    written = read_predictions(tmp_path / "ens" / "full-model-cfimdb-dev-out.csv", SENTIMENT_HEADER, (0, 1))
    assert [r[1] for r in written] == want.tolist()
    # The starter's bytes (classifier.py: f"id \t Predicted_Sentiment \n", then f"{p}, {s} \n" per row), one
    # row for every id of the test data file, in its order.
    from tasks.data import read_sentiment

    test_ids = [e.id for e in read_sentiment(tmp_path / "cf-test-5.csv", 2, labeled=False)]
    test_pred = torch.tensor(read_outputs(tmp_path / "ens" / "outputs" / "cfimdb-test.json").probs).argmax(-1)
    assert (tmp_path / "ens" / "full-model-cfimdb-test-out.csv").read_text() == \
        "id \t Predicted_Sentiment \n" + "".join(f"{i}, {int(v)} \n" for i, v in zip(test_ids, test_pred))
    assert json.loads((tmp_path / "ens" / "ensemble.json").read_text())["method"] == "mean"
    # Members with other ids (another dev file) are refused.
    c, _ = cfimdb_run(tmp_path, tokenizer_dir, "c", 3, n_dev=6)
    with pytest.raises(DataError, match="ids differ"):
        ensemble.main(["--runs", str(a), str(c), "--out", str(tmp_path / "bad")])
    with pytest.raises(UserError, match="one of the --runs"):
        ensemble.main(["--runs", str(a), str(b), "--out", str(a)])


def test_sonnet_runs_save_outputs_and_are_ensembled_by_consensus(tmp_path, tokenizer_dir):
    import ensemble
    import sonnet_generation as sg
    from tasks.sonnets import read_generated_sonnets

    f = sonnet_task_files(tmp_path)
    train, dev, gold_path, test, gold = f["train"], f["dev"], f["gold_path"], f["test"], f["gold"]
    sg.main(["--model_size", "tiny", "--no_progress", "--tokenizer", str(tokenizer_dir), "--epochs", "1",
             "--select_by", "loss", "--max_new_tokens", "12", "--sonnet_path", str(train), "--held_out_sonnet_path",
             str(test), "--held_out_dev_path", str(dev), "--gold_dev_path", str(gold_path), "--sonnet_out",
             str(tmp_path / "o.txt"), "--sonnet_dev_out", str(tmp_path / "od.txt"), "--run_dir", str(tmp_path / "s")])
    saved = read_outputs(outputs_path(tmp_path / "s", "sonnet", "dev"))
    assert saved.ids == [132, 133] and saved.texts == [t for _, t in read_generated_sonnets(tmp_path / "od.txt")]
    assert saved.references == [gold[132], gold[133]]
    # Two more members made by hand: one agreeing with the run, one not.
    saved_test = read_outputs(outputs_path(tmp_path / "s", "sonnet", "test"))
    write_text_outputs(tmp_path / "t", "sonnet", "dev", saved.prediction_file, saved.ids,
                       [t + " and more" for t in saved.texts], saved.references)
    write_text_outputs(tmp_path / "u", "sonnet", "dev", saved.prediction_file, saved.ids,
                       ["Nothing alike at all", "Nor this one"], saved.references)
    for name in ("t", "u"):
        write_text_outputs(tmp_path / name, "sonnet", "test", saved_test.prediction_file, saved_test.ids,
                           [f"{name} wrote this"])
    summary = ensemble.main(["--runs", str(tmp_path / "s"), str(tmp_path / "t"), str(tmp_path / "u"),
                             "--task", "sonnet", "--out", str(tmp_path / "ens")])
    assert summary["results"]["sonnet-dev"]["chosen_per_member"][2] == 0
    assert "chrf" in summary["results"]["sonnet-dev"]["ensemble"]
    # The starter's layout: numbered 0, 1, ... in the first member's prompt order (the i-th sonnet answers
    # the i-th prompt), each text one member's sonnet for that prompt, every prompt answered once.
    written = read_generated_sonnets(tmp_path / "ens" / saved.prediction_file)
    assert [n for n, _ in written] == [0, 1]
    chosen = summary["results"]["sonnet-dev"]
    assert [t for _, t in written] == [t for t in read_outputs(outputs_path(tmp_path / "ens", "sonnet", "dev")).texts]
    assert all(t in (saved.texts[i], saved.texts[i] + " and more") for i, (_, t) in enumerate(written)), chosen
    assert len(read_generated_sonnets(tmp_path / "ens" / saved_test.prediction_file)) == 1
    with pytest.raises(UserError, match="no vote"):
        ensemble.main(["--runs", str(tmp_path / "t"), str(tmp_path / "u"), "--method", "vote", "--out",
                       str(tmp_path / "e2")])
    (tmp_path / "t" / "outputs" / "sonnet-test.json").unlink()
    with pytest.raises(DataError, match="holds"):  # a run without test outputs
        ensemble.main(["--runs", str(tmp_path / "s"), str(tmp_path / "t"), "--out", str(tmp_path / "e3")])


def test_paraphrase_ensemble_writes_the_starters_answer_tokens(tmp_path, capsys):
    import ensemble
    from training.cli import entry_point

    ids = ["q1", "q2", "q3"]
    for name, probs in (("a", [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]]), ("b", [[0.6, 0.4], [0.8, 0.2], [0.45, 0.55]])):
        for split, labels in (("dev", [0, 1, 1]), ("test", None)):  # members list the ids in other orders
            order = ids if name == "a" else ids[::-1]
            rows = [probs[ids.index(i)] for i in order]
            write_class_outputs(tmp_path / name, "para", split, f"para-{split}-output.csv", order, rows,
                                None if labels is None else [labels[ids.index(i)] for i in order])
    summary = ensemble.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "3",
                             "--out", str(tmp_path / "ens")])
    # weighted mean P(yes): q1 (0.1 + 3 * 0.4) / 4 = 0.325, q2 (0.6 + 0.6) / 4 = 0.3, q3 (0.7 + 1.65) / 4 = 0.5875
    want = "id \t Predicted_Is_Paraphrase \nq1, 3919 \nq2, 3919 \nq3, 8505 \n"
    assert (tmp_path / "ens" / "para-test-output.csv").read_text() == want
    assert (tmp_path / "ens" / "para-dev-output.csv").read_text() == want
    assert summary["results"]["para-dev"]["ensemble"]["accuracy"] == pytest.approx(2 / 3)
    for weights in (["1", "-1"], ["0", "0"], ["1", "inf"]):
        with pytest.raises(SystemExit) as exc:
            entry_point(ensemble.main)(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", *weights,
                                        "--out", str(tmp_path / "e2")])
        assert exc.value.code == 2 and "--weights" in capsys.readouterr().err
