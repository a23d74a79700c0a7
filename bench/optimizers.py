"""Benchmark: steps and wall time to a target loss, AdamW vs SOAP vs Shampoo, tiny GPT-2 on PTB.

The handout's claim for second-order optimizers is that they "should train substantively faster".
This trains one randomly initialised GPT-2 (`--model_size tiny` by default: 2 layers, width 64,
the full 50257-token vocabulary) per optimizer on Penn Treebank text (GPT-2 BPE, documents joined
by <|endoftext|> and packed into blocks, as pretrain.py does), all from the same initial weights on
the same batches, in lockstep: every step trains each model once, in rotating order, so machine
noise hits all alike. Every `--eval_every` steps the loss on fixed PTB valid blocks is measured
(not timed). Reported per optimizer: the first evaluated step whose valid loss is <= the target,
the training seconds (forward + backward + optimizer step) spent to get there, the ratios to AdamW,
the final valid loss, and the median time of one training step and of the optimizer step alone.
The target defaults to the valid loss AdamW reaches at its last step.

Models: models/ (GPT2LMHeadModel), optimizers: optimizer.AdamW and optim/ (SOAP, Shampoo) built on
optim.param_groups (weight decay on >= 2-D tensors, embeddings in their own group); no trainer.

Run: python -m bench.optimizers --steps 600 [--lr adamw=2e-3 soap=3e-3 shampoo=2e-3] [--use_gpu]
Writes bench/results/optimizers-<device>.json.
"""

import argparse
import math
import statistics
import time

import torch

from bench.common import machine_description, markdown_table, sync, write_results
from lm.corpus import find_data_file, join_documents, pack_blocks
from models.gpt2 import GPT2LMHeadModel
from models.losses import block_loss_sum
from models.tokenizer import load_tokenizer
from optim import SOAP, Shampoo, count_preconditioned
from optimizer import AdamW
from training.optimizers import linear_schedule, param_groups

OPTIMIZERS = ("adamw", "soap", "shampoo")
DEFAULT_LRS = (3e-3, 1e-2, 3e-2)

def build_optimizer(name: str, model, lr: float, args):
    groups = param_groups(model, args.weight_decay, precondition_embeddings=args.precondition_embeddings)
    betas = tuple(args.betas)
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas)
    common = dict(lr=lr, betas=betas, precondition_frequency=args.precondition_frequency,
                  max_precond_dim=args.max_precond_dim)
    if name == "soap":
        return SOAP(groups, **common)
    if name == "shampoo":
        return Shampoo(groups, **common)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def ptb_blocks(split: str, lines: int, block_size: int, tokenizer) -> torch.Tensor:
    """The first `lines` lines of PTB's `split` as (num_blocks, block_size) GPT-2 token blocks."""
    path = find_data_file(f"ptb/ptb.{split}.txt")
    with open(path, encoding="utf-8") as f:
        docs = [line.strip() for _, line in zip(range(lines), f) if line.strip()]
    stream = join_documents([tokenizer.encode(d, verbose=False) for d in docs], tokenizer.eos_token_id)
    blocks, _ = pack_blocks(stream, block_size)
    return blocks


def compact_vocabulary(train: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Renumber the BPE ids that occur in either split as 0..V-1: (train, valid, V). The model's
    vocabulary (and so its embedding and logits) shrinks from 50257 to the ids PTB uses."""
    used = torch.unique(torch.cat([train.flatten(), valid.flatten()]))  # (V,) sorted
    table = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    table[used] = torch.arange(len(used))
    return table[train], table[valid], len(used)


@torch.no_grad()
def valid_loss(model, blocks: torch.Tensor, batch_size: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        loss, n = block_loss_sum(model, blocks[i:i + batch_size].to(device))
        total, count = total + loss.item(), count + n
    model.train()
    return total / count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--lr", nargs="*", default=[], metavar="NAME=LR[,LR...]",
                   help=f"peak learning rates per optimizer, one run each (default {DEFAULT_LRS} for all)")
    p.add_argument("--betas", nargs=2, type=float, default=[0.95, 0.95],
                   help="(b1, b2) of every optimizer (the SOAP paper's setting for all of them)")
    p.add_argument("--model_size", default="tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--train_lines", type=int, default=20000, help="PTB train lines read (~21 words each)")
    p.add_argument("--valid_lines", type=int, default=500)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--target_loss", type=float, default=None,
                   help="valid loss to reach (default: what AdamW reaches at its last step)")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--precondition_frequency", type=int, default=10)
    p.add_argument("--max_precond_dim", type=int, default=10000)
    p.add_argument("--precondition_embeddings", action="store_true")
    p.add_argument("--compact_vocab", action="store_true",
                   help="renumber the BPE ids PTB uses as 0..V-1 and shrink the model's vocabulary to V "
                        "(about 5x cheaper steps on a CPU; the transformer layers are unchanged)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--use_gpu", action="store_true")
    args = p.parse_args(argv)
    lrs = {name: list(DEFAULT_LRS) for name in args.optimizers}
    for item in args.lr:
        name, _, values = item.partition("=")
        if name not in lrs or not values:
            p.error(f"--lr {item!r}: expected NAME=LR[,LR...] with NAME in {args.optimizers}")
        lrs[name] = [float(v) for v in values.split(",")]
    args.lrs = lrs
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.use_gpu else "cpu")
    tokenizer = load_tokenizer()
    train = ptb_blocks("train", args.train_lines, args.block_size, tokenizer)
    valid = ptb_blocks("valid", args.valid_lines, args.block_size, tokenizer)
    overrides = {}
    if args.compact_vocab:
        train, valid, overrides["vocab_size"] = compact_vocabulary(train, valid)
    print(f"PTB: {len(train)} train blocks, {len(valid)} valid blocks of {args.block_size} tokens"
          + (f"; compact vocabulary of {overrides['vocab_size']} BPE tokens" if overrides else ""))

    torch.manual_seed(args.seed)
    init = GPT2LMHeadModel.from_name_or_path(args.model_size, **overrides).state_dict()
    runs = {}
    first_loss = None
    for name in args.optimizers:
        for lr in args.lrs[name]:
            model = GPT2LMHeadModel.from_name_or_path(args.model_size, **overrides)
            model.load_state_dict(init)
            model.to(device).train()
            opt = build_optimizer(name, model, lr, args)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(args.warmup_steps, args.steps))
            pre, fall = count_preconditioned(opt) if name != "adamw" else (0, len(list(model.parameters())))
            if first_loss is None:  # every run starts from the same weights
                first_loss = valid_loss(model, valid, args.batch_size, device)
            runs[f"{name} lr={lr:g}"] = dict(name=name, lr=lr, model=model, opt=opt, sched=sched, train_s=0.0,
                                             step_s=[], opt_s=[], curve=[(0, first_loss, 0.0)],
                                             preconditioned=pre, fallback=fall)

    order = torch.Generator().manual_seed(args.seed)
    batches = []
    while len(batches) < args.steps:
        perm = torch.randperm(len(train), generator=order)
        batches += [perm[i:i + args.batch_size] for i in range(0, len(perm) - args.batch_size + 1, args.batch_size)]
    names = list(runs)
    for step in range(1, args.steps + 1):
        ids = train[batches[step - 1]].to(device)
        for k in range(len(names)):  # rotate the order each step
            run = runs[names[(step + k) % len(names)]]
            sync(device)
            t0 = time.perf_counter()
            loss, n = block_loss_sum(run["model"], ids)
            (loss / n).backward()
            sync(device)
            t1 = time.perf_counter()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            run["sched"].step()
            sync(device)
            t2 = time.perf_counter()
            run["train_s"] += t2 - t0
            run["step_s"].append(t2 - t0)
            run["opt_s"].append(t2 - t1)
        if step % args.eval_every == 0 or step == args.steps:
            for name in names:
                run = runs[name]
                run["curve"].append((step, valid_loss(run["model"], valid, args.batch_size, device), run["train_s"]))
            print(f"step {step}: " + "  ".join(f"{n} {runs[n]['curve'][-1][1]:.4f}" for n in names), flush=True)

    # the target: the best final valid loss of the AdamW runs (of all runs without AdamW)
    finals = {key: run["curve"][-1][1] for key, run in runs.items()}
    adamw = [key for key in runs if runs[key]["name"] == "adamw"] or list(runs)
    base_key = min(adamw, key=finals.get)
    target = args.target_loss if args.target_loss is not None else finals[base_key]
    hits = {key: next(((s, t) for s, loss, t in run["curve"] if loss <= target), None) for key, run in runs.items()}
    base = hits[base_key]
    best = {run["name"]: min((k for k in runs if runs[k]["name"] == run["name"]), key=finals.get)
            for run in runs.values()}
    rows, payload = [], {}
    for name in names:
        run, hit = runs[name], hits[name]
        steps_to, secs_to = hit if hit else (None, None)
        payload[name] = dict(optimizer=run["name"], lr=run["lr"], steps_to_target=steps_to, seconds_to_target=secs_to,
                             final_valid_loss=run["curve"][-1][1], curve=run["curve"],
                             median_step_ms=1e3 * statistics.median(run["step_s"]),
                             median_optimizer_step_ms=1e3 * statistics.median(run["opt_s"]),
                             preconditioned_tensors=run["preconditioned"], fallback_tensors=run["fallback"])
        ratio = lambda i: (f"{hit[i] / base[i]:.2f}" if hit and base else "-")  # noqa: E731
        mark = " (best)" if best[run["name"]] == name else ""
        rows.append([run["name"] + mark, f"{run['lr']:g}", f"{run['preconditioned']}/{run['fallback']}",
                     steps_to if hit else f"> {args.steps}", f"{secs_to:.1f}" if hit else "-",
                     ratio(0), ratio(1), f"{run['curve'][-1][1]:.4f}",
                     f"{math.exp(run['curve'][-1][1]):.1f}",
                     f"{payload[name]['median_step_ms']:.1f}", f"{payload[name]['median_optimizer_step_ms']:.2f}"])
    header = ["optimizer", "lr", "precond/Adam tensors", "steps to target", "train s to target",
              "steps vs AdamW", "time vs AdamW", "final valid loss", "final valid ppl", "step ms", "opt.step ms"]
    print(f"\ntarget valid loss {target:.4f} (the final loss of {base_key}); {args.model_size}, {args.steps} steps, "
          f"batch {args.batch_size} x {args.block_size} tokens, betas {tuple(args.betas)}, eval every "
          f"{args.eval_every}; {machine_description(device)}")
    print(markdown_table(header, rows))
    path = write_results(f"optimizers-{device.type}", dict(
        machine=machine_description(device), target_loss=target, target_run=base_key, args=vars(args),
        results=payload))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
