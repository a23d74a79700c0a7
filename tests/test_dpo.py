"""DPO (objectives/dpo.py, objectives/pairs.py, dpo.py): the loss against a hand computation with
transformers' models, log 2 when policy == reference, gradients only into the policy, response-only
log-probabilities, the pair constructions, and the script's two stages end to end with exact resume."""
from __future__ import annotations

import copy

import json
import math
import random

import pytest
import torch

from cs224n_files import quora_pairs, write_quora, write_sonnets
from models.gpt2 import GPT2LMHeadModel
from objectives import pairs as P
from objectives.dpo import (DPOConfig, EncodedPairs, ReferenceLogprobs, all_logprobs, dpo_loss, pair_rows,
                            preference_logs, response_logprobs)

RHYMES = [("day", "away"), ("night", "light"), ("heart", "part"), ("eyes", "skies"), ("true", "new"),
          ("sing", "spring"), ("fair", "air"), ("praise", "days")]
FILL = "my love doth keep the sweet and golden hour upon thy face".split()


def rhyming_sonnet(rng: random.Random, words: tuple[int, int] = (4, 6)) -> str:
    """14 lines, ABAB CDCD EFEF GG, line-final words from rhyming pairs, `words` filler words before them."""
    pairs = rng.sample(RHYMES, 7)
    ends = []
    for a, b in pairs[:3]:  # three quatrains
        c, d = rng.choice([p for p in RHYMES if p != (a, b)])
        ends += [a, c, b, d]
    ends += list(pairs[6])
    return "\n".join(" ".join(rng.choice(FILL) for _ in range(rng.randint(*words))).capitalize() + f" {w},"
                     for w in ends)


def models_from_hf(tmp_path):
    """(our policy, our reference, transformers' policy, transformers' reference): two tiny random GPT-2s."""
    import transformers

    from conftest import tiny_hf_config

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        hf = transformers.GPT2LMHeadModel(tiny_hf_config(vocab_size=97)).eval()
        hf.save_pretrained(tmp_path / f"m{seed}")
        out.append((GPT2LMHeadModel.from_pretrained(str(tmp_path / f"m{seed}")).eval(), hf))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def toy_pairs(n=3, seed=0) -> EncodedPairs:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.randint(1, 97, (k,), generator=g).tolist()  # noqa: E731
    return EncodedPairs([rnd(2 + i) for i in range(n)], [rnd(3 + i % 2) for i in range(n)],
                        [rnd(1 + 2 * i) for i in range(n)], ["a"] * n)


def hand_logprob(hf, prompt, response) -> float:
    """sum_t log p(response[t] | prompt + response[:t]) from transformers' model, one unpadded row."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    return sum(logp[len(prompt) + t - 1, tok].item() for t, tok in enumerate(response))


def test_loss_equals_a_hand_computation_with_transformers(tmp_path):
    policy, reference, hf_policy, hf_reference = models_from_hf(tmp_path)
    pairs, beta = toy_pairs(), 0.3
    batch = pair_rows(pairs, [0, 1, 2], pad_id=0)
    ref = all_logprobs(reference, pairs, 2, 0, torch.device("cpu"), "fp32")
    chosen, rejected = response_logprobs(policy, batch)
    for e, kind in ((0.0, "sigmoid"), (0.2, "sigmoid"), (0.0, "ipo")):
        losses, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], DPOConfig(beta, e, kind))
        for i in range(3):
            pw, pl = (hand_logprob(hf_policy, pairs.prompts[i], r[i]) for r in (pairs.chosen, pairs.rejected))
            rw, rl = (hand_logprob(hf_reference, pairs.prompts[i], r[i]) for r in (pairs.chosen, pairs.rejected))
            h = (pw - rw) - (pl - rl)
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
            want = ((h - 1 / (2 * beta)) ** 2 if kind == "ipo"
                    else -(1 - e) * math.log(sig(beta * h)) - e * math.log(sig(-beta * h)))
            assert losses[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert cr[i].item() == pytest.approx(beta * (pw - rw), rel=1e-5, abs=1e-6)
            assert rr[i].item() == pytest.approx(beta * (pl - rl), rel=1e-5, abs=1e-6)


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(tmp_path):
    policy, _, _, _ = models_from_hf(tmp_path)
    pairs = toy_pairs(4, seed=3)
    ref = all_logprobs(policy, pairs, 3, 0, torch.device("cpu"), "fp32")
    chosen, rejected = response_logprobs(policy, pair_rows(pairs, range(4), 0))
    losses, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], DPOConfig(beta=0.5))
    assert torch.allclose(losses, torch.full((4,), math.log(2)), atol=1e-5)
    logs = preference_logs(cr, rr)
    assert logs["reward_accuracy"] == 0 and abs(logs["reward_margin"]) < 1e-5


def test_gradients_reach_only_the_policy(tmp_path):
    policy, _, _, _ = models_from_hf(tmp_path)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference = copy.deepcopy(policy)  # trainable on purpose: only the way the reference is scored protects it
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = toy_pairs()
    ref = all_logprobs(reference, pairs, 2, 0, torch.device("cpu"), "fp32")  # (N, 2): what train() precomputes
    losses, _, _ = dpo_loss(*response_logprobs(policy, pair_rows(pairs, [0, 1, 2], 0)), ref[:, 0], ref[:, 1],
                            DPOConfig())
    losses.mean().backward()
    assert all(p.requires_grad and p.grad is None for p in reference.parameters())
    assert sum(p.grad.abs().sum().item() for p in policy.parameters()) > 0


def test_log_probs_cover_the_response_only_and_ignore_padding(tmp_path):
    policy, _, hf_policy, _ = models_from_hf(tmp_path)
    pairs = toy_pairs(3, seed=7)
    batch = pair_rows(pairs, [2, 0, 1], pad_id=5)
    assert (batch["targets"] != -100).sum(1).tolist() == [len(pairs.chosen[i]) for i in (2, 0, 1)] + \
        [len(pairs.rejected[i]) for i in (2, 0, 1)]
    chosen, rejected = response_logprobs(policy, batch)
    for k, i in enumerate((2, 0, 1)):
        assert chosen[k].item() == pytest.approx(hand_logprob(hf_policy, pairs.prompts[i], pairs.chosen[i]), abs=1e-4)
        assert rejected[k].item() == pytest.approx(hand_logprob(hf_policy, pairs.prompts[i], pairs.rejected[i]),
                                                   abs=1e-4)


def test_sonnet_pairs_are_the_corruptions_they_claim():
    from evaluation.sonnet_form import rhyme_adherence

    rng = random.Random(0)
    sonnets = [(n, rhyming_sonnet(rng)) for n in range(1, 6)]
    pairs, stats = P.sonnet_pairs(sonnets, ["shuffle", "rhyme", "truncate"], prompt_lines=3, seed=1)
    assert stats["by_kind"] == {"rhyme": 5, "shuffle": 5, "truncate": 5} and stats["skipped"] == {}
    for pair in pairs:
        text = dict(sonnets)[int(pair.source)]
        assert pair.prompt + pair.chosen == text and pair.prompt.count("\n") == 2  # prompt: 3 lines
        real, bad = pair.chosen.split("\n")[1:], pair.rejected.split("\n")[1:]
        if pair.kind == "shuffle":
            assert sorted(bad) == sorted(real) and bad != real
        elif pair.kind == "truncate":
            assert 1 <= len(bad) <= len(real) // 2 and bad == real[:len(bad)]
        else:
            assert len(bad) == len(real) and [b.rsplit(" ", 1)[0] for b in bad] == [r.rsplit(" ", 1)[0] for r in real]
            head = pair.prompt.split("\n")
            assert rhyme_adherence(head + bad) < rhyme_adherence(head + real)
    samples = {n: P.split_sonnet(t, 3)[0] + "\nA line the model wrote" for n, t in sonnets}
    sampled, _ = P.sonnet_pairs(sonnets, ["sample"], samples=samples)
    assert [p.rejected for p in sampled] == ["\nA line the model wrote"] * 5


def test_paraphrase_pairs_prefer_the_right_answer(tmp_path):
    from tasks.data import read_paraphrase

    path = write_quora(tmp_path / "q.csv", quora_pairs(12, seed=2))
    examples = read_paraphrase(path)
    pairs, stats = P.paraphrase_pairs(examples)
    assert stats["pairs"] == 12 and stats["chosen_yes"] == sum(e.label for e in examples)
    for pair, e in zip(pairs, examples):
        assert (pair.chosen, pair.rejected) == (("yes", "no") if e.label else ("no", "yes"))
        assert pair.prompt == P.cloze_prompt(e.sentence1, e.sentence2) and pair.source == e.id


def sonnet_pair_files(tmp_path, tokenizer_dir):
    import dpo

    rng = random.Random(4)
    short = (1, 2)  # short lines: fast steps
    train = write_sonnets(tmp_path / "sonnets.txt", [(n, rhyming_sonnet(rng, short)) for n in range(1, 7)])
    dev = write_sonnets(tmp_path / "dev.txt", [(n, rhyming_sonnet(rng, short)) for n in (132, 133)])
    for src, out in ((train, "train.jsonl"), (dev, "dev.jsonl")):
        dpo.main(["pairs", "--task", "sonnet", "--sonnets", str(src), "--kinds", "shuffle,truncate",
                  "--out", str(tmp_path / out)])
    return tmp_path / "train.jsonl", tmp_path / "dev.jsonl"


def dpo_train_args(tmp_path, tokenizer_dir, train, dev, run, *extra):
    return ["train", "--task", "sonnet", "--pairs", str(train), "--dev_pairs", str(dev), "--model_size", "tiny",
            "--tokenizer", str(tokenizer_dir), "--no_progress", "--batch_size", "4", "--lr", "2e-3",
            "--warmup_ratio", "0", "--beta", "0.5", "--run_dir", str(run), *extra]


def test_dpo_script_trains_logs_rewards_and_resumes_exactly(tmp_path, tokenizer_dir):
    import dpo
    from common.io import read_jsonl_log
    from training import checkpoint

    train, dev = sonnet_pair_files(tmp_path, tokenizer_dir)
    records = P.read_pairs(train)
    assert len(records) == 12 and json.loads((tmp_path / "train.jsonl.stats.json").read_text())["pairs"] == 12
    full = dpo.main(dpo_train_args(tmp_path, tokenizer_dir, train, dev, tmp_path / "a", "--epochs", "2"))
    assert 0 <= full["reward_accuracy"] <= 1 and {"reward_accuracy_shuffle", "reward_accuracy_truncate"} <= set(full)
    # Learnt: a truncated sonnet (which stops early: EOS after its last line) is a rejected kind any model can
    # learn to disprefer on unseen sonnets; a shuffle needs a model that knows language.
    assert full["reward_accuracy_truncate"] == 1.0 and full["reward_margin"] > 0
    log = read_jsonl_log(tmp_path / "a" / "metrics.jsonl")
    epoch = [r for r in log if r["event"] == "epoch"][0]
    terms = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
    assert {f"train_{k}" for k in terms} <= set(epoch)
    saved = checkpoint.load(tmp_path / "a" / "last.pt")["callbacks"][0]["values"]
    assert saved["train"].shape == (12, 2) and saved["dev"].shape == (4, 2)
    # The reference is the starting model: its log-probs, recomputed independently, equal the saved ones.
    from training.build import seed_everything

    seed_everything(11711)
    start = GPT2LMHeadModel.from_name_or_path("tiny").eval()
    from models.tokenizer import load_tokenizer
    from objectives.dpo import encode_text_pairs

    enc, _ = encode_text_pairs(load_tokenizer(str(tokenizer_dir)), P.read_pairs(dev), 512, append_eos=True)
    assert torch.allclose(all_logprobs(start, enc, 4, 50256, torch.device("cpu"), "fp32"), saved["dev"], atol=1e-5)

    assert dpo.main(dpo_train_args(tmp_path, tokenizer_dir, train, dev, tmp_path / "b", "--epochs", "2",
                                   "--stop_after_epoch", "1")) is None
    resumed = dpo.main(dpo_train_args(tmp_path, tokenizer_dir, train, dev, tmp_path / "b", "--epochs", "2",
                                      "--resume", str(tmp_path / "b")))
    assert resumed == full
    a, b = (checkpoint.load(tmp_path / d / "best.pt")["model"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --init_weights: a run's weights are the start and the reference (no training: the policy is the reference).
    again = dpo.main(dpo_train_args(tmp_path, tokenizer_dir, train, dev, tmp_path / "c", "--epochs", "0",
                                    "--init_weights", str(tmp_path / "a")))
    assert again["policy_accuracy"] == again["reference_policy_accuracy"] == full["policy_accuracy"]
    assert again["loss"] == pytest.approx(math.log(2))


def test_paraphrase_dpo_encodes_the_detectors_prompt(tmp_path, tokenizer_dir):
    import dpo
    from models.tokenizer import load_tokenizer
    from tasks.paraphrase import encode_pairs

    quora = write_quora(tmp_path / "q.csv", quora_pairs(10, seed=5))
    dpo.main(["pairs", "--task", "paraphrase", "--quora", str(quora), "--out", str(tmp_path / "p.jsonl")])
    records = P.read_pairs(tmp_path / "p.jsonl", ("sentence1", "sentence2"))
    tok = load_tokenizer(str(tokenizer_dir))
    pairs, _ = dpo.encode_paraphrase(tok, records, tmp_path / "p.jsonl", 512)
    want, _ = encode_pairs(tok, [(r["sentence1"], r["sentence2"]) for r in records], 511)
    assert pairs.prompts == want
    assert {tuple(c + r) for c, r in zip(pairs.chosen, pairs.rejected)} <= {(8505, 3919), (3919, 8505)}
    out = dpo.main(["train", "--task", "paraphrase", "--pairs", str(tmp_path / "p.jsonl"), "--dev_pairs",
                    str(tmp_path / "p.jsonl"), "--model_size", "tiny", "--tokenizer", str(tokenizer_dir),
                    "--no_progress", "--epochs", "1", "--run_dir", str(tmp_path / "run"), "--peft", "lora",
                    "--lora_r", "2", "--lr", "1e-2", "--export_hf", str(tmp_path / "hf")])
    assert 0 <= out["policy_accuracy"] <= 1 and "reference_policy_accuracy" in out
    assert abs(out["loss"] - math.log(2)) > 1e-3  # the policy moved away from the reference
    # --export_hf: the DPO policy (LoRA merged) as a Hugging Face directory. Read back, it reproduces the
    # run's dev DPO loss against the reference log-probs saved in last.pt, and transformers' own model
    # computes the same logits from it.
    import transformers

    from objectives.dpo import preference_metrics
    from training import checkpoint

    exported = GPT2LMHeadModel.from_name_or_path(str(tmp_path / "hf")).eval()
    reference = checkpoint.load(tmp_path / "run" / "last.pt")["callbacks"][0]["values"]["dev"]
    policy = all_logprobs(exported, pairs, 4, 50256, torch.device("cpu"), "fp32")
    assert preference_metrics(policy, reference, pairs.kinds, DPOConfig())["loss"] == pytest.approx(out["loss"],
                                                                                                   abs=1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([pairs.prompts[0]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, exported(ids), atol=1e-5)
    bad = [dict(r, prompt=r["prompt"] + " ") for r in records]
    with pytest.raises(Exception, match="not the detector's prompt"):
        dpo.encode_paraphrase(tok, bad, "p.jsonl", 512)


def test_sample_pairs_hold_the_models_own_completions(tmp_path, tokenizer_dir):
    import dpo

    rng = random.Random(6)
    src = write_sonnets(tmp_path / "s.txt", [(n, rhyming_sonnet(rng, (1, 2))) for n in (1, 2)])
    stats = dpo.main(["pairs", "--task", "sonnet", "--sonnets", str(src), "--kinds", "sample", "--model_size", "tiny",
                      "--tokenizer", str(tokenizer_dir), "--max_new_tokens", "6", "--decoding", "greedy",
                      "--out", str(tmp_path / "p.jsonl")])
    records = P.read_pairs(tmp_path / "p.jsonl")
    assert stats["by_kind"] == {"sample": 2} and [r["kind"] for r in records] == ["sample", "sample"]
    # Greedy decoding: the same completions again, so the rejected responses are the model's, reproducibly.
    dpo.main(["pairs", "--task", "sonnet", "--sonnets", str(src), "--kinds", "sample", "--model_size", "tiny",
              "--tokenizer", str(tokenizer_dir), "--max_new_tokens", "6", "--decoding", "greedy",
              "--out", str(tmp_path / "q.jsonl")])
    assert P.read_pairs(tmp_path / "q.jsonl") == records
    assert all(r["rejected"] != r["chosen"] and r["prompt"].count("\n") == 2 for r in records)


def test_bad_flags_and_files_are_refused(tmp_path, capsys):
    import dpo
    from common.errors import ConfigError, DataError, UserError

    with pytest.raises(UserError, match="--kinds: unknown"):
        dpo.parse_args(["pairs", "--task", "sonnet", "--kinds", "shuffle,bogus", "--out", "x.jsonl"])
    with pytest.raises(UserError, match="--kinds is for --task sonnet"):
        dpo.parse_args(["pairs", "--task", "paraphrase", "--kinds", "shuffle", "--out", "x.jsonl"])
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=0.0).validate()
    # From the command line: exit status 2, the flag named, before any file is read or model built.
    from training.cli import entry_point

    train = ["train", "--task", "sonnet", "--pairs", "missing.jsonl", "--dev_pairs", "missing.jsonl"]
    for flags, name in ((["--beta", "-1"], "--beta"), (["--label_smoothing", "0.5"], "--label_smoothing"),
                        (["--dpo_loss", "ipo", "--label_smoothing", "0.1"], "--label_smoothing")):
        with pytest.raises(SystemExit) as exc:
            entry_point(dpo.main)(train + flags)
        assert exc.value.code == 2 and name in capsys.readouterr().err
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.1, dpo_loss="ipo").validate()
    (tmp_path / "same.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(DataError, match="record 1: chosen and rejected are the same"):
        P.read_pairs(tmp_path / "same.jsonl")


def test_reference_callback_keeps_its_values_through_state_dict():
    """In the trainer's order: on_model_ready (computes unless the trainer is resuming), then, resuming,
    load_state_dict from last.pt, then on_fit_start."""

    class FakeTrainer:
        def __init__(self, resuming):
            self.model, self.resuming = torch.nn.Linear(1, 1), resuming

    fresh = ReferenceLogprobs(lambda m: {"train": torch.ones(2, 2)})
    with pytest.raises(RuntimeError):
        fresh["train"]
    fresh.on_model_ready(FakeTrainer(resuming=False))
    fresh.on_fit_start(FakeTrainer(resuming=False))
    assert torch.equal(fresh["train"], torch.ones(2, 2))
    resumed = ReferenceLogprobs(lambda m: pytest.fail("a resumed run does not recompute"))
    resumed.on_model_ready(FakeTrainer(resuming=True))
    resumed.load_state_dict(fresh.state_dict())
    resumed.on_fit_start(FakeTrainer(resuming=True))
    assert torch.equal(resumed["train"], torch.ones(2, 2))
    missing = ReferenceLogprobs(lambda m: {})
    missing.on_model_ready(FakeTrainer(resuming=True))
    with pytest.raises(RuntimeError, match="no reference"):
        missing.on_fit_start(FakeTrainer(resuming=True))


def test_dpo_under_two_gloo_ranks_equals_one_process(tmp_path):
    """DDP and FSDP: 2 ranks x batch 2 == 1 process x batch 4 (11 pairs: the last global batch splits 2 + 1):
    the same reference log-probs (computed once, sharded over the ranks), weights and dev metrics."""
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    import dpo_worker
    import speed_worker

    common = ["--epochs", "2", "--lr", "1e-2"]
    single = dpo_worker.run(str(tmp_path / "single"), ["--batch_size", "4", *common])
    assert single["dev"][-1]["loss"] < math.log(2) - 1e-3  # it learnt something to compare
    runs = {"ddp": ["--batch_size", "2", *common], "fsdp": ["--batch_size", "2", "--fsdp", *common]}
    mp.spawn(speed_worker.spawn_worker, nprocs=2,
             args=(2, speed_worker.free_port(), str(tmp_path), runs, dpo_worker.run))
    for engine in runs:
        for rank in (0, 1):
            out = torch.load(tmp_path / f"{engine}-rank{rank}.pt", weights_only=True)
            torch.testing.assert_close(out["reference"], single["reference"], rtol=1e-5, atol=1e-5)
            assert [d["loss"] for d in out["dev"]] == pytest.approx([d["loss"] for d in single["dev"]], rel=1e-5)
            if rank == 0:  # the full state dict is gathered on rank 0 (under FSDP the others get none)
                for name, value in single["state"].items():
                    torch.testing.assert_close(out["state"][name], value, rtol=1e-5, atol=1e-5, msg=f"{engine} {name}")


def test_dpo_with_reft_interventions(tmp_path, tokenizer_dir):
    """--peft reft (first / last positions, found from the mask the model's forward sees): the reference is
    the policy as training starts, fresh interventions included, so the untrained loss is log 2; a trained
    run keeps only the interventions in its checkpoint."""
    import dpo
    from training import checkpoint

    train, dev = sonnet_pair_files(tmp_path, tokenizer_dir)
    reft = ["--peft", "reft", "--reft_rank", "2", "--reft_positions", "f1+l1"]
    start = dpo.main(dpo_train_args(tmp_path, tokenizer_dir, train, dev, tmp_path / "a", "--epochs", "0", *reft))
    assert start["loss"] == pytest.approx(math.log(2)) and start["reward_margin"] == 0
    trained = dpo.main(dpo_train_args(tmp_path, tokenizer_dir, train, dev, tmp_path / "b", "--epochs", "1", *reft))
    assert trained["loss"] != pytest.approx(math.log(2))
    assert checkpoint.load(tmp_path / "b" / "best.pt")["model"]["format"] == "reft-adapter"
