"""Shared test fixtures: the repository root on sys.path, the tokenizer, tiny random HF checkpoints."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_DIR = Path(os.environ.get("GPT2_TOKENIZER_DIR", SHARED_DATA / "gpt2-tokenizer"))
CS224N_DATA = SHARED_DATA / "cs224n"

# Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine two threads
# spin-wait for each other (tiny steps up to 30x slower): the whole suite runs on one thread.
torch.set_num_threads(1)


def tiny_hf_config(**overrides):
    import transformers

    kwargs = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


@pytest.fixture()
def one_thread_subprocesses(monkeypatch):
    """Scripts a test starts as subprocesses (sweep trials, recipe steps) run on one intra-op thread too."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if not (TOKENIZER_DIR / "vocab.json").exists():
        if os.environ.get("CI"):
            pytest.fail(f"GPT-2 tokenizer files missing at {TOKENIZER_DIR}")
        pytest.skip(f"GPT-2 tokenizer files missing at {TOKENIZER_DIR}")
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    """(directory, transformers model) of a tiny random GPT-2 saved in HF format."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(tiny_hf_config()).eval()
    directory = tmp_path_factory.mktemp("tiny-hf")
    hf.save_pretrained(directory)
    return directory, hf



def build_pair(tmp_path, seed=0, final_ln_scale=None, **overrides):
    """(ours, transformers) GPT-2 with identical random weights, ours loaded through our real loader;
    `final_ln_scale` fills the final LayerNorm gain: peaked next-token distributions, like a trained
    model's.  EOS is off in transformers' generation config: every test states its EOS."""
    import transformers

    from models.gpt2 import GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(tiny_hf_config(**overrides)).eval()
    hf.generation_config.eos_token_id = None
    if final_ln_scale is not None:
        with torch.no_grad():
            hf.transformer.ln_f.weight.fill_(final_ln_scale)
    hf.save_pretrained(tmp_path)
    return GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval(), hf


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 64-token model with peaked distributions, so EOS tokens (id 0) really get generated."""
    return build_pair(tmp_path_factory.mktemp("small-vocab"), vocab_size=64, initializer_range=0.3,
                      bos_token_id=0, eos_token_id=0)

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (real-size GPT-2 on the CPU); `-m 'not slow'` skips")
