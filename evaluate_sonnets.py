"""Score generated sonnets: the starter's chrF plus form (lines, syllables, rhyme, repetition),
and optionally a model's perplexity on the gold sonnets.

    python evaluate_sonnets.py --generated predictions/generated_sonnets_dev.txt \
        --gold data/TRUE_sonnets_held_out_dev.txt [--model DIR_OR_PRESET --tokenizer DIR]

Generated and gold sonnets are paired in file order (as the starter's evaluation does).  The
heuristics behind each column are documented in `evaluation/sonnet_form.py`.
"""
from __future__ import annotations

import argparse

from common.io import atomic_write_json
from evaluation.sonnet_form import TARGET_LINES, TARGET_SYLLABLES, evaluate_sonnets
from tasks.sonnets import GENERATED_HEADER, read_generated_sonnets, read_numbered_sonnets
from training.cli import UsageError, add_device_args, entry_point, resolve_device

COLUMNS = [("sonnet", "sonnet", "{}"), ("id", "id", "{}"), ("lines", f"lines (→{TARGET_LINES})", "{:.1f}"),
           ("syllables_per_line", f"syllables/line (→{TARGET_SYLLABLES})", "{:.1f}"),
           ("lines_with_10_syllables", "lines with 9-11 syllables", "{:.2f}"), ("rhyme", "ABAB CDCD EFEF GG", "{:.2f}"),
           ("distinct_1", "distinct-1", "{:.2f}"), ("distinct_2", "distinct-2", "{:.2f}"),
           ("repeated_lines", "repeated lines", "{:g}"), ("chrf", "chrF", "{:.1f}"), ("gold_ppl", "gold ppl", "{:.1f}")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generated", required=True, help="generated sonnets (the '--Generated Sonnets--' layout, "
                                                       "or a sonnets.txt-style file)")
    p.add_argument("--gold", required=True, help="gold sonnets, sonnets.txt-style (e.g. TRUE_sonnets_held_out_dev.txt)")
    p.add_argument("--model", default=None, help="checkpoint directory, hub name or preset: adds its perplexity "
                                                 "on the gold sonnets")
    p.add_argument("--tokenizer", default=None, help="GPT-2 tokenizer directory (default: $GPT2_TOKENIZER_DIR, "
                                                     "then the model directory)")
    p.add_argument("--window", type=int, default=1024, help="perplexity window (tokens), capped at the model's context")
    p.add_argument("--stride", type=int, default=512, help="perplexity stride (tokens)")
    add_device_args(p)
    p.add_argument("--json", default=None, help="also write the rows and the overall row to this JSON file")
    return p.parse_args(argv)


def read_any(path: str) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    return read_generated_sonnets(path) if first == GENERATED_HEADER else read_numbered_sonnets(path)


def gold_nll(model_spec: str, tokenizer_dir, gold: list[str], window: int, stride: int, device: str):
    import torch

    from evaluation.perplexity import sliding_window_nll
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer

    model = GPT2LMHeadModel.from_name_or_path(model_spec).to(device).eval()
    tok = load_tokenizer(tokenizer_dir, model_spec)
    window = min(window, model.config.max_position_embeddings)
    stride = min(stride, window)
    return [sliding_window_nll(model, torch.tensor(tok.encode(text)), window, stride) for text in gold]


def markdown(result: dict, ids: list[int]) -> str:
    present = [c for c in COLUMNS if c[0] == "id" or c[0] in result["overall"]]
    lines = ["| " + " | ".join(c[1] for c in present) + " |", "|" + "---|" * len(present)]
    for row, sid in zip(result["rows"], ids):
        row = {**row, "id": sid}
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in present) + " |")
    overall = {**result["overall"], "id": ""}
    lines.append("| " + " | ".join("**all**" if key == "sonnet" else fmt.format(overall[key]) if key != "id" else ""
                                   for key, _, fmt in present) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    generated, gold = read_any(args.generated), read_numbered_sonnets(args.gold)
    if len(generated) != len(gold):
        raise UsageError(f"--generated {args.generated} holds {len(generated)} sonnets but --gold {args.gold} holds "
                         f"{len(gold)}; they are paired in order, so pass files for the same prompts")
    nll = None
    if args.model:
        device = resolve_device("cuda" if args.use_gpu else args.device)
        nll = gold_nll(args.model, args.tokenizer, [t for _, t in gold], args.window, args.stride, device)
    result = evaluate_sonnets([t for _, t in generated], [t for _, t in gold], nll)
    print(f"generated: {args.generated}\ngold: {args.gold}" + (f"\nmodel (gold perplexity): {args.model}" if nll else ""))
    print("chrF overall is the starter's corpus chrF; per sonnet it is sentence chrF.\n")
    print(markdown(result, [i for i, _ in generated]))
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    entry_point(main)()
