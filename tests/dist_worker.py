"""One rank of the 2-process data-parallel tests (started by tests/test_distributed.py; not a test module).

Runs every scenario on this rank's half of a fixed global batch and saves, per scenario, the weights after each
step (and F-SAM's EMAs) to <out_dir>/rank<r>.pt for the test to compare.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_data, make_model, mse  # noqa: E402

import sam_fused  # noqa: E402

STEPS, LR, MOMENTUM = 3, 0.1, 0.9


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.named_parameters()}
    return {k.removeprefix("module."): v.detach().clone() for k, v in full.items()}


def _run(step, model, steps: int = STEPS) -> list[dict]:
    history = []
    for _ in range(steps):
        step()
        history.append(_weights(model))
    return history


def _ddp_sam(x, y, local: bool) -> list[dict]:
    model = DDP(make_model())
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)

    def step():
        # global: DDP all-reduces, every rank perturbs with the global gradient; local: each with its own
        with sam_fused.local_perturbation(model) if local else contextlib.nullcontext():
            mse(model(x), y).backward()
        opt.first_step(zero_grad=True)
        mse(model(x), y).backward()
        opt.second_step(zero_grad=True)

    return _run(step, model)


def global_sam(x, y):
    return _ddp_sam(x, y, local=False)


def local_sam(x, y):
    return _ddp_sam(x, y, local=True)


def local_msam(x, y):
    model = DDP(make_model())
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    return _run(lambda: opt.msam_step(model, mse, x, y, micro_batches=2), model)


def fsam_global(x, y):
    model = DDP(make_model())
    opt = sam_fused.FriendlySAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, lmbda=0.6)

    def step():
        mse(model(x), y).backward()
        opt.first_step(zero_grad=True)
        mse(model(x), y).backward()
        opt.second_step(zero_grad=True)

    history = _run(step, model)
    emas = {n.removeprefix("module."): opt.state[p]["fsam_ema"].clone() for n, p in model.named_parameters()}
    return {"history": history, "emas": emas}


def fsdp2_sam(x, y, cls=sam_fused.SAM):
    model = make_model()
    fully_shard(model)  # parameters become DTensors sharded on dim 0 across the ranks
    opt = cls(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)

    def step():
        mse(model(x), y).backward()  # reduce-scatter: each rank holds its shard of the global gradient
        opt.first_step(zero_grad=True)
        mse(model(x), y).backward()
        opt.second_step(zero_grad=True)

    return _run(step, model)


SCENARIOS = {"global_sam": global_sam, "local_sam": local_sam, "local_msam": local_msam, "fsam_global": fsam_global,
             "fsdp2_sam": fsdp2_sam, "fsdp2_fsam": lambda x, y: fsdp2_sam(x, y, sam_fused.FriendlySAM)}


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = make_data()
    xr, yr = x.chunk(world)[rank], y.chunk(world)[rank]
    results = {name: fn(xr, yr) for name, fn in SCENARIOS.items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
