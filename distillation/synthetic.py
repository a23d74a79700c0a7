"""Training the cloze paraphrase detector on Impossible Distillation data (Jung et al., 2023):
the training set of `paraphrase_detection.py --synthetic_train` (real and/or synthetic pairs with
per-example weights) and the loss

    mean_i( w_i * CE_i ) + kl_lambda * KL( p_student || p_initial )

over the two answer tokens ("no", "yes"); w_i = 1 for real pairs and `--synthetic_weight` for
synthetic ones; p_initial comes from a frozen copy of the model as it was before training, which
keeps the detector close to where it started while it learns from noisy synthetic labels.
With no synthetic file and kl_lambda = 0 the loss is exactly the plain cross-entropy.

The contrastive option (`--contrastive margin|infonce`, weight `--contrastive_weight`) adds a term on
the synthetic file's structure: each positive (a, b) was built with hard negatives (a, c_j) of the
SAME source sentence a (`impossible_distillation.py build`).  Every synthetic positive in a batch
brings its negatives along (`with_negatives`; the extra rows carry no cross-entropy), and with
s = logit("yes") - logit("no") (the log-odds of "paraphrase"):

    margin   mean_{g, j} max(0, m - (s(a, b) - s(a, c_j)))            (m = --contrastive_margin)
    infonce  mean_g -log( e^{s(a, b)} / (e^{s(a, b)} + sum_j e^{s(a, c_j)}) )   (van den Oord et al., 2018)

so the detector must rank the paraphrase of a above a's topically close non-paraphrases, not only
classify each pair alone.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def training_examples(para_train: str, synthetic_train: Optional[str], synthetic_weight: float,
                      limit: Optional[int] = None) -> tuple[list, torch.Tensor, int]:
    """(real + synthetic training examples, their loss weights (N,), how many are synthetic).  `para_train` "none" means no
    real pairs; `limit` applies to each file."""
    from tasks.data import read_paraphrase

    real = [] if para_train == "none" else read_paraphrase(para_train, labeled=True)
    synth = read_paraphrase(synthetic_train, labeled=True) if synthetic_train else []
    if limit:
        real, synth = real[:limit], synth[:limit]
    weights = torch.tensor([1.0] * len(real) + [synthetic_weight] * len(synth))
    return real + synth, weights, len(synth)


def paraphrase_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    ref_logits: Optional[torch.Tensor] = None, kl_lambda: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy over (B, 2) answer logits plus kl_lambda * KL(student || reference)."""
    logits = logits.float()
    loss = (F.cross_entropy(logits, labels, reduction="none") * weights).mean()
    if kl_lambda and ref_logits is not None:
        log_p = F.log_softmax(logits, -1)
        log_q = F.log_softmax(ref_logits.float(), -1)
        loss = loss + kl_lambda * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return loss


CONTRASTIVE = ("none", "margin", "infonce")


def contrastive_groups(examples: Sequence, synthetic: Sequence[bool]) -> dict[int, list[int]]:
    """Positive index -> indices of the negatives with the same (normalised) sentence1, among the
    synthetic examples; positives without a negative are left out."""
    from distillation.impossible import normalise

    by_source: dict[str, tuple[list[int], list[int]]] = {}
    for i, (e, synth) in enumerate(zip(examples, synthetic)):
        if synth and e.label is not None:
            by_source.setdefault(normalise(e.sentence1), ([], []))[0 if e.label == 1 else 1].append(i)
    return {p: negs for pos, negs in by_source.values() if negs for p in pos}


def with_negatives(indices: Sequence[int], groups: dict[int, list[int]]
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(rows: `indices` then the negatives of each grouped positive among them, positive slots (G,),
    negative slots (G, K) padded with -1), slots being positions in `rows`."""
    rows, pos, neg = list(indices), [], []
    for slot, i in enumerate(indices):
        if i in groups:
            pos.append(slot)
            neg.append(list(range(len(rows), len(rows) + len(groups[i]))))
            rows += groups[i]
    k = max((len(n) for n in neg), default=0)
    neg_t = torch.full((len(neg), k), -1, dtype=torch.long)
    for g, n in enumerate(neg):
        neg_t[g, :len(n)] = torch.tensor(n, dtype=torch.long)
    return rows, torch.tensor(pos, dtype=torch.long), neg_t


def contrastive_loss(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, kind: str,
                     margin: float = 1.0) -> torch.Tensor:
    """The margin or InfoNCE term over (R, 2) answer logits; `pos` (G,) and `neg` (G, K, -1 = none)
    index rows.  0 (with a gradient path) when the batch holds no group."""
    if kind not in CONTRASTIVE[1:]:
        raise ValueError(f"contrastive: {kind!r} is not one of {', '.join(CONTRASTIVE[1:])}")
    logits = logits.float()
    if pos.numel() == 0 or neg.numel() == 0:
        return logits.sum() * 0.0
    s = logits[:, 1] - logits[:, 0]  # (R,) log-odds of "yes"
    valid = neg >= 0  # (G, K)
    s_pos, s_neg = s[pos], s[neg.clamp_min(0)]  # (G,), (G, K)
    if kind == "margin":
        hinge = F.relu(margin - (s_pos[:, None] - s_neg)) * valid
        return hinge.sum() / valid.sum()
    scores = torch.cat([s_pos[:, None], s_neg.masked_fill(~valid, float("-inf"))], 1)  # (G, 1 + K)
    return F.cross_entropy(scores, torch.zeros(len(pos), dtype=torch.long, device=scores.device))
