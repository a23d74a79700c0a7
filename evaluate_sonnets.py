"""Score generated sonnets: the starter's chrF plus form (lines, syllables, rhyme, repetition),
and optionally a model's perplexity on the gold sonnets.

    python evaluate_sonnets.py --generated predictions/generated_sonnets_dev.txt \
        --gold data/TRUE_sonnets_held_out_dev.txt [--model DIR_OR_PRESET --tokenizer DIR]

Generated and gold sonnets are paired by NUMBER (sonnet_generation.py writes each completion under
its prompt's number): a sonnet of one file without its partner in the other is an error naming the
numbers, so test completions are never scored against dev gold.  A file numbered 0..N-1 (the
starter's sonnet_generation.py writes positions, not sonnet numbers) is paired in order with N gold
sonnets and checked by content instead: a completion starts with its prompt, the first lines of its
gold sonnet, so a file in which no sonnet starts like its partner answers other prompts and is
refused (some that do not: a warning naming them).  The heuristics behind each column are
documented in `evaluation/sonnet_form.py`.
"""
from __future__ import annotations

import argparse
import sys

from common.io import atomic_write_json, read_text
from evaluation.sonnet_form import TARGET_LINES, TARGET_SYLLABLES, evaluate_sonnets
from tasks.sonnets import GENERATED_HEADER, read_generated_sonnets, read_numbered_sonnets, sonnets_by_number
from training.cli import UsageError, add_device_args, check_file_flags, entry_point, resolve_device

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
    args = p.parse_args(argv)
    for flag in ("window", "stride"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return args


def read_any(path: str) -> list[tuple[int, str]]:
    first = read_text(path, "generated sonnets").split("\n", 1)[0].strip()
    return read_generated_sonnets(path) if first == GENERATED_HEADER else read_numbered_sonnets(path)


def pair_by_number(generated: list[tuple[int, str]], gold: list[tuple[int, str]], gen_path: str,
                   gold_path: str) -> list[tuple[int, str, str]]:
    """(number, generated text, gold text) in the generated file's order; see the module docstring."""
    gen, ref = sonnets_by_number(generated, gen_path), sonnets_by_number(gold, gold_path)
    if set(gen) == set(ref):
        return [(n, text, ref[n]) for n, text in gen.items()]
    if list(gen) == list(range(len(gen))) and len(gen) == len(ref):
        pairs = [(n, text, gold_text) for (n, text), gold_text in zip(gen.items(), ref.values())]
        unlike = [n for n, text, gold_text in pairs if not text.startswith(gold_text.split("\n", 1)[0].strip())]
        where = f"--generated {gen_path} (numbered 0..{len(gen) - 1}, the starter's positions) and --gold {gold_path}"
        if len(unlike) == len(pairs):
            raise UsageError(f"{where}: no generated sonnet starts with the first line of the gold sonnet in its "
                             f"position, so they answer other prompts; pass the gold file of the same prompts")
        print(f"warning: {where} paired in order" + (f"; sonnet(s) {_numbers(unlike)} do not start with the first "
                                                     f"line of their gold sonnet" if unlike else ""), file=sys.stderr)
        return pairs
    missing, extra = sorted(set(ref) - set(gen)), sorted(set(gen) - set(ref))
    raise UsageError(f"--generated {gen_path} and --gold {gold_path} hold different sonnets (paired by number): "
                     f"{_numbers(extra)} without gold, {_numbers(missing)} not generated; pass the gold file of the "
                     f"same prompts (dev completions go with TRUE_sonnets_held_out_dev.txt)")


def _numbers(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    return ", ".join(map(str, numbers[:8])) + (f" ... ({len(numbers)} in all)" if len(numbers) > 8 else "")


def gold_nll(model_spec: str, tokenizer_dir, gold: list[str], window: int, stride: int, device: str):
    import torch

    from evaluation.perplexity import sliding_window_nll
    from models.gpt2 import GPT2LMHeadModel
    from models.tokenizer import load_tokenizer
    from training.checkpoint import load_model

    model = load_model(GPT2LMHeadModel, model_spec).to(device)
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
    check_file_flags({"--generated": args.generated, "--gold": args.gold}, {"--json": args.json})
    device = resolve_device("cuda" if args.use_gpu else args.device) if args.model else None
    pairs = pair_by_number(read_any(args.generated), read_numbered_sonnets(args.gold), args.generated, args.gold)
    gold = [g for _, _, g in pairs]
    nll = gold_nll(args.model, args.tokenizer, gold, args.window, args.stride, device) if args.model else None
    result = evaluate_sonnets([t for _, t, _ in pairs], gold, nll)
    print(f"generated: {args.generated}\ngold: {args.gold}" + (f"\nmodel (gold perplexity): {args.model}" if nll else ""))
    print("chrF overall is the starter's corpus chrF; per sonnet it is sentence chrF.\n")
    print(markdown(result, [n for n, _, _ in pairs]))
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    entry_point(main)()
