"""The official CS224N starter (../shared/cs224n-starter) as the reference client, for the tests.

Nothing of the starter is copied into the project: tests read its files where they lie.  `writer`
runs one of the starter's own prediction-writing blocks (the `with open(args.<flag>, "w+") as f:`
statements of its task scripts), found by parsing the script, so the expected bytes come from the
starter's code itself; `build_hf_cache` makes the Hugging Face cache a starter user has (under a
temporary HF_HOME), holding a randomly initialised checkpoint.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, TOKENIZER_DIR

STARTER = Path(os.environ.get("CS224N_STARTER", ROOT.parent / "shared" / "cs224n-starter"))
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a made-up commit hash for the cache's snapshot

needs_starter = pytest.mark.skipif(not (STARTER / "classifier.py").is_file() and not os.environ.get("CI"),
                                   reason=f"the CS224N starter is not at {STARTER}")


def writer(script: str, out_flag: str):
    """The starter's block `with open(args.<out_flag>, "w+") as f: ...` of `script` as a function
    f(path, **variables) that runs it, writing to `path` (variables: the ids and predictions lists
    the block reads, e.g. dev_sent_ids, dev_pred)."""
    tree = ast.parse((STARTER / script).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            call = node.items[0].context_expr
            if (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "open" and
                    isinstance(call.args[0], ast.Attribute) and call.args[0].attr == out_flag):
                code = compile(ast.Module(body=[node], type_ignores=[]), f"{STARTER / script}", "exec")
                break
    else:
        raise AssertionError(f"{script}: no `with open(args.{out_flag}, ...)` block (has the starter changed?)")

    def run(path, **variables):
        exec(code, {"args": SimpleNamespace(**{out_flag: str(path)}), **variables})
        return Path(path)
    return run


def build_hf_cache(hf_home: Path, repo: str = "gpt2", config=None, seed: int = 0, eos_first: bool = False) -> Path:
    """A Hugging Face hub cache under `hf_home` (as `HF_HOME`) holding `repo` the way transformers
    stores a download (`hub/models--{org}--{name}/refs/main` + `snapshots/<hash>/`): a randomly
    initialised transformers GPT2LMHeadModel of `config` (default: transformers' GPT2Config(), the
    real `gpt2` shape) and the GPT-2 tokenizer files.  Returns the snapshot directory.

    `eos_first`: make `<|endoftext|>` by far the likeliest next token everywhere (the final LayerNorm's
    bias gets a component of norm 8 along a unit vector u and the tied EOS embedding becomes 5 u, so
    its logit is ~40 against ~N(0, 0.6) for the others), so that the starter's sampling loop, which
    re-runs the whole prefix for each of its 128 steps, stops at once on a CPU.  The hidden states
    stay of the usual size (each bias component moves by ~0.3), so comparisons of them keep their meaning."""
    import torch
    import transformers

    entry = Path(hf_home) / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(SNAPSHOT)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config or transformers.GPT2Config())
    if eos_first:
        with torch.no_grad():
            u = torch.randn(model.config.n_embd)
            u /= u.norm()
            model.transformer.ln_f.bias += 8 * u
            model.transformer.wte.weight[model.config.eos_token_id] = 5 * u
    model.save_pretrained(snapshot)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, snapshot / name)
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    return snapshot


def assert_starter_layout(path: Path, tmp: Path) -> None:
    """`path` (a prediction file one of OUR scripts wrote) is byte for byte what the starter's own
    writer makes of the same rows: its rows are read back and written again by the starter's block."""
    from tasks.data import NO_TOKEN_ID, PARAPHRASE_HEADER, SENTIMENT_HEADER, YES_TOKEN_ID, read_predictions
    from tasks.sonnets import GENERATED_HEADER, read_generated_sonnets

    if not (STARTER / "classifier.py").is_file():
        return  # needs_starter decides elsewhere whether that is allowed
    first = Path(path).read_text(encoding="utf-8").split("\n", 1)[0]
    if first.strip() == GENERATED_HEADER:
        sonnets = read_generated_sonnets(path)
        theirs = writer("sonnet_generation.py", "sonnet_out")(
            tmp / "starter-sonnets.txt", generated_sonnets=[(i, f"{text}\n\n") for i, text in sonnets])
    elif first == PARAPHRASE_HEADER:
        rows = read_predictions(path, PARAPHRASE_HEADER, (YES_TOKEN_ID, NO_TOKEN_ID))
        theirs = writer("paraphrase_detection.py", "para_test_out")(
            tmp / "starter-para.csv", test_para_sent_ids=[i for i, _ in rows], test_para_y_pred=[v for _, v in rows])
    else:
        rows = read_predictions(path, SENTIMENT_HEADER, range(10))
        theirs = writer("classifier.py", "test_out")(
            tmp / "starter-sentiment.csv", test_sent_ids=[i for i, _ in rows], test_pred=[v for _, v in rows])
    assert Path(path).read_bytes() == theirs.read_bytes(), f"{path} differs from the starter's layout"
