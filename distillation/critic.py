"""The semantic-equivalence critic of Impossible Distillation's filter (Jung et al., 2023, arXiv
2305.16635: a pair is kept only when each side entails the other).

A critic is any callable `pairs -> scores`, one score in [0, 1] per (a, b) pair, high when a and b
mean the same.  The one built here is the cloze paraphrase detector of `paraphrase_detection.py`
(same prompt, same two answer tokens, `tasks/paraphrase.py`), scored BOTH ways:

    score(a, b) = min( P(yes | a, b), P(yes | b, a) )

It must be a TRAINED detector to mean anything: `load_critic(spec, checkpoint)` loads it through the
one model loader (`training.checkpoint.load_model`): `spec` a preset / HF directory (e.g. a detector
exported with `save_pretrained`), `checkpoint` a `paraphrase_detection.py` run directory or its
best.pt (LoRA runs too).  A random model's scores sit near 0.5 and filter nothing useful.

An NLI model plugs in the same way: wrap it as a callable returning min(P(entailment | a -> b),
P(entailment | b -> a)) (the paper's bidirectional entailment), e.g. with transformers:

    nli = AutoModelForSequenceClassification.from_pretrained("roberta-large-mnli").eval()
    tok = AutoTokenizer.from_pretrained("roberta-large-mnli")
    ent = nli.config.label2id["ENTAILMENT"]
    def critic(pairs):
        def p(x, y):
            enc = tok(x, y, padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                return nli(**enc).logits.softmax(-1)[:, ent]
        a, b = [x for x, _ in pairs], [y for _, y in pairs]
        return torch.minimum(p(a, b), p(b, a)).tolist()

and pass it to `distillation.impossible.filter_pairs(rows, rules, critic)`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Critic = Callable[[list[tuple[str, str]]], list[float]]


def bidirectional_critic(model, tokenizer, device, batch_size: int, max_length: int, precision: str = "fp32") -> Critic:
    """pairs -> min(P(yes | a, b), P(yes | b, a)) under the cloze paraphrase detector `model`."""
    from tasks.paraphrase import encode_pairs, two_way_logits
    from training.inference import batched_inference

    def score(pairs):
        both = list(pairs) + [(b, a) for a, b in pairs]
        seqs, _ = encode_pairs(tokenizer, both, max_length)
        logits = batched_inference(seqs, batch_size, tokenizer.eos_token_id, device, precision,
                                   lambda ids, mask: two_way_logits(model, ids, mask))  # (2N, 2)
        p_yes = torch.softmax(logits, -1)[:, 1]
        n = len(pairs)
        return torch.minimum(p_yes[:n], p_yes[n:]).tolist()
    return score


def load_critic(spec: str, checkpoint: Optional[str], device, tokenizer_dir: Optional[str], batch_size: int,
                max_length: int) -> Critic:
    """The bidirectional cloze critic of the detector `spec` (+ trainer `checkpoint`), on `device`."""
    from pathlib import Path

    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from training.checkpoint import load_model

    model = load_model(GPT2LMHeadModel, spec, checkpoint).to(device).eval()
    tokenizer = load_tokenizer(tokenizer_dir, spec if Path(spec).is_dir() else None)
    return bidirectional_critic(model, tokenizer, device, batch_size, max_length)
