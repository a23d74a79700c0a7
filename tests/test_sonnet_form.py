"""Sonnet form metrics (hand-made sonnets) and the evaluate_sonnets.py CLI."""
from __future__ import annotations

import pytest

from common.errors import UserError

from conftest import CS224N_DATA
from evaluation.sonnet_form import (count_syllables, distinct_n, evaluate_sonnets, line_syllables, rhyme_adherence,
                                    sonnet_form, sonnet_lines, words_rhyme)
from evaluation.sonnets import chrf
from tasks.sonnets import read_sonnets, write_generated_sonnets

PERFECT = """and so the old man sat and sang all day
he saw the moon rise up and light the night
the birds that sing will fly far far away
and all the stars will shine with all their light
the sea is deep and cold and dark and blue
a ship sails on the waves from port to shore
the wind blows cold but still the sky is true
and none will fear the storm that came before
my heart is full of love for you my dear
the rose that grows will sing a sweet old song
and when you come i know that you are near
we sing and dance and laugh the whole day long
  so let the lamp burn bright and keep the flame
  for all our years will end but love the same"""


@pytest.mark.parametrize("word,n", [("love", 1), ("fire", 1), ("be", 1), ("the", 1), ("table", 2), ("loved", 1),
                                    ("wanted", 2), ("lives", 1), ("faces", 2), ("increase", 2), ("beauty", 2),
                                    ("memory", 3), ("feed'st", 1), ("ornament", 3), ("away", 2), ("yes", 1),
                                    ("1609", 0)])
def test_count_syllables(word, n):
    assert count_syllables(word) == n


@pytest.mark.parametrize("a,b,rhymes", [("increase", "decease", True), ("heart", "art", True), ("eyes", "lies", True),
                                        ("thee", "be", True), ("love", "prove", True), ("dwell", "excel", True),
                                        ("legacy", "free", True), ("night", "light", True), ("heart", "hurt", False),
                                        ("day", "night", False), ("spring", "niggarding", True), ("blue", "shore", False)])
def test_words_rhyme(a, b, rhymes):
    assert words_rhyme(a, b) is rhymes
    assert words_rhyme(b, a) is rhymes


def test_perfect_sonnet_scores_full_marks():
    form = sonnet_form(PERFECT)
    assert form.lines == 14
    assert form.syllables_per_line == 10.0 and form.lines_with_10_syllables == 1.0
    assert form.rhyme == 1.0
    assert form.repeated_lines == 0
    assert 0.5 < form.distinct_1 < 1.0 and form.distinct_2 > form.distinct_1


def test_broken_sonnets_score_low():
    # Swapping lines 2 and 3 breaks the two first pairs (ABAB -> AABB): 5 of 7 pairs left.
    lines = PERFECT.split("\n")
    swapped = "\n".join([lines[0], lines[2], lines[1]] + lines[3:])
    assert rhyme_adherence(sonnet_lines(swapped)) == pytest.approx(5 / 7)
    short = "\n".join(lines[:12])  # no couplet: its pair fails
    assert sonnet_form(short).lines == 12 and sonnet_form(short).rhyme == pytest.approx(6 / 7)
    loop = "the cat sat on the mat\nthe cat sat on the mat\n\nThe cat, sat on the mat!"
    form = sonnet_form(loop)
    assert form.lines == 3 and form.repeated_lines == 2 and form.rhyme == 0.0
    assert form.syllables_per_line == 6.0 and form.lines_with_10_syllables == 0.0
    assert distinct_n("a b a b".split(), 2) == pytest.approx(2 / 3)


@pytest.mark.skipif(not (CS224N_DATA / "sonnets.txt").exists(), reason="CS224N data missing")
def test_heuristics_on_shakespeare():
    """Calibration on the real sonnets: ~10 syllables a line, most scheme pairs found."""
    forms = [sonnet_form(s) for s in read_sonnets(CS224N_DATA / "sonnets.txt")]
    mean_syl = sum(f.syllables_per_line for f in forms) / len(forms)
    mean_rhyme = sum(f.rhyme for f in forms) / len(forms)
    assert 9.8 < mean_syl < 10.4 and mean_rhyme > 0.75
    assert sum(f.lines == 14 for f in forms) == 129  # sonnets 99 (15 lines) and 126 (12 lines) differ


def test_evaluate_rows_and_overall():
    gen = [PERFECT, "the cat sat on the mat\nthe cat sat on the mat"]
    gold = [PERFECT, PERFECT]
    result = evaluate_sonnets(gen, gold, gold_nll=[(20.0, 10), (40.0, 10)])
    rows, overall = result["rows"], result["overall"]
    assert rows[0]["chrf"] == pytest.approx(100.0) and rows[0]["rhyme"] == 1.0
    assert overall["chrf"] == pytest.approx(chrf(gen, gold))  # the starter's corpus number
    assert overall["lines"] == 8.0 and overall["rhyme"] == 0.5
    assert rows[1]["gold_ppl"] == pytest.approx(2.718281828 ** 4)
    assert overall["gold_ppl"] == pytest.approx(2.718281828 ** 3)


def test_cli_prints_table(tmp_path, capsys):
    import evaluate_sonnets

    generated = write_generated_sonnets(tmp_path / "gen.txt", [PERFECT, line_syllables and "a b c"])
    gold = tmp_path / "gold.txt"
    gold.write_text(f"Sonnets\n\n\n7\n\n{PERFECT}\n\n8\n\n{PERFECT}\n")
    result = evaluate_sonnets.main(["--generated", str(generated), "--gold", str(gold),
                                    "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "| **all** |" in out and "ABAB CDCD EFEF GG" in out and "gold ppl" not in out
    assert result["overall"]["chrf"] == pytest.approx(chrf([PERFECT, "a b c"], [PERFECT, PERFECT]))
    assert (tmp_path / "out.json").exists()
    with pytest.raises(UserError, match="0, 1 without gold, 132, 133, .* not generated"):
        evaluate_sonnets.main(["--generated", str(generated), "--gold", str(CS224N_DATA / "TRUE_sonnets_held_out_dev.txt")])


def test_cli_gold_perplexity(tmp_path, capsys, tiny_hf_checkpoint, tokenizer_dir):
    import math

    import torch
    import torch.nn.functional as F

    import evaluate_sonnets
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer

    directory, _ = tiny_hf_checkpoint
    short = ["Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.",
             "My mistress' eyes are nothing like the sun;\nCoral is far more red than her lips' red."]
    gold = tmp_path / "gold.txt"
    gold.write_text("Sonnets\n" + "".join(f"\n{i}\n\n{t}\n" for i, t in enumerate(short, start=1)))
    generated = write_generated_sonnets(tmp_path / "gen.txt", [short[0], short[1]])  # in the gold's order
    result = evaluate_sonnets.main(["--generated", str(generated), "--gold", str(gold), "--model", str(directory),
                                    "--tokenizer", str(tokenizer_dir)])
    assert "gold ppl" in capsys.readouterr().out
    model = GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    tok = load_tokenizer(str(tokenizer_dir))
    total, count = 0.0, 0
    for row, text in zip(result["rows"], short):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            nll = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="sum").item()
        assert row["gold_ppl"] == pytest.approx(math.exp(nll / (ids.size(1) - 1)), rel=1e-4)
        total, count = total + nll, count + ids.size(1) - 1
    assert result["overall"]["gold_ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)
