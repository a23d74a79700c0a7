"""Multi-task training (objectives/multitask.py, multitask.py): the sampling schedules by hand, the
heads equal the single-task models' decisions, the mixed-batch loss equals per-task cross-entropies,
and the script end to end with LoRA, leaderboard files and exact resume."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from cs224n_files import keyword_sentiment, quora_pairs, write_quora, write_sentiment
from models.gpt2 import GPT2LMHeadModel
from objectives.multitask import MultiTaskModel, epoch_plan, multitask_loss, task_shares
from tasks.paraphrase import two_way_logits
from tasks.sentiment import GPT2SentimentClassifier


def test_sampling_schedules_by_hand():
    sizes = {"a": 100, "b": 4, "c": 16}
    assert task_shares(sizes, "sqrt") == pytest.approx({"a": 10 / 16, "b": 2 / 16, "c": 4 / 16})
    plan = epoch_plan(sizes, "sqrt", seed=0)
    counts = Counter(t for t, _ in plan)
    assert counts == {"a": 75, "b": 15, "c": 30}  # N = 120 slots
    b = Counter(i for t, i in plan if t == "b")  # upsampled: every example 3 or 4 times
    assert set(b) == {0, 1, 2, 3} and set(b.values()) <= {3, 4}
    assert len({i for t, i in plan if t == "a"}) == 75  # downsampled: no repeats
    proportional = epoch_plan(sizes, "proportional", seed=0)
    assert sorted(proportional) == sorted((t, i) for t, n in sizes.items() for i in range(n))
    assert Counter(t for t, _ in epoch_plan(sizes, "uniform", seed=0)) == {"a": 40, "b": 40, "c": 40}
    assert epoch_plan(sizes, "sqrt", seed=0) == plan and epoch_plan(sizes, "sqrt", seed=1) != plan
    # Later epochs walk on through each task's stream: the downsampled task's 100 examples all come up
    # in epochs 0 and 1 (75 + 75 slots) before any repeats, and epoch 1 is not epoch 0 again.
    second = epoch_plan(sizes, "sqrt", seed=0, epoch=1)
    assert Counter(t for t, _ in second) == counts and second != plan
    a = [i for t, i in plan if t == "a"] + [i for t, i in second if t == "a"]
    assert set(a[:100]) == set(range(100))
    with pytest.raises(ValueError, match="sampling"):
        epoch_plan(sizes, "annealed", 0)


def models():
    torch.manual_seed(0)
    lm = GPT2LMHeadModel.from_name_or_path("tiny").eval()
    multi = MultiTaskModel(lm.gpt, ["sst", "para"], 0.0).eval()
    single = GPT2SentimentClassifier(lm.gpt, 5, 0.0).eval()
    single.classifier_head.load_state_dict(multi.sst_head.state_dict())
    return lm, multi, single


def toy_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[0, 4:] = mask[3, 2:] = 0
    return ids, mask


def test_heads_make_the_single_task_models_decisions():
    lm, multi, single = models()
    ids, mask = toy_batch()
    with torch.no_grad():
        assert torch.allclose(multi(ids, mask, "para"), two_way_logits(lm, ids, mask), atol=1e-6)
        assert torch.allclose(multi(ids, mask, "sst"), single(ids, mask), atol=1e-6)
    assert multi.head_modules == ("sst_head",)


def test_mixed_batch_loss_is_the_mean_of_each_examples_own_task_loss():
    lm, multi, single = models()
    ids, mask = toy_batch()
    labels = torch.tensor([3, 1, 0, 4, 0])  # rows 0, 3, 4 are sst; rows 1, 2 are para
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "tokens": 9,
             "rows_sst": torch.tensor([0, 3, 4]), "rows_para": torch.tensor([1, 2])}
    loss, tokens = multitask_loss(multi, batch)
    sst = F.cross_entropy(single(ids[[0, 3, 4]], mask[[0, 3, 4]]), labels[[0, 3, 4]], reduction="sum")
    para = F.cross_entropy(two_way_logits(lm, ids[[1, 2]], mask[[1, 2]]), labels[[1, 2]], reduction="sum")
    assert loss.item() == pytest.approx(((sst + para) / 5).item(), rel=1e-5) and tokens == 9
    # A task absent from the batch still runs its head (on no rows): DDP sees every parameter used.
    empty = dict(batch, rows_sst=torch.tensor([], dtype=torch.long), rows_para=torch.tensor([0, 1, 2, 3, 4]),
                 labels=torch.tensor([1, 1, 0, 1, 0]))
    multitask_loss(multi, empty)[0].backward()  # no sst row: the sst head still gets a (zero) gradient
    grad = multi.sst_head.weight.grad
    assert grad is not None and not bool(grad.any())


def data_files(d):
    files = []
    for task, k in (("sst", 5), ("cfimdb", 2)):
        for split, n, test in (("train", 12, False), ("dev", 6, False), ("test", 4, True)):
            rows = keyword_sentiment(n, k + n, k)
            files += [f"--{task}_{split}", str(write_sentiment(d / f"{task}-{split}.csv", rows, test=test))]
    for split, n, labels in (("train", 20, True), ("dev", 6, True), ("test", 4, False)):
        files += [f"--para_{split}", str(write_quora(d / f"q-{split}.csv", quora_pairs(n, n), labels=labels))]
    return files


def test_multitask_script_end_to_end_with_lora_and_exact_resume(tmp_path, tokenizer_dir):
    import multitask
    from tasks.data import PARAPHRASE_HEADER, SENTIMENT_HEADER, read_predictions
    from training import checkpoint

    files = data_files(tmp_path)

    def run(name, *extra):
        return multitask.main(["--model_size", "tiny", "--no_progress", "--tokenizer", str(tokenizer_dir),
                               "--epochs", "2", "--lr", "1e-3", "--peft", "lora", "--lora_r", "2", "--batch_size",
                               "8", "--predictions_dir", str(tmp_path / name / "pred"), "--run_dir",
                               str(tmp_path / name), *files, *extra,
                               # the recipe flags of issue 17 on a real script, resumed exactly too
                               "--optimizer", "radam", "--lr_schedule", "cosine", "--layer_lr_decay", "0.8"])

    full = run("a")
    assert set(full) >= {"accuracy", "sst_accuracy", "cfimdb_accuracy", "para_accuracy", "para_f1"}
    assert full["accuracy"] == pytest.approx((full["sst_accuracy"] + full["cfimdb_accuracy"] +
                                              full["para_accuracy"]) / 3)
    pred = tmp_path / "a" / "pred"
    assert len(read_predictions(pred / "full-model-sst-test-out.csv", SENTIMENT_HEADER, range(5))) == 4
    assert len(read_predictions(pred / "para-dev-output.csv", PARAPHRASE_HEADER, (8505, 3919))) == 6
    assert (tmp_path / "a" / "outputs" / "cfimdb-dev.json").is_file()
    saved = checkpoint.load(tmp_path / "a" / "best.pt")["model"]
    assert saved["format"] == "lora-adapter" and any("sst_head" in k for k in saved["tensors"])
    groups = checkpoint.load(tmp_path / "a" / "last.pt")["optimizer"]["param_groups"]
    assert all(g["decoupled_weight_decay"] for g in groups)  # torch's RAdam built
    assert sorted({round(g["lr_scale"], 6) for g in groups})[:2] == [0.64, 0.8]  # layers 0, 1 of 2: 0.8^2, 0.8
    assert run("b", "--stop_after_epoch", "1") is None
    assert run("b", "--resume", str(tmp_path / "b")) == full
    for name in ("full-model-sst-dev-out.csv", "para-test-output.csv"):
        assert (tmp_path / "a" / "pred" / name).read_bytes() == (tmp_path / "b" / "pred" / name).read_bytes()
