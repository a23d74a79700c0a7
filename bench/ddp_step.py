"""One DDP training step in a torchrun process: what `bench.gpu_check` runs to check DDP on NCCL.

    python -m torch.distributed.run --standalone --nproc_per_node 1 -m bench.ddp_step --device cuda

Prints one line `RESULT {json}` (backend, world size, loss, step seconds, finite gradients).  With
one process `training.distributed.init_from_env` joins no group (it does for several ranks), so the
group is joined here, and the model wrapped in DistributedDataParallel as the trainer wraps it.
What this checks is torch's NCCL + DDP on the device, not our own multi-rank code paths
(`training/distributed.py` returns early at world size 1); those run under gloo in
tests/test_speed.py (two CPU ranks == one process).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(device_type: str, model_name: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from config import GPT2Config
    from models.gpt2 import GPT2LMHeadModel
    from models.losses import next_token_loss
    from optimizer import AdamW

    cuda = device_type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        model = GPT2LMHeadModel(GPT2Config.from_name(model_name)).to(device).train()
        engine = DDP(model, device_ids=[device.index] if cuda else None)
        opt = AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
        t0 = time.perf_counter()
        loss = next_token_loss(engine(ids), ids)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        print("RESULT " + json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                                      "loss": loss.item(), "step_s": time.perf_counter() - t0,
                                      "grads_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())}),
              flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="gpt2", help="preset shape (random weights)")
    args = parser.parse_args()
    main(args.device, args.model)
