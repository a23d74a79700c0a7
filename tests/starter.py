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


def build_hf_cache(hf_home: Path, repo: str = "gpt2", config=None, seed: int = 0) -> Path:
    """A Hugging Face hub cache under `hf_home` (as `HF_HOME`) holding `repo` the way transformers
    stores a download (`hub/models--{org}--{name}/refs/main` + `snapshots/<hash>/`): a randomly
    initialised transformers GPT2LMHeadModel of `config` (default: transformers' GPT2Config(), the
    real `gpt2` shape) and the GPT-2 tokenizer files.  Returns the snapshot directory."""
    import torch
    import transformers

    entry = Path(hf_home) / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(SNAPSHOT)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config or transformers.GPT2Config())
    model.save_pretrained(snapshot)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, snapshot / name)
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    return snapshot
