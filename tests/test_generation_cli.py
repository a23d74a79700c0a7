"""The generation engine from the command line (training/cli.py add_decoding_args): beam sampling
(--num_beams with a sampling decoding), speculative decoding (--assistant_model, --num_assistant_tokens)
and the compiled decode step (--compile_generation) reach generate() from generate.py and
sonnet_generation.py; speculative greedy text is plain greedy text and its acceptance rate is
reported; bad values end with exit status 2 naming the flag.  generate(on_token=...) passes exactly
the tokens generate returns (generate.py --stream prints through it).

Compiled == eager is proven in tests/test_generation_fast.py; here the spy drops `compile` before
the real generate runs (compiling on the CPU takes tens of seconds)."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import transformers

from common.io import append_jsonl
from conftest import tiny_hf_config

MAX_NEW = 10


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A one-layer random GPT-2 with the full vocabulary: a (poor) draft for the tiny checkpoint."""
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("draft")
    transformers.GPT2LMHeadModel(tiny_hf_config(n_layer=1)).save_pretrained(directory)
    return directory


@pytest.fixture
def spy(monkeypatch):
    """The keyword arguments of every GPT2LMHeadModel.generate call (the real generate still runs)."""
    from models.gpt2 import GPT2LMHeadModel

    calls, real = [], GPT2LMHeadModel.generate

    def recording(self, input_ids, attention_mask=None, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("compile", None)
        return real(self, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "generate", recording)
    return calls


def run_generate(capsys, *argv):
    import generate

    rows = generate.main(["--device", "cpu", *argv])
    return rows, capsys.readouterr()


def base_flags(tiny_hf_checkpoint, tokenizer_dir):
    return ["--model_size", str(tiny_hf_checkpoint[0]), "--tokenizer", str(tokenizer_dir), "--max_new_tokens",
            str(MAX_NEW), "--prompt", "The quick brown fox", "--prompt", "Shall I"]


def test_speculative_greedy_text_is_greedy_text_and_reports_acceptance(tiny_hf_checkpoint, tokenizer_dir, draft_dir,
                                                                       spy, capsys):
    base = [*base_flags(tiny_hf_checkpoint, tokenizer_dir), "--decoding", "greedy", "--batch_size", "2"]
    plain, _ = run_generate(capsys, *base)
    rows, out = run_generate(capsys, *base, "--assistant_model", str(draft_dir), "--num_assistant_tokens", "3")
    assert [r["text"] for r in rows] == [r["text"] for r in plain]
    assert "acceptance rate" in out.err and "acceptance rate" not in out.out
    draft = spy[-1]["assistant_model"]
    assert draft.config.num_hidden_layers == 1 and spy[-1]["num_assistant_tokens"] == 3
    assert spy[-1]["do_sample"] is False and "assistant_model" not in spy[0]


def test_beam_sampling_and_compile_flags_reach_generate(tiny_hf_checkpoint, tokenizer_dir, spy, capsys):
    base = base_flags(tiny_hf_checkpoint, tokenizer_dir)
    rows, _ = run_generate(capsys, *base, "--decoding", "top-k", "--num_beams", "2", "--compile_generation")
    assert {k: spy[-1][k] for k in ("num_beams", "do_sample", "top_k", "compile")} == dict(
        num_beams=2, do_sample=True, top_k=50, compile=True)
    again, _ = run_generate(capsys, *base, "--decoding", "top-k", "--num_beams", "2")
    assert [r["text"] for r in again] == [r["text"] for r in rows] and "compile" not in spy[-1]
    run_generate(capsys, *base, "--decoding", "beam")
    assert (spy[-1]["num_beams"], spy[-1]["do_sample"]) == (4, False)  # beam search's default width


def test_stream_with_speculative_sampling_prints_the_plain_text(tiny_hf_checkpoint, tokenizer_dir, draft_dir, capsys):
    base = [*base_flags(tiny_hf_checkpoint, tokenizer_dir), "--decoding", "top-k", "--top_k", "20", "--seed", "3",
            "--assistant_model", str(draft_dir)]
    rows, plain = run_generate(capsys, *base)
    streamed_rows, streamed = run_generate(capsys, *base, "--stream")
    assert [r["text"] for r in streamed_rows] == [r["text"] for r in rows] and streamed.out == plain.out


def test_sonnet_generation_decodes_speculatively(tmp_path, tokenizer_dir, draft_dir, spy, capsys):
    import sonnet_generation as sg
    from cs224n_files import sonnet_task_files

    f = sonnet_task_files(tmp_path)
    train, dev, gold_path, test = f["train"], f["dev"], f["gold_path"], f["test"]
    sg.main(["--model_size", "tiny", "--no_progress", "--batch_size", "4", "--tokenizer", str(tokenizer_dir),
             "--epochs", "1", "--run_dir", str(tmp_path / "run"), "--sonnet_path", str(train),
             "--held_out_sonnet_path", str(test), "--held_out_dev_path", str(dev), "--gold_dev_path", str(gold_path),
             "--sonnet_out", str(tmp_path / "gen.txt"), "--sonnet_dev_out", str(tmp_path / "dev_gen.txt"),
             "--max_new_tokens", "8", "--decoding", "greedy", "--assistant_model", str(draft_dir)])
    assert spy and all(call["assistant_model"].config.num_hidden_layers == 1 for call in spy)
    assert "[sonnet] speculative decoding: acceptance rate" in capsys.readouterr().out


def other_tokenizer_run(tmp_path, tiny_hf_checkpoint, tokenizer_dir):
    """A training run whose log names a tokenizer with two token ids swapped."""
    import json
    import shutil

    from models.gpt2 import GPT2LMHeadModel
    from training import checkpoint
    from training.config import ModelConfig

    tok = tmp_path / "swapped-tokenizer"
    tok.mkdir()
    shutil.copy(tokenizer_dir / "merges.txt", tok / "merges.txt")
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    a, b = "the", "and"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    run = tmp_path / "run"
    model = GPT2LMHeadModel.from_name_or_path(str(tiny_hf_checkpoint[0]))
    checkpoint.save_atomic({"model": model.state_dict(), "epoch": 1}, run / "best.pt")
    append_jsonl(run / "metrics.jsonl", {"event": "start", "run": {"model": asdict(ModelConfig(
        model_size=str(tiny_hf_checkpoint[0]), tokenizer=str(tok)))}})
    return run


def bad_assistants(tmp_path, tiny_hf_checkpoint, tokenizer_dir, draft_dir):
    small = tmp_path / "small-vocab"
    transformers.GPT2LMHeadModel(tiny_hf_config(vocab_size=1000)).save_pretrained(small)
    (tmp_path / "notes.txt").write_text("not a model")
    return {
        "no-such": (["--assistant_model", str(tmp_path / "missing")], "--assistant_model", "no such"),
        "text-file": (["--assistant_model", str(tmp_path / "notes.txt")], "--assistant_model", "expected a Hugging"),
        "vocab": (["--assistant_model", str(small)], "--assistant_model", "same vocabulary"),
        "tokenizer": (["--assistant_model", str(other_tokenizer_run(tmp_path, tiny_hf_checkpoint, tokenizer_dir))],
                      "--assistant_model", "tokenizer"),
        "beam": (["--assistant_model", str(draft_dir), "--decoding", "beam"], "--assistant_model", "beams"),
        "beam-sampling": (["--assistant_model", str(draft_dir), "--num_beams", "2"], "--assistant_model", "beams"),
        "penalty": (["--assistant_model", str(draft_dir), "--repetition_penalty", "1.2"], "--assistant_model",
                    "repetition_penalty"),
        "compile": (["--assistant_model", str(draft_dir), "--compile_generation"], "--compile_generation",
                    "assistant_model"),
        "k-zero": (["--assistant_model", str(draft_dir), "--num_assistant_tokens", "0"], "--num_assistant_tokens",
                   ">= 1"),
        "k-alone": (["--num_assistant_tokens", "3"], "--num_assistant_tokens", "without assistant_model"),
        "beams-zero": (["--num_beams", "0"], "--num_beams", ">= 1"),
        "greedy-beams": (["--decoding", "greedy", "--num_beams", "3"], "--num_beams", "decoding beam"),
        "one-beam": (["--decoding", "beam", "--num_beams", "1"], "--num_beams", ">= 2 beams"),
        "top-k-unused": (["--top_k", "5"], "--top_k", "unused"),
    }


def test_bad_values_exit_2_naming_the_flag(tiny_hf_checkpoint, tokenizer_dir, draft_dir, tmp_path, capsys):
    import generate
    from training.cli import entry_point

    base = ["--device", "cpu", *base_flags(tiny_hf_checkpoint, tokenizer_dir)]
    for name, (flags, flag, detail) in bad_assistants(tmp_path, tiny_hf_checkpoint, tokenizer_dir, draft_dir).items():
        with pytest.raises(SystemExit) as info:
            entry_point(generate.main)([*base, *flags])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"error: {flag}" in err and detail in err, (name, err)


def test_sonnet_generation_refuses_a_missing_assistant_before_training(tmp_path, capsys):
    import sonnet_generation as sg
    from training.cli import entry_point

    with pytest.raises(SystemExit) as info:
        entry_point(sg.main)(["--model_size", "tiny", "--run_dir", str(tmp_path / "run"),
                              "--assistant_model", str(tmp_path / "missing")])
    assert info.value.code == 2 and "--assistant_model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
