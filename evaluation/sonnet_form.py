"""Sonnet form metrics that see more than chrF: lines, syllables, rhyme scheme, repetition.

chrF (Popovic, 2015) barely separates systems on the CS224N sonnet task, so we also measure the
form of a Shakespearean sonnet: 14 lines of iambic pentameter (10 syllables) rhyming
ABAB CDCD EFEF GG.  English spelling is not pronunciation, so syllables and rhymes are spelling
heuristics, documented here and tested on hand-made lines; they are meant for comparing systems,
not for judging one poem.

Syllables (`count_syllables`): a word's syllables are its groups of consecutive vowels
(a, e, i, o, u, and y when it is not the first letter), minus a silent final "e" ("love", "fire"
but not "be", "the", "table"), minus a silent "-ed" ("loved", but not "wanted", "ended"), minus a
silent "-es" after a vowel group ("lives", "faces" keeps its /iz/ after c, s, x, z, g, ch, sh),
with at least one syllable per word.  Apostrophes are dropped ("feed'st" -> "feedst").  Numbers
count as nothing.

Rhyme (`rhyme_key`, `words_rhyme`): the rhyme of a line is its last word from the last sounded
vowel group on: lowercased, possessive "'s" and a plural/verb final "s" removed ("eyes" -> "eye"),
a silent final "e" moved back to the vowel group before it ("increase" -> "ease",
"fire" -> "ire"), doubled final consonants single ("dwell" ~ "excel"), and a final
consonant + "y" read as "ee" ("legacy" ~ "free").  Two words rhyme when what follows the vowel group (the coda, silent e
included) is identical and the two vowel groups end with the same letter: "increase"/"decease",
"heart"/"art", "eyes"/"lies", "thee"/"be", "love"/"prove" (an eye rhyme, as Shakespeare's
readers heard it), but not "heart"/"hurt", and a word never rhymes with itself (repeating a line
ending is not a rhyme).

Scheme adherence (`rhyme_adherence`): the fraction of the seven pairs the scheme asks to rhyme
- lines (1,3) (2,4) (5,7) (6,8) (9,11) (10,12) (13,14) - that do; a missing line fails its pair.

Repetition: distinct-1 / distinct-2 (Li et al., 2016: unique word uni/bigrams over all of them)
and the number of lines that repeat an earlier line of the same sonnet (case and punctuation
ignored).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional

TARGET_LINES = 14
TARGET_SYLLABLES = 10
RHYME_PAIRS = ((1, 3), (2, 4), (5, 7), (6, 8), (9, 11), (10, 12), (13, 14))  # ABAB CDCD EFEF GG, 1-based

_VOWELS = set("aeiou")
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")


def sonnet_lines(text: str) -> list[str]:
    """The non-empty lines of a sonnet, stripped."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def words(line: str) -> list[str]:
    """Words of a line, lowercased, apostrophes kept inside words."""
    return [w.lower().strip("'") for w in _WORD.findall(line) if w.strip("'")]


def _vowel_groups(word: str) -> list[tuple[int, int]]:
    """(start, end) of each run of vowels; y is a vowel except as the first letter."""
    groups, start = [], None
    for i, ch in enumerate(word):
        vowel = ch in _VOWELS or (ch == "y" and i > 0)
        if vowel and start is None:
            start = i
        elif not vowel and start is not None:
            groups.append((start, i))
            start = None
    if start is not None:
        groups.append((start, len(word)))
    return groups


def _has_silent_final_e(word: str, groups: list[tuple[int, int]]) -> bool:
    """A final lone "e" after a consonant, in a word with another vowel group ("love", not "be"),
    except the syllabic "-le" after a consonant ("table", "little")."""
    if len(groups) < 2 or not word.endswith("e") or groups[-1] != (len(word) - 1, len(word)):
        return False
    if word.endswith("le") and len(word) > 2 and word[-3] not in _VOWELS and word[-3] not in "ly":
        return False
    return True


def count_syllables(word: str) -> int:
    """Syllables of one word by the vowel-group heuristic in the module docstring."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 0
    groups = _vowel_groups(w)
    n = len(groups)
    if n > 1:
        if _has_silent_final_e(w, groups):
            n -= 1
        elif w.endswith("ed") and groups[-1] == (len(w) - 2, len(w) - 1) and w[-3] not in "td":
            n -= 1  # "loved", "gazed"; "wanted", "ended" keep it
        elif (w.endswith("es") and groups[-1] == (len(w) - 2, len(w) - 1)
              and not re.search(r"(c|s|x|z|g|ch|sh)es$", w)):
            n -= 1  # "lives", "times"; "faces", "roses" keep it
    return max(1, n)


def line_syllables(line: str) -> int:
    return sum(count_syllables(w) for w in words(line))


def rhyme_key(word: str) -> tuple[str, str]:
    """(vowel group, coda) of a line-final word; ("", "") when it has no letters."""
    w = word.lower().replace("\u2019", "'")
    w = re.sub(r"'s$", "", w)
    w = re.sub(r"[^a-z]", "", w)
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]  # plural or verb "s": "eyes" -> "eye", "lies" -> "lie"
    groups = _vowel_groups(w)
    if not groups:
        return "", w
    start, end = groups[-2] if _has_silent_final_e(w, groups) else groups[-1]
    vowel, coda = w[start:end], re.sub(r"([b-df-hj-np-tv-z])\1", r"\1", w[end:])  # "dwell" ~ "excel"
    if vowel == "y" and not coda and start > 0:
        vowel = "ee"  # a final consonant + "y" sounds like "ee": "legacy" ~ "free"
    return vowel, coda


def words_rhyme(a: str, b: str) -> bool:
    """Do two line-final words rhyme?  (Same coda, vowel groups ending in the same letter; a word
    does not rhyme with itself, so a model repeating its line ends gains nothing.)"""
    if a.lower() == b.lower():
        return False
    (va, ca), (vb, cb) = rhyme_key(a), rhyme_key(b)
    return bool(va) and bool(vb) and ca == cb and va[-1] == vb[-1]


def _last_word(line: str) -> str:
    ws = words(line)
    return ws[-1] if ws else ""


def rhyme_adherence(lines: list[str]) -> float:
    """Fraction of the ABAB CDCD EFEF GG pairs that rhyme (missing lines fail)."""
    hits = 0
    for i, j in RHYME_PAIRS:
        if j <= len(lines) and words_rhyme(_last_word(lines[i - 1]), _last_word(lines[j - 1])):
            hits += 1
    return hits / len(RHYME_PAIRS)


def distinct_n(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_lines(lines: list[str]) -> int:
    seen, repeats = set(), 0
    for line in lines:
        key = " ".join(words(line))
        if key in seen:
            repeats += 1
        seen.add(key)
    return repeats


@dataclass
class SonnetForm:
    lines: int
    syllables_per_line: float  # mean over lines
    lines_with_10_syllables: float  # fraction of lines with 9-11 syllables
    rhyme: float  # rhyme_adherence
    distinct_1: float
    distinct_2: float
    repeated_lines: int

    def as_dict(self) -> dict:
        return asdict(self)


def sonnet_form(text: str) -> SonnetForm:
    """All form metrics of one sonnet."""
    lines = sonnet_lines(text)
    syl = [line_syllables(line) for line in lines]
    tokens = [w for line in lines for w in words(line)]
    return SonnetForm(
        lines=len(lines),
        syllables_per_line=sum(syl) / len(syl) if syl else 0.0,
        lines_with_10_syllables=sum(abs(s - TARGET_SYLLABLES) <= 1 for s in syl) / len(syl) if syl else 0.0,
        rhyme=rhyme_adherence(lines),
        distinct_1=distinct_n(tokens, 1),
        distinct_2=distinct_n(tokens, 2),
        repeated_lines=repeated_lines(lines),
    )


def evaluate_sonnets(generated: list[str], gold: list[str], gold_nll: Optional[list[tuple[float, int]]] = None) -> dict:
    """Per-sonnet rows and an overall row.

    `generated[i]` is scored against `gold[i]`: sentence chrF per sonnet, the starter's corpus chrF
    overall.  `gold_nll` (total NLL in nats, scored tokens) per gold sonnet adds the model's
    perplexity on the gold sonnets (per sonnet, and overall = exp(sum NLL / sum tokens)).
    """
    import math

    from sacrebleu.metrics import CHRF

    from evaluation.sonnets import chrf

    if len(generated) != len(gold):
        raise ValueError(f"{len(generated)} generated sonnets but {len(gold)} gold sonnets")
    metric = CHRF()
    rows = []
    for i, (gen, ref) in enumerate(zip(generated, gold)):
        row = {"sonnet": i, "chrf": metric.sentence_score(gen, [ref]).score, **sonnet_form(gen).as_dict()}
        if gold_nll is not None:
            nll, count = gold_nll[i]
            row["gold_ppl"] = math.exp(nll / count)
        rows.append(row)
    overall = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if key not in ("sonnet", "gold_ppl")}
    overall["sonnet"] = "all"
    overall["chrf"] = chrf(generated, gold)  # corpus chrF, exactly the starter's number
    if gold_nll is not None:
        overall["gold_ppl"] = math.exp(sum(n for n, _ in gold_nll) / sum(c for _, c in gold_nll))
    return {"rows": rows, "overall": overall}
