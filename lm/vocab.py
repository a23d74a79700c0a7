"""Word-level vocabulary and corpora for the Penn Treebank baselines.

PTB here is Mikolov's preprocessed version (Mikolov et al., 2010; used by Zaremba et al., 2014):
lowercase, no punctuation, numbers replaced by `N`, rare words already `<unk>`, 10k word types.
Every line is a sentence and gets an `<eos>` token.  The one shared vocabulary is built from
PTB train, so all three baselines predict exactly the same 10,000 symbols.

Other corpora (WikiText-2, tiny Shakespeare) are brought to PTB's conventions by
`ptb_style_words` -- lowercase, clitics split (`do n't`, `john 's`), punctuation dropped,
numbers -> `N` -- and every word outside the vocabulary becomes `<unk>`.  That mapping makes
cross-domain perplexities look better than they are (predicting `<unk>` is easy and `<unk>`
stands for many words), so the out-of-vocabulary rate is reported next to every such number.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

UNK, EOS = "<unk>", "<eos>"


class Vocabulary:
    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        for w in [UNK, EOS, *words]:
            if w not in self.stoi:
                self.stoi[w] = len(self.itos)
                self.itos.append(w)
        self.unk_id, self.eos_id = self.stoi[UNK], self.stoi[EOS]

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def from_sentences(cls, sentences: Iterable[list[str]]) -> "Vocabulary":
        """All word types of the sentences, most frequent first (ties alphabetical)."""
        counts = Counter(w for s in sentences for w in s)
        return cls(w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def encode(self, sentences: Iterable[list[str]]) -> tuple[torch.Tensor, int, int]:
        """One id stream with `<eos>` after every sentence; also (OOV words, words) counted
        without the `<eos>` tokens.  OOV words become `<unk>`."""
        ids: list[int] = []
        oov = words = 0
        for sentence in sentences:
            for w in sentence:
                i = self.stoi.get(w)
                if i is None:
                    oov += 1
                    i = self.unk_id
                ids.append(i)
            words += len(sentence)
            ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.long), oov, words

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids)


def read_ptb_sentences(path: str | Path) -> list[list[str]]:
    """PTB's own format: one sentence per line, words separated by spaces (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such PTB file (expected Mikolov's ptb.{{train,valid,test}}.txt)")
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_WIKITEXT_JOINERS = {"@-@": "-", "@,@": ",", "@.@": "."}
_CLITIC = re.compile(r"(?<=[a-z])(n't|'s|'re|'ll|'ve|'d|'m)\b")
_WORD = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[-.,&/][a-z0-9]+)*")
_NUMBER = re.compile(r"^[0-9][0-9.,/-]*$")


def ptb_style_words(line: str) -> list[str]:
    """A line of WikiText-2 or plain English text in PTB's conventions (see the module docstring)."""
    line = line.lower().replace("\u2019", "'")
    for joiner, char in _WIKITEXT_JOINERS.items():
        line = line.replace(f" {joiner} ", char)
    line = _CLITIC.sub(r" \1", line)
    return ["N" if _NUMBER.match(w) else w for w in _WORD.findall(line)]


def read_english_sentences(path: str | Path) -> list[list[str]]:
    """Every non-empty line of a WikiText-2 / tiny Shakespeare file as a PTB-style sentence.
    WikiText section headings (`= = Title = =`) are text too and are kept (as words)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such corpus file")
    sentences = (ptb_style_words(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [s for s in sentences if s]
