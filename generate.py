"""Prompt -> text with any of our GPT-2 checkpoints: a preset, a Hugging Face directory, a training run
(its best.pt; LoRA runs included), with every decoding strategy of `model.generate`.

    python generate.py --model_size gpt2 --prompt "The meaning of life is" --decoding top-p --top_p 0.9
    python generate.py --checkpoint runs/sonnet-... --sonnet --prompt_file data/sonnets_held_out_dev.txt --stream
    echo "Question: what is a sonnet?" | python generate.py --checkpoint runs/distill-lm-.../ --num_samples 3
    python generate.py --model_size tiny --prompt "" --decoding sample --max_new_tokens 20   # unconditional

Prompts: every --prompt, else --prompt_file (one prompt per line with --each_line; with --sonnet a
sonnets.txt-style file, e.g. data/sonnets_held_out.txt), else standard input (all of it, one prompt).
--checkpoint alone takes the base model from the run's metrics.jsonl.  --num_samples N samples each
prompt N times (sampling decodings).  --sonnet completes each prompt as a sonnet the way
sonnet_generation.py does (tasks/completion.py SonnetWriter: stops at the end of line 14).
--stream prints tokens as they are chosen (batch size 1; not beam search or beam sampling; through
generate's on_token callback).  The same --seed and --batch_size give the same text, streamed or
not.  --num_beams with a sampling decoding is beam sampling; --assistant_model PATH decodes
speculatively with that draft model (acceptance rate on stderr); --compile_generation compiles the
decode step.
"""
from __future__ import annotations

import argparse
import sys

from common.errors import DataError
from common.io import read_text, write_jsonl
from experiments.textgen import (StreamingLM, TokenStream, complete, generation_kwargs, load_for_generation,
                                 resolve_model)
from training.cli import (UsageError, add_decoding_args, add_device_args, add_model_args, entry_point,
                          generation_config, resolve_device)
from training.build import seed_everything
from training.config import ModelConfig, Precision, choices


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompts and output")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeat the flag for several)")
    g.add_argument("--prompt_file", default=None, help="read prompts from this file ('-': standard input)")
    g.add_argument("--each_line", action="store_true", help="every non-empty line of the prompt file is a prompt")
    g.add_argument("--num_samples", type=int, default=1, help="completions per prompt (sampling decodings)")
    g.add_argument("--batch_size", type=int, default=1, help="rows generated together")
    g.add_argument("--stream", action="store_true", help="print tokens as they are chosen (batch size 1)")
    g.add_argument("--seed", type=int, default=11711, help="seed of the sampling generator")
    g.add_argument("--sonnet", action="store_true",
                   help="complete sonnets: stop at the end of line 14; --prompt_file is a sonnets.txt-style file")
    g.add_argument("--sonnet_out", default=None,
                   help="with --sonnet: also write the sonnets in the starter's generated-sonnets layout")
    g.add_argument("--out", default=None, help="also write every completion to this JSON-lines file")
    g = p.add_argument_group("checkpoint")
    g.add_argument("--checkpoint", default=None, metavar="RUN_DIR",
                   help="a training run's weights (its directory, or best.pt / last.pt; LoRA runs too); without "
                        "--model_size the run's own base model")
    g.add_argument("--precision", choices=choices(Precision), default="fp32", help="autocast dtype")
    add_model_args(p, model_size=None, training=False)
    add_decoding_args(p, max_new_tokens=128)
    add_device_args(p)
    args = p.parse_args(argv)
    for flag in ("num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.num_samples > 1 and args.decoding in ("greedy", "beam"):
        raise UsageError(f"--num_samples {args.num_samples}: --decoding {args.decoding} gives the same text every "
                         f"time; use a sampling decoding (sample, top-k, top-p, top-k-p)")
    if args.stream and (args.batch_size != 1 or args.decoding == "beam" or (args.num_beams or 1) > 1):
        raise UsageError("--stream prints one row as it is chosen: use --batch_size 1 and a decoding other than beam "
                         "(and no --num_beams)")
    if args.sonnet_out and not args.sonnet:
        raise UsageError("--sonnet_out goes with --sonnet")
    if args.sonnet_out and args.num_samples != 1:
        raise UsageError("--sonnet_out holds one sonnet per prompt: use --num_samples 1")
    if args.each_line and not args.prompt_file:
        raise UsageError("--each_line splits the --prompt_file")
    if args.prompt and args.prompt_file:
        raise UsageError("give prompts with --prompt or with --prompt_file, not both")
    return args


def read_prompts(args) -> list[tuple[int, str]]:
    """(id, prompt) pairs from the flags, the prompt file or standard input."""
    if args.prompt is not None:
        return list(enumerate(args.prompt, 1))
    if args.prompt_file in (None, "-"):
        if args.prompt_file is None and sys.stdin.isatty():
            raise UsageError("no prompt: give --prompt TEXT, --prompt_file FILE, or pipe text into standard input")
        text, where = sys.stdin.read(), "standard input"
    else:
        text, where = read_text(args.prompt_file, "--prompt_file"), args.prompt_file
    if args.sonnet and args.prompt_file not in (None, "-"):
        from tasks.sonnets import read_numbered_sonnets

        try:
            return read_numbered_sonnets(args.prompt_file)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    if args.each_line:
        prompts = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
        if not prompts:
            raise DataError(f"{where}: no non-empty line")
        return prompts
    return [(1, text.rstrip("\n"))]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    gen_cfg = generation_config(args)
    model_cfg = ModelConfig(model_size=args.model_size or "gpt2", init_checkpoint=args.init_checkpoint,
                            random_init=args.random_init, tokenizer=args.tokenizer, max_length=args.max_length,
                            attention=args.attention, attention_window=args.attention_window,
                            sparse_layers=args.sparse_layers, attention_backend=args.attention_backend)
    model_cfg.validate()
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    given = args.init_checkpoint or args.model_size
    source = resolve_model(given, args.checkpoint, args.random_init, args.tokenizer, model_cfg.overrides())
    seed_everything(args.seed)  # a randomly initialised model (tiny, --random_init) is the same every time
    model, tokenizer = load_for_generation(source, device)
    decoding = generation_kwargs(gen_cfg, model, tokenizer, device)  # the draft model of --assistant_model too
    items = [(pid, prompt, k) for pid, prompt in prompts for k in range(args.num_samples)]
    headed = len(items) > 1

    def header(i: int) -> str:
        pid, _, k = items[i]
        return f"=== prompt {pid}" + (f", sample {k + 1}" if args.num_samples > 1 else "") + " ==="

    lm = model
    if args.stream:
        def begin(i: int) -> None:
            sys.stdout.write(("\n\n" if i else "") + (header(i) + "\n" if headed else "") + items[i][1])
            sys.stdout.flush()
        lm = StreamingLM(model, TokenStream(tokenizer), on_begin=begin)
    texts = [p for _, p, _ in items]
    note = lambda m: print(m, file=sys.stderr)  # noqa: E731  (stdout holds only the generated text)
    if args.sonnet:
        from tasks.completion import SonnetWriter

        writer = SonnetWriter(tokenizer, device, batch_size=args.batch_size, max_new_tokens=gen_cfg.max_new_tokens,
                              seed=args.seed, precision=args.precision, generate_kwargs=decoding, report=note)
        outputs = writer.complete(lm, texts)
    else:
        new = complete(lm, tokenizer, texts, max_new_tokens=gen_cfg.max_new_tokens, batch_size=args.batch_size,
                       seed=args.seed, device=device, precision=args.precision, generate_kwargs=decoding,
                       max_length=args.max_length, report=note)
        outputs = [p + n for p, n in zip(texts, new)]
    rows = [{"prompt_id": pid, "sample": k + 1, "prompt": prompt, "text": text}
            for (pid, prompt, k), text in zip(items, outputs)]
    if args.stream:
        sys.stdout.write("\n")
    else:
        for i, row in enumerate(rows):
            print(("\n" if i else "") + (header(i) + "\n" if headed else "") + row["text"])
    if args.out:
        write_jsonl(args.out, rows)
    if args.sonnet_out:
        from tasks.sonnets import write_generated_sonnets

        write_generated_sonnets(args.sonnet_out, [r["text"] for r in rows])  # the starter's layout: positions
    return rows


if __name__ == "__main__":
    entry_point(main)(sys.argv[1:])
