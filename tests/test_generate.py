"""generate.py: greedy text equals transformers' generate on the same checkpoint; a training run's
weights and base model come from its run directory; streamed text is the non-streamed text and is
printed while generate() runs (multi-byte characters held back whole); --sonnet stops at line 14;
bad flag combinations are refused."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from common.io import append_jsonl, read_jsonl
from training.cli import UsageError

MAX_NEW = 12


def run_generate(capsys, *argv):
    import generate

    rows = generate.main(["--device", "cpu", *argv])
    return rows, capsys.readouterr().out


def hf_greedy(hf, tokenizer, prompt: str, max_new: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    new = out.tolist()
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    return prompt + tokenizer.decode(new)


def test_greedy_text_matches_transformers(tiny_hf_checkpoint, tokenizer_dir, capsys):
    from models.tokenizer import load_tokenizer

    directory, hf = tiny_hf_checkpoint
    tok = load_tokenizer(str(tokenizer_dir))
    prompts = ["The quick brown fox", "Shall I compare thee"]
    rows, out = run_generate(capsys, "--model_size", str(directory), "--tokenizer", str(tokenizer_dir),
                             "--decoding", "greedy", "--max_new_tokens", str(MAX_NEW), "--batch_size", "2",
                             *[a for p in prompts for a in ("--prompt", p)])
    assert [r["text"] for r in rows] == [hf_greedy(hf, tok, p, MAX_NEW) for p in prompts]
    assert out.split("\n")[0] == "=== prompt 1 ===" and rows[1]["text"] in out


def test_checkpoint_run_dir_supplies_weights_and_base_model(tiny_hf_checkpoint, tokenizer_dir, tmp_path, capsys):
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from training import checkpoint
    from training.config import ModelConfig

    directory, _ = tiny_hf_checkpoint
    model = GPT2LMHeadModel.from_name_or_path(str(directory)).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))  # the "trained" weights differ from the base checkpoint
    run = tmp_path / "run"
    checkpoint.save_atomic({"model": model.state_dict(), "epoch": 1}, run / "best.pt")
    append_jsonl(run / "metrics.jsonl", {"event": "start", "run": {"model": asdict(ModelConfig(model_size=str(directory),
                                                                                                 tokenizer=str(tokenizer_dir)))}})
    rows, _ = run_generate(capsys, "--checkpoint", str(run), "--decoding", "greedy", "--max_new_tokens", "8",
                           "--prompt", "Once upon a time")
    tok = load_tokenizer(str(tokenizer_dir))
    ids = torch.tensor([tok.encode("Once upon a time")])
    expected = model.generate(ids, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    new = expected[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert rows[0]["text"] == "Once upon a time" + tok.decode(new)
    base, _ = run_generate(capsys, "--model_size", str(directory), "--tokenizer", str(tokenizer_dir), "--decoding",
                           "greedy", "--max_new_tokens", "8", "--prompt", "Once upon a time")
    assert base[0]["text"] != rows[0]["text"]


def test_stream_prints_the_same_text_while_generating(tiny_hf_checkpoint, tokenizer_dir, capsys, tmp_path):
    directory, _ = tiny_hf_checkpoint
    common = ["--model_size", str(directory), "--tokenizer", str(tokenizer_dir), "--decoding", "top-k", "--top_k", "20",
              "--temperature", "1.0", "--max_new_tokens", str(MAX_NEW), "--num_samples", "2", "--prompt", "Hello",
              "--prompt", "Why", "--seed", "5"]
    rows, plain = run_generate(capsys, *common, "--out", str(tmp_path / "a.jsonl"))
    streamed_rows, streamed = run_generate(capsys, *common, "--stream")
    assert streamed == plain and [r["text"] for r in streamed_rows] == [r["text"] for r in rows]
    assert len({r["text"] for r in rows}) == 4  # four different samples
    assert [(r["prompt_id"], r["sample"]) for r in read_jsonl(tmp_path / "a.jsonl")] == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_token_stream_writes_during_generation_and_holds_partial_characters(tiny_hf_checkpoint, tokenizer_dir):
    from experiments.textgen import StreamingLM, TokenStream
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    writes = []
    stream = TokenStream(tok, write=lambda s: writes.append((s, stream.finished)), flush=lambda: None)
    emoji = tok.encode("ok 😀 fine")
    assert len(tok.encode("😀")) > 1  # one character, several byte-level tokens
    for t in emoji:
        stream.put(torch.tensor([t]))
    assert "".join(s for s, _ in writes) == tok.decode(emoji) and not any("\ufffd" in s for s, _ in writes)

    model = GPT2LMHeadModel.from_name_or_path(str(tiny_hf_checkpoint[0])).eval()
    writes.clear()
    ids = torch.tensor([tok.encode("Hello there")])
    out = StreamingLM(model, stream).generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
    assert out.shape[1] == ids.shape[1] + MAX_NEW
    assert sum(1 for _, finished in writes if not finished) >= MAX_NEW - 2  # printed before generate returned
    assert "".join(s for s, _ in writes) == tok.decode(out[0, ids.shape[1]:].tolist())


def newline_model_dir(tmp_path, tiny_hf_checkpoint):
    """A tiny checkpoint whose every next token is "\\n" (id 198): constant final hidden state along its embedding."""
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_checkpoint[0])
    with torch.no_grad():
        emb = hf.transformer.wte.weight
        emb[198] = 10 * emb[198] / emb[198].norm() * emb.norm(dim=1).max()
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(emb[198])
    hf.save_pretrained(tmp_path / "nl")
    return tmp_path / "nl"


def test_sonnet_mode_stops_at_line_14(tiny_hf_checkpoint, tokenizer_dir, tmp_path, capsys):
    from tasks.sonnets import read_generated_sonnets

    directory = newline_model_dir(tmp_path, tiny_hf_checkpoint)
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("Header\n\n7\nline one\nline two\nline three\n\n9\nfirst\nsecond\nthird\n")
    base = ["--model_size", str(directory), "--tokenizer", str(tokenizer_dir), "--decoding", "greedy",
            "--max_new_tokens", "40", "--prompt_file", str(prompts)]
    _, free = run_generate(capsys, *base, "--each_line", "--stream")
    assert free.count("\n") >= 40  # without the sonnet rule every one of the 40 tokens is a newline
    rows, out = run_generate(capsys, *base, "--sonnet", "--stream", "--sonnet_out", str(tmp_path / "gen.txt"))
    first = out.split("=== prompt 9 ===")[0]
    assert first.count("\n") == 1 + 2 + 12 + 2  # header line, the prompt's 2, the 12 that end line 14, separator
    assert [n for n, _ in read_generated_sonnets(tmp_path / "gen.txt")] == [0, 1]  # the starter's positions
    assert rows[0]["text"] == "line one\nline two\nline three"


@pytest.mark.parametrize("flags, message", [
    (["--num_samples", "2", "--decoding", "greedy"], "gives the same text every time"),
    (["--stream", "--decoding", "beam", "--num_beams", "2"], "--stream prints one row"),
    (["--stream", "--batch_size", "2"], "--stream prints one row"),
    (["--sonnet_out", "x.txt"], "--sonnet_out goes with --sonnet"),
    (["--each_line"], "--each_line splits the --prompt_file"),
])
def test_bad_flag_combinations(flags, message):
    import generate

    with pytest.raises(UsageError, match=message):
        generate.parse_args(["--prompt", "x", *flags] if "--each_line" not in flags else flags)


def test_checkpoint_without_a_log_asks_for_the_model(tmp_path, capsys):
    from common.errors import ConfigError

    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="name the base model") as info:
        run_generate(capsys, "--checkpoint", str(tmp_path / "run"), "--prompt", "x")
    assert info.value.field == "model_size"


def test_a_runs_architecture_overrides_follow_its_checkpoint(tmp_path):
    from experiments.textgen import resolve_model
    from training.config import ModelConfig

    append_jsonl(tmp_path / "metrics.jsonl", {"event": "start", "run": {"model": asdict(ModelConfig(
        model_size="tiny", attention="local", attention_window=16, hidden_dropout=0.3))}})
    alone = resolve_model(None, str(tmp_path))
    assert (alone.spec, alone.overrides) == ("tiny", {"attention": "local", "attention_window": 16})  # no dropout
    named = resolve_model("tiny", str(tmp_path), overrides={"attention_window": 8})
    assert named.overrides == {"attention": "local", "attention_window": 8}  # the flag wins
