"""Data-parallel SAM with real processes: torch.distributed, gloo, 2 ranks on this machine (docs/DESIGN.md section 7.5).

Equivalences checked (weights after every step):
  global perturbation (DDP default)          == single-process SAM on the concatenated batch
  local perturbation (local_perturbation())  == single-process msam_step(k=2) on the concatenated batch
  msam_step(k=2) on each of 2 ranks          == single-process msam_step(k=4)
  all ranks hold identical weights after every step; F-SAM under DDP keeps identical EMAs on all ranks.
  FSDP2 (fully_shard, parameters sharded across ranks) == single-process SAM / F-SAM: the norm is global.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import make_data, make_model, mse, sam_step

import sam_fused

WORLD = 2
TIMEOUT_S = 240
STEPS, LR, MOMENTUM = 3, 0.1, 0.9

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               OMP_NUM_THREADS="1", SAM_FUSED_BACKEND=os.environ.get("SAM_FUSED_BACKEND", "auto"))
    procs = [subprocess.Popen([sys.executable, worker, str(out)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:  # a hung or failed rank must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _history(step, model) -> list[dict]:
    out = []
    for _ in range(STEPS):
        step()
        out.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return out


def _assert_histories_close(got: list[dict], expected: list[dict]) -> None:
    for step, (g, e) in enumerate(zip(got, expected)):
        for k in e:
            msg = f"step {step} {k}"
            torch.testing.assert_close(g[k], e[k], rtol=1e-5, atol=1e-6, msg=lambda m, msg=msg: f"{msg}: {m}")


def _single_sam() -> list[dict]:
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    return _history(lambda: sam_step(model, opt, x, y), model)


def _single_msam(k: int) -> list[dict]:
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    return _history(lambda: opt.msam_step(model, mse, x, y, micro_batches=k), model)


@pytest.mark.parametrize("scenario", ["global_sam", "local_sam", "local_msam", "fsdp2_sam"])
def test_ranks_hold_identical_weights(ranks: list[dict], scenario: str) -> None:
    for s0, s1 in zip(ranks[0][scenario], ranks[1][scenario]):
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k


def test_global_perturbation_is_sam_on_the_global_batch(ranks: list[dict]) -> None:
    _assert_histories_close(ranks[0]["global_sam"], _single_sam())


def test_local_perturbation_is_msam_with_one_micro_batch_per_rank(ranks: list[dict]) -> None:
    _assert_histories_close(ranks[0]["local_sam"], _single_msam(2))


def test_msam_step_on_ddp_gives_k_times_world_micro_batches(ranks: list[dict]) -> None:
    _assert_histories_close(ranks[0]["local_msam"], _single_msam(2 * WORLD))


def test_friendly_sam_under_ddp(ranks: list[dict]) -> None:
    r0, r1 = ranks[0]["fsam_global"], ranks[1]["fsam_global"]
    for k in r0["emas"]:
        assert torch.equal(r0["emas"][k], r1["emas"][k]), k
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.FriendlySAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, lmbda=0.6)
    _assert_histories_close(r0["history"], _history(lambda: sam_step(model, opt, x, y), model))


@pytest.mark.parametrize("scenario,cls", [("fsdp2_sam", sam_fused.SAM), ("fsdp2_fsam", sam_fused.FriendlySAM)])
def test_fsdp2_sharded_parameters_use_the_global_norm(ranks: list[dict], scenario: str, cls: type) -> None:
    model, (x, y) = make_model(), make_data()
    opt = cls(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    _assert_histories_close(ranks[0][scenario], _history(lambda: sam_step(model, opt, x, y), model))
    _assert_histories_close(ranks[1][scenario], ranks[0][scenario])
