"""The official CS224N starter (../shared/cs224n-starter) run unchanged on our code: its own
optimizer_test.py and sanity_check.py with our models/, modules/, config.py and optimizer.py dropped
into a copy of it, and its three task scripts once a student's TODOs are filled in (a minimal
solution written here, against the starter's API), offline, against a randomly initialised `gpt2` in
a Hugging Face cache laid out as transformers leaves it (HF_HOME/hub/models--gpt2).  What the task
scripts write must pass our prepare_submit.py and be byte-identical to what our writers make of the
same predictions.

The cache holds the real `gpt2` shape (the starter asks for d=768, l=12, num_heads=12, which our
from_pretrained checks against the checkpoint), so the two script tests are SLOW (tens of seconds
each on a busy 2-core CPU; marked `slow`).  Its EOS token is made the likeliest next token
(tests/starter.py build_hf_cache eos_first) and sonnet_generation.py runs with `--lr 0` (its one
training step then leaves the weights unchanged), so the starter's 128-step uncached sampling loop
stops at once: at ~1 s per step for this model on one CPU core it would take minutes otherwise.  `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`: the starter's classifier.py and paraphrase_detection.py
`torch.load` checkpoints holding namespaces without `weights_only=False`, which torch >= 2.6 refuses
by default (the starter pins an older torch); the variable restores the default the starter was
written for and touches nothing of ours.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prepare_submit
from conftest import ROOT
from cs224n_files import quora_pairs, write_quora, write_sentiment, write_sonnets
from starter import STARTER, build_hf_cache, needs_starter
from tasks.data import (NO_TOKEN_ID, PARAPHRASE_HEADER, SENTIMENT_HEADER, YES_TOKEN_ID, read_predictions,
                        write_paraphrase_predictions, write_sentiment_predictions)
from tasks.sonnets import read_generated_sonnets, write_generated_sonnets

pytestmark = needs_starter
OURS = ("models", "modules", "config.py", "optimizer.py")  # what a student drops into the starter

# A minimal student solution for each TODO (`raise NotImplementedError`) of the starter's task scripts,
# in file order; our own code against the starter's API (from_pretrained, forward's dict, hidden_state_to_token).
STUDENT = {
    "classifier.py": [
        """self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
self.classifier_head = torch.nn.Linear(config.hidden_size, self.num_labels)""",
        """last_token = self.gpt(input_ids, attention_mask)['last_token']
return self.classifier_head(self.dropout(last_token))"""],
    "paraphrase_detection.py": [
        """logits = self.gpt.hidden_state_to_token(self.gpt(input_ids, attention_mask)['last_token'])
only_yes_no = torch.full_like(logits, float('-inf'))
only_yes_no[:, [8505, 3919]] = 0.0  # the answer is "yes" or "no"
return logits + only_yes_no"""],
    "sonnet_generation.py": [
        """return self.gpt.hidden_state_to_token(self.gpt(input_ids, attention_mask)['last_hidden_state'])"""],
}


def starter_copy(dest: Path) -> Path:
    """The starter with our models/, modules/, config.py, optimizer.py in place of its own."""
    shutil.copytree(STARTER, dest, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    for name in OURS:
        shutil.rmtree(dest / name, ignore_errors=True) if (dest / name).is_dir() else (dest / name).unlink()
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(ROOT / name, dest / name)
    return dest


def fill_todos(path: Path, solutions: list[str]) -> None:
    """Replace the i-th `raise NotImplementedError` of `path` by solutions[i], at its indentation."""
    text = path.read_text(encoding="utf-8")
    spots = list(re.finditer(r"^([ \t]*)raise NotImplementedError[ \t]*$", text, flags=re.M))
    assert len(spots) == len(solutions), f"{path.name}: {len(spots)} TODOs (has the starter changed?)"
    for m, code in reversed(list(zip(spots, solutions))):
        body = "\n".join(m.group(1) + line for line in code.split("\n"))
        text = text[:m.start()] + body + text[m.end():]
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def starter_env(tmp_path_factory, tokenizer_dir):
    """The environment of a starter user: HF_HOME with `gpt2` cached, offline, no project variables."""
    home = tmp_path_factory.mktemp("hf_home")
    build_hf_cache(home, "gpt2", eos_first=True)
    env = {k: v for k, v in os.environ.items() if k not in ("GPT2_TOKENIZER_DIR", "PYTHONPATH")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", TQDM_DISABLE="1")
    return env


def run_starter(copy: Path, env: dict, script: str, *args: str, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, script, *args], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"starter {script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_starter_optimizer_test_passes_with_our_optimizer(tmp_path):
    copy = starter_copy(tmp_path / "starter")
    proc = subprocess.run([sys.executable, "optimizer_test.py"], cwd=copy, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Optimizer test passed!" in proc.stdout


@pytest.mark.slow
def test_starter_sanity_check_passes_offline_with_our_model(tmp_path, starter_env):
    """sanity_check.py: transformers' GPT2Model.from_pretrained('gpt2') vs our
    GPT2Model.from_pretrained(model='gpt2', d=768, l=12, num_heads=12), both from the cache."""
    copy = starter_copy(tmp_path / "starter")
    assert "Your GPT2 implementation is correct!" in run_starter(copy, starter_env, "sanity_check.py")


def _data(data: Path) -> None:
    """Small files in the CS224N layouts under the names the starter's scripts read."""
    words = {0: "awful", 1: "bad", 2: "okay", 3: "good", 4: "superb"}
    for name, k in (("sst", 5), ("cfimdb", 2)):
        for split, n, test in (("train", k, False), ("dev", 3, False), ("test-student", 3, True)):
            rows = [(f"{name}{split[:2]}{i:03d}", f"the film was {words[i % k]} .", i % k) for i in range(n)]
            write_sentiment(data / f"ids-{name}-{split}.csv", rows, test=test)
    write_quora(data / "quora-train.csv", quora_pairs(4, 1))
    write_quora(data / "quora-dev.csv", quora_pairs(3, 2))
    write_quora(data / "quora-test-student.csv", quora_pairs(3, 3), labels=False)
    write_sonnets(data / "sonnets.txt", [(1, "From fairest creatures we desire increase,\nThat thereby beauty's "
                                             "rose might never die,"), (2, "When forty winters shall besiege thy brow,")])
    write_sonnets(data / "sonnets_held_out.txt", [(145, "Those lips that Love's own hand did make"),
                                                 (146, "Poor soul, the centre of my sinful earth,")])


@pytest.mark.slow
def test_starter_task_scripts_run_on_our_model_and_write_what_we_write(tmp_path, starter_env, capsys):
    copy = starter_copy(tmp_path / "starter")
    for script, solutions in STUDENT.items():
        fill_todos(copy / script, solutions)
    (copy / "data").mkdir()  # the starter ships without its data/
    _data(copy / "data")
    for script in STUDENT:
        # sonnets: --lr 0 keeps the EOS-first weights as they are (Adam's first step is a sign step: at the
        # starter's lr 1e-5 on all 124M weights it moves the EOS logit by ~45), so sampling stops at once
        lr = ["--lr", "0"] if script == "sonnet_generation.py" else []
        out = run_starter(copy, starter_env, script, "--epochs", "1", "--batch_size", "8", *lr)
        assert "save the model to" in out
    pred, data = copy / "predictions", copy / "data"
    # our prepare_submit accepts exactly what the starter wrote
    argv = ["--modes", "last-linear-layer", "--data_dir", str(data), "--predictions_dir", str(pred), "--check_only"]
    assert prepare_submit.main(argv) == 0, capsys.readouterr().err
    # our writers make the same bytes of the same predictions
    ours = tmp_path / "ours"
    for entry in prepare_submit.leaderboard_files(["last-linear-layer"]):
        theirs = pred / entry.name
        if entry.task == "sonnet":
            sonnets = read_generated_sonnets(theirs)
            assert [i for i, _ in sonnets] == [0, 1]
            mine = write_generated_sonnets(ours / entry.name, [text for _, text in sonnets])
        elif entry.task == "para":
            rows = read_predictions(theirs, PARAPHRASE_HEADER, (YES_TOKEN_ID, NO_TOKEN_ID))
            mine = write_paraphrase_predictions(ours / entry.name, [i for i, _ in rows], [v for _, v in rows])
        else:
            rows = read_predictions(theirs, SENTIMENT_HEADER, entry.values)
            mine = write_sentiment_predictions(ours / entry.name, [i for i, _ in rows], [v for _, v in rows])
        assert mine.read_bytes() == theirs.read_bytes(), entry.name
