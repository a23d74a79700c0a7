"""Impossible Distillation stages: exact filter statistics on hand-made candidates, hard negatives, the
Quora CSV round trip, the synthetic-training loss, and a tiny generate -> filter -> build -> train run."""
from __future__ import annotations

import json

import pytest

from common.errors import UserError
import torch
import torch.nn.functional as F

from distillation import impossible as imp
from distillation.synthetic import paraphrase_loss
from tasks.data import read_paraphrase

GOOD1 = ("How do I learn python quickly?", "What is the fastest way to study Python programming?")
GOOD2 = ("Where can I find cheap flights to Paris?", "How do I get inexpensive plane tickets to France?")
CANDIDATES = [
    {"context_id": 0, "a": GOOD1[0], "b": GOOD1[1]},                                     # kept
    {"context_id": 0, "a": "How can I lose weight fast?", "b": "how can I  lose weight fast"},  # copy
    {"context_id": 1, "a": "What is the best way to learn guitar?",
     "b": "What is the best way to learn an acoustic guitar?"},                          # near_copy (8/10)
    {"context_id": 1, "a": "Why is the sky blue?",
     "b": "Can someone explain in great detail the physical reasons why the daytime sky appears blue to human eyes?"},
    {"context_id": 0, "a": GOOD1[1], "b": GOOD1[0]},                                     # duplicate (swapped)
    {"context_id": 2, "a": "Why?", "b": "What is the reason for this?"},                 # too_short
    {"context_id": 2, "a": GOOD2[0], "b": GOOD2[1]},                                     # kept
    {"context_id": 2, "a": GOOD2[0], "b": GOOD2[1]},                                     # duplicate
]


def test_filter_statistics_are_exact():
    kept, stats = imp.filter_pairs(CANDIDATES, imp.FilterRules(min_words=3, min_length_ratio=0.5, max_overlap=0.7))
    assert stats["input"] == 8 and stats["kept"] == 2
    assert stats["removed"] == {"too_short": 1, "copy": 1, "duplicate": 2, "length_ratio": 1, "near_copy": 1,
                                "critic": 0}
    assert [(r["a"], r["b"]) for r in kept] == [GOOD1, GOOD2]
    # a looser overlap ceiling keeps the near-copy
    _, loose = imp.filter_pairs(CANDIDATES, imp.FilterRules(max_overlap=0.9))
    assert loose["removed"]["near_copy"] == 0 and loose["kept"] == 3


def test_filter_critic_sees_only_rule_survivors_and_applies_tau():
    seen = []

    def critic(pairs):
        seen.extend(pairs)
        return [0.9 if a == GOOD1[0] else 0.3 for a, _ in pairs]

    kept, stats = imp.filter_pairs(CANDIDATES, imp.FilterRules(tau=0.5), critic)
    assert seen == [GOOD1, GOOD2]
    assert stats["kept"] == 1 and stats["removed"]["critic"] == 1 and kept[0]["score"] == 0.9
    with pytest.raises(ValueError, match="tau"):
        imp.filter_pairs(CANDIDATES, imp.FilterRules(tau=None), critic)


def test_lexical_similarity_comes_from_the_metric_libraries():
    import sacrebleu

    from distillation.lexical import distinct_n, similarity

    # ROUGE-L F by hand: "a b c d" vs "a c d e" -> LCS "a c d" = 3 of 4 words each side -> F = 0.75
    assert similarity("a b c d", "A c d e", "rougeL") == pytest.approx(0.75)
    x, y = "the cat sat on the mat today", "the cat sat on a mat"
    assert similarity(x, y, "bleu") == pytest.approx(max(sacrebleu.sentence_bleu(x, [y]).score,
                                                         sacrebleu.sentence_bleu(y, [x]).score) / 100)
    assert similarity(x, y, "chrf") == pytest.approx(max(sacrebleu.sentence_chrf(x, [y]).score,
                                                         sacrebleu.sentence_chrf(y, [x]).score) / 100)
    assert similarity(x, x, "bleu") == pytest.approx(1.0) and similarity(x, x, "chrf") == pytest.approx(1.0)
    assert distinct_n(["a b c a b", "a b"], 2) == pytest.approx(3 / 5)  # (a b) x3, (b c), (c a)
    with pytest.raises(ValueError, match="overlap_metric"):
        similarity(x, y, "jaccard")


def test_filter_overlap_metric_and_kept_pair_statistics():
    # the guitar near-copy: ROUGE-L 8/9 ~ 0.889 (removed at 0.7), sentence BLEU ~0.64 (kept at 0.7)
    _, rouge = imp.filter_pairs(CANDIDATES, imp.FilterRules(max_overlap=0.7, overlap_metric="rougeL"))
    kept, bleu = imp.filter_pairs(CANDIDATES, imp.FilterRules(max_overlap=0.7, overlap_metric="bleu"))
    assert rouge["removed"]["near_copy"] == 1 and bleu["removed"]["near_copy"] == 0 and bleu["kept"] == 3
    from distillation.lexical import distinct_n, similarity

    assert bleu["lexical_similarity_mean_kept"] == pytest.approx(sum(similarity(r["a"], r["b"], "bleu")
                                                                     for r in kept) / 3)
    assert bleu["distinct_2_kept"] == pytest.approx(distinct_n([r["b"] for r in kept]))
    assert bleu["critic_score_mean_kept"] is None
    with pytest.raises(ValueError, match="--overlap_metric"):
        imp.filter_pairs(CANDIDATES, imp.FilterRules(overlap_metric="jaccard"))


def test_merge_filtered_keeps_each_unordered_pair_once():
    a = [{"context_id": 0, "a": "x y z", "b": "p q r"}, {"context_id": 1, "a": "u v", "b": "w"}]
    b = [{"context_id": 0, "a": "P q r", "b": "x y z!"}, {"context_id": 2, "a": "k", "b": "l"}]
    rows, dropped = imp.merge_filtered([a, b])
    assert dropped == 1 and rows == a + b[1:]


def test_filter_rejects_bad_rules():
    with pytest.raises(ValueError, match="--max_overlap"):
        imp.filter_pairs(CANDIDATES, imp.FilterRules(max_overlap=1.5))


def test_hard_negatives_come_from_other_contexts_with_most_overlap():
    rows = [
        {"context_id": 0, "a": "how do I cook rice in a pot", "b": "what is the way to boil rice"},
        {"context_id": 1, "a": "how do I cook pasta in a pan", "b": "best way to make spaghetti at home"},
        {"context_id": 2, "a": "why is the ocean salty", "b": "what makes sea water taste of salt"},
    ]
    negs, short = imp.hard_negatives(rows, 1)
    assert short == 0
    assert negs[0] == (rows[0]["a"], rows[1]["a"])  # shares "how do i cook in a"
    assert negs[1] == (rows[1]["a"], rows[0]["a"])
    assert negs[2][0] == rows[2]["a"] and negs[2][1] in (rows[0]["b"], rows[1]["b"])  # shares "is"/"the"...
    _, short = imp.hard_negatives(rows, 1, min_overlap=0.5)
    assert short == 1  # the cooking questions overlap by 6/10; the ocean question has no such neighbour


def test_build_writes_quora_csv_read_by_the_task_reader(tmp_path):
    rows = [{"context_id": i, "a": f"question {i} about\ttopic {i % 2}?", "b": f"query {i} on topic {i % 2}?"}
            for i in range(6)]
    pairs, stats = imp.build_dataset(rows, negatives_per_positive=1, seed=0)
    assert stats["positives"] == 6 and stats["negatives"] == 6 and stats["rows"] == 12
    path = imp.write_quora_csv(tmp_path / "s.csv", pairs)
    back = read_paraphrase(path, labeled=True)
    assert len(back) == 12 and sum(e.label for e in back) == 6
    assert all("\t" not in e.sentence1 for e in back)
    with pytest.raises(ValueError, match="kept nothing"):
        imp.build_dataset([], 1, 0)


def test_clean_sample_and_candidate_pairs():
    assert imp.clean_sample('How do I swim?" he said\nmore', "rewrite") == "How do I swim?"
    assert imp.clean_sample(" It rains. Then it pours.", "continue") == "It rains."
    rows = imp.candidate_pairs(3, "Q?", ["x", "y", "z"], "rewrite")
    assert len(rows) == 3 + 3 and all(r["context_id"] == 3 for r in rows)
    assert len(imp.candidate_pairs(0, "c", ["x", "y", "z"], "continue")) == 3


def test_paraphrase_loss_reduces_to_cross_entropy_and_adds_kl():
    torch.manual_seed(0)
    logits, ref = torch.randn(5, 2), torch.randn(5, 2)
    labels = torch.tensor([0, 1, 1, 0, 1])
    ones = torch.ones(5)
    assert torch.allclose(paraphrase_loss(logits, labels, ones), F.cross_entropy(logits, labels))
    w = torch.tensor([1.0, 0.5, 0.5, 1.0, 2.0])
    assert torch.allclose(paraphrase_loss(logits, labels, w),
                          (F.cross_entropy(logits, labels, reduction="none") * w).mean())
    kl = F.kl_div(F.log_softmax(ref, -1), F.log_softmax(logits, -1), log_target=True, reduction="batchmean")
    got = paraphrase_loss(logits, labels, ones, ref, 0.3)
    assert torch.allclose(got, F.cross_entropy(logits, labels) + 0.3 * kl)
    assert torch.allclose(paraphrase_loss(logits, labels, ones, logits.clone(), 0.3), F.cross_entropy(logits, labels))


def test_tiny_end_to_end_generate_filter_build_train(tmp_path, tokenizer_dir):
    import impossible_distillation as idist
    import paraphrase_detection as para
    from cs224n_files import quora_pairs, write_quora

    quora = write_quora(tmp_path / "quora.csv", quora_pairs(12, 1))
    tok = ["--tokenizer", str(tokenizer_dir)]
    cand = tmp_path / "cand.jsonl"
    stats = idist.main(["generate", "--model", "tiny", *tok, "--quora", str(quora), "--num_contexts", "4",
                        "--samples_per_context", "3", "--max_new_tokens", "6", "--batch_size", "6", "--out", str(cand)])
    assert stats["contexts"] == 4 and stats["samples"] == 12 and stats["candidates"] == 4 * (3 + 3)
    assert json.loads(imp.stats_path(cand).read_text()) == stats
    # the random tiny LM writes gibberish: loose rules, a tiny critic with tau 0 (keeps everything it scores)
    filt = tmp_path / "filt.jsonl"
    fstats = idist.main(["filter", "--candidates", str(cand), "--out", str(filt), "--min_words", "1",
                         "--min_length_ratio", "0", "--max_overlap", "1", "--critic_model", "tiny", *tok,
                         "--tau", "0", "--max_length", "64"])
    assert fstats["input"] == 24 and fstats["kept"] + sum(fstats["removed"].values()) == 24
    assert fstats["removed"]["critic"] == 0 and fstats["kept"] >= 4
    kept = imp.read_jsonl(filt, ["a", "b", "score"])
    assert len(kept) == fstats["kept"] and all(0 <= r["score"] <= 1 for r in kept)
    synth = tmp_path / "synth.csv"
    bstats = idist.main(["build", "--filtered", str(filt), "--out", str(synth)])
    assert bstats["positives"] == fstats["kept"] and len(read_paraphrase(synth)) == bstats["rows"]
    dev = write_quora(tmp_path / "dev.csv", quora_pairs(6, 2))
    test = write_quora(tmp_path / "test.csv", quora_pairs(4, 3), labels=False)
    metrics = para.main(["--model_size", "tiny", "--no_progress", "--batch_size", "8", *tok, "--epochs", "1",
                         "--run_dir", str(tmp_path / "run"), "--para_train", "none", "--synthetic_train", str(synth),
                         "--synthetic_weight", "0.5", "--kl_lambda", "0.1", "--para_dev", str(dev),
                         "--para_test", str(test), "--para_dev_out", str(tmp_path / "d.csv"),
                         "--para_test_out", str(tmp_path / "t.csv"), "--max_length", "64"])
    assert set(metrics) == {"accuracy", "f1"}
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    start = next(e for e in events if e["event"] == "start")
    assert start["train_examples"] == bstats["rows"]
    with pytest.raises(UserError, match="--synthetic_train"):
        para.main(["--model_size", "tiny", *tok, "--para_train", "none"])
