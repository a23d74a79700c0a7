"""Compare our GPT-2 with Hugging Face transformers' on the same weights.

For each size, the weights are loaded through our real loader (`from_pretrained`): pretrained
weights when they can be had (a local directory given with --model, or the Hugging Face cache),
otherwise a randomly initialised transformers checkpoint of the real shape, written to a
temporary directory first.  On a right-padded batch it reports the largest absolute difference
of the final hidden states (at real tokens) and of the LM logits; fp32 tolerance 1e-4.

    python sanity_check.py                       # gpt2, gpt2-medium, gpt2-large, gpt2-xl
    python sanity_check.py --sizes gpt2          # one size
    python sanity_check.py --model /path/to/gpt2-checkpoint
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time

import torch
import transformers

from config import PRESETS
from models import GPT2LMHeadModel, GPT2Model
from models.hf_io import HUB_ALIASES, resolve_checkpoint_dir

SIZES = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def padded_batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding, as the classifiers use
    mask[2, 5:] = 0
    return ids, mask


def pretrained_dir(name: str):
    """The pretrained checkpoint from the Hugging Face cache, or None (never touches the network)."""
    try:
        return str(resolve_checkpoint_dir(name, allow_network=False))
    except OSError:
        return None


@torch.no_grad()
def compare(checkpoint_dir: str, hf_model) -> dict[str, float]:
    ids, mask = padded_batch(hf_model.config.vocab_size)
    real = mask.bool()
    ref = hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ref_hidden, ref_logits = ref.hidden_states[-1], ref.logits
    del ref
    ours = GPT2Model.from_pretrained(checkpoint_dir).eval()
    out = ours(ids, mask)
    hidden_diff = (out["last_hidden_state"] - ref_hidden)[real].abs().max().item()
    last = mask.sum(1) - 1
    last_diff = (out["last_token"] - ref_hidden[torch.arange(ids.size(0)), last]).abs().max().item()
    del ours, out
    gc.collect()
    ours = GPT2LMHeadModel.from_pretrained(checkpoint_dir).eval()
    logits_diff = (ours(ids, mask) - ref_logits)[real].abs().max().item()
    del ours
    gc.collect()
    return {"hidden": hidden_diff, "last_token": last_diff, "logits": logits_diff}


def check_size(name: str, model_dir: str | None, tol: float) -> bool:
    start = time.time()
    directory = model_dir or pretrained_dir(name)
    with tempfile.TemporaryDirectory() as tmp:
        if directory is not None:
            source = f"pretrained weights from {directory}"
            hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        else:
            p = PRESETS[name]
            source = "random weights (no pretrained checkpoint reachable), saved and reloaded"
            torch.manual_seed(0)
            hf_cfg = transformers.GPT2Config(n_embd=p["hidden_size"], n_layer=p["num_hidden_layers"],
                                             n_head=p["num_attention_heads"])
            hf_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
            hf_model.save_pretrained(tmp)
            directory = tmp
        diffs = compare(directory, hf_model)
        del hf_model
        gc.collect()
    ok = all(d <= tol for d in diffs.values())
    print(f"{name:12s} {'PASS' if ok else 'FAIL'}  max|diff| hidden {diffs['hidden']:.2e}  "
          f"last_token {diffs['last_token']:.2e}  logits {diffs['logits']:.2e}  (tol {tol:g}; "
          f"{source}; {time.time() - start:.0f}s)", flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, choices=SIZES + list(HUB_ALIASES.values()),
                        help="model sizes to check (default: all four)")
    parser.add_argument("--model", help="a local HF GPT-2 checkpoint directory to check instead of the sizes")
    parser.add_argument("--tol", type=float, default=1e-4, help="fp32 tolerance on max |difference|")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.model:
        results = [check_size(args.model, args.model, args.tol)]
    else:
        results = [check_size(name, None, args.tol) for name in args.sizes]
    print("Your GPT2 implementation is correct!" if all(results) else "Sanity check FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
