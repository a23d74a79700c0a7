"""Writers of small synthetic files in the exact CS224N layouts, for the task tests."""
from __future__ import annotations

import random
from pathlib import Path


def write_sentiment(path: Path, rows: list[tuple[str, str, int]], test: bool = False) -> Path:
    """`\\tid\\tsentence\\tsentiment` (train/dev) or the test-student header `0\\t\\tid\\tsentence`."""
    if test:
        lines = ["0\t\tid\tsentence"] + [f"{i + 1}\t{float(i)}\t{id_}\t {text}" for i, (id_, text, _) in enumerate(rows)]
    else:
        lines = ["\tid\tsentence\tsentiment"] + [f"{i}\t{id_}\t {text}\t{y}" for i, (id_, text, y) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_quora(path: Path, rows: list[tuple[str, str, str, int]], header: bool = True, index: bool = True,
                labels: bool = True, float_labels: bool = True) -> Path:
    cols = (["", "id"] if index else ["id"]) + ["sentence1", "sentence2"] + (["is_duplicate"] if labels else [])
    lines = ["\t".join(cols)] if header else []
    for i, (id_, a, b, y) in enumerate(rows):
        fields = ([str(1000 + i)] if index else []) + [id_, a, b]
        if labels:
            fields.append(f"{float(y)}" if float_labels else str(y))
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_sonnets(path: Path, sonnets: list[tuple[int, str]]) -> Path:
    body = "".join(f"\n{n}\n\n{text}\n\n" for n, text in sonnets)
    path.write_text("Sonnets\nby William Shakespeare\n\n\n" + body, encoding="utf-8")
    return path


WORDS = "the a movie film plot story actor scene music it was is really quite very rather".split()


def keyword_sentiment(n: int, seed: int, num_labels: int = 2) -> list[tuple[str, str, int]]:
    """Short texts whose label is given by one keyword among filler words."""
    keys = ["awful", "great", "okay", "boring", "superb"][:num_labels]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = rng.randrange(num_labels)
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randint(0, len(words)), keys[y])
        rows.append((f"{seed:x}id{i:05d}", " ".join(words) + " .", y))
    return rows


def quora_pairs(n: int, seed: int) -> list[tuple[str, str, str, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "?"
        y = rng.randrange(2)
        b = a if y else " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "?"
        out.append((f"q{seed}x{i:04d}", a, b, y))
    return out


def sonnet_text(rng: random.Random, lines: int = 14) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 7))).capitalize() + ","
                     for _ in range(lines))


def sonnet_task_files(directory: Path, seed: int = 0) -> dict:
    """A sonnet task in the starter's layouts: 3 training sonnets, dev prompts (first 3 lines) of
    sonnets 132 and 133 with their gold text, and one test prompt (145).  Returns the paths
    (`train`, `dev`, `gold_path`, `test`) and `gold` {number: text}."""
    rng = random.Random(seed)
    train = write_sonnets(directory / "sonnets.txt", [(i, sonnet_text(rng)) for i in range(1, 4)])
    gold = {n: sonnet_text(rng) for n in (132, 133)}
    gold_path = write_sonnets(directory / "gold.txt", list(gold.items()))
    dev = write_sonnets(directory / "dev.txt", [(n, "\n".join(t.split("\n")[:3])) for n, t in gold.items()])
    test = write_sonnets(directory / "test.txt", [(145, sonnet_text(rng, 3))])
    return {"train": train, "dev": dev, "gold_path": gold_path, "test": test, "gold": gold}
