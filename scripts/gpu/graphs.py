"""CUDA-graph capture and replay of whole SAM steps, compared bit for bit with eager runs (run by gpu_check.sh).

Each case builds an optimizer over a few parameters (odd sizes), runs WARMUP steps on a side stream, captures one step
in a torch.cuda.CUDAGraph (as torch.cuda.graphs documents: warm up on a side stream, then capture), replays it REPLAYS
times with new input values written into static tensors, and compares every replay with a fresh eager run of the same
WARMUP + REPLAYS steps: weights, the perturbed weights or returned norm, and the optimizer's state must be
bit-identical (the same kernels on the same inputs; the reductions are deterministic).

Cases, per backend (GRAPH_BACKENDS, default cuda,triton):
  restore      gradients, first_step, a copy of w + e, restore()           SAM fp32 and ASAM bf16
  second_step  gradients, first_step, gradients at w + e, second_step()    SAM + SGD (momentum, nesterov),
                                                                           ASAM + AdamW(capturable=True), F-SAM + SGD
  mlp          the whole training step: forward, backward, first_step, forward, backward, second_step (MLP, SGD
               momentum). Not bit-identical -> WARN (cuBLAS may pick other kernels under capture), not close -> FAIL.
The gradients of the synthetic cases are elementwise functions of the weights and of a static input t (written
before each replay), computed in place into .grad so that every address stays the same (Triton's cached address
tables are built during the warm-up; a table built during capture would need a host copy, which capture forbids).

Without a GPU (GRAPH_DEVICE=cpu, GRAPH_BACKENDS=cpu; what `gpu_check.sh --dry-run` runs): each case's eager part runs
twice and must agree bit for bit (and restore must give back w exactly); the capture is reported SKIP.
Writes $GRAPH_OUT/checks_graphs.json (read by summarize.py); exit status 1 when a check FAILed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

import sam_fused

DEV = torch.device(os.environ.get("GRAPH_DEVICE", "cuda"))
IS_CUDA = DEV.type == "cuda"
WANTED = [b for b in os.environ.get("GRAPH_BACKENDS", "cuda,triton").split(",") if b]
OUTDIR = os.environ.get("GRAPH_OUT", ".")
WARMUP, REPLAYS = 3, 4
SHAPES = [(1,), (7,), (33, 5), (3, 4, 5, 6), (70_001,), (257, 259)]
results: list[dict] = []


def record(name: str, status: str, detail: str = "", secs: float = 0.0) -> None:
    results.append({"group": "graphs", "check": name, "status": status, "secs": round(secs, 2), "detail": detail})
    print(f"GRAPH {status:5s} {name:44s} {secs:6.1f}s  {detail}", flush=True)


def sync() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.view(view).cpu()


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(a, b) if x.numel()),
               default=0.0)


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the base optimizer's state and SAM's own (F-SAM's EMA), in a fixed order."""
    out = []
    for o in (opt.base_optimizer, opt):
        for group in o.param_groups:
            for p in group["params"]:
                st = o.state.get(p, {})
                out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


# ------------------------------------------------------------------------------------------------- the cases


class Synthetic:
    """Parameters with .grad allocated once; grads(t) writes g = sin(3 w t) + 0.01 t into them in place."""

    def __init__(self, backend: str, kind: str, dtype: torch.dtype, variant: str) -> None:
        gen = torch.Generator().manual_seed(7)
        self.kind = kind
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEV, dtype)) for s in SHAPES]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.t = torch.zeros((), device=DEV)  # the static input of the captured step
        sam_kw = dict(rho=0.05 if dtype == torch.float32 else 5.0, backend=backend)  # bf16: e above w's ulp
        if variant == "sam_sgd":
            self.opt = sam_fused.SAM(self.params, torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, **sam_kw)
        elif variant == "asam_adamw":
            self.opt = sam_fused.SAM(self.params, torch.optim.AdamW, adaptive=True, eta=0.01, lr=1e-3,
                                     capturable=IS_CUDA, **sam_kw)
        elif variant == "fsam_sgd":
            self.opt = sam_fused.FriendlySAM(self.params, torch.optim.SGD, sigma=1.0, lmbda=0.9, lr=0.05,
                                             momentum=0.9, **sam_kw)
        elif variant == "asam":
            self.opt = sam_fused.SAM(self.params, torch.optim.SGD, adaptive=True, eta=0.01, lr=0.05, **sam_kw)
        else:
            self.opt = sam_fused.SAM(self.params, torch.optim.SGD, lr=0.05, **sam_kw)
        self.snap = [torch.empty_like(p) for p in self.params]  # w + e, written by the restore step
        self.norm = torch.zeros((), dtype=torch.float64, device=DEV)

    @torch.no_grad()
    def grads(self) -> None:
        for p in self.params:
            p.grad.copy_(torch.sin(p * (3.0 * self.t)) + 0.01 * self.t)

    def step(self) -> None:
        self.grads()
        norm = self.opt.first_step()
        with torch.no_grad():
            self.norm.copy_(norm)
            if self.kind == "restore":
                for s, p in zip(self.snap, self.params):
                    s.copy_(p)
                self.opt.restore()
            else:
                self.grads()  # the gradient at w + e
        if self.kind != "restore":
            self.opt.second_step()

    def observed(self) -> list[torch.Tensor]:
        out = [p.detach().clone() for p in self.params] + [self.norm.clone()]
        if self.kind == "restore":
            out += [s.clone() for s in self.snap]
        return out + [t.clone() for t in state_tensors(self.opt)]

    def set_input(self, i: int) -> None:
        self.t.fill_(0.5 + 0.25 * i)


class Mlp:
    """The whole training step of a small MLP, gradients accumulated in place (zero_grad(set_to_none=False))."""

    def __init__(self, backend: str) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 10)).to(DEV)
        gen = torch.Generator().manual_seed(13)
        self.xs = [torch.randn(32, 64, generator=gen).to(DEV) for _ in range(WARMUP + REPLAYS)]
        self.ys = [torch.randn(32, 10, generator=gen).to(DEV) for _ in range(WARMUP + REPLAYS)]
        self.x, self.y = torch.zeros_like(self.xs[0]), torch.zeros_like(self.ys[0])
        self.opt = sam_fused.SAM(self.model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                                 backend=backend)
        self.loss = torch.zeros((), device=DEV)
        self.kind = "mlp"

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        loss = (self.model(self.x) - self.y).pow(2).mean()
        loss.backward()
        self.opt.first_step()
        self.opt.zero_grad(set_to_none=False)
        (self.model(self.x) - self.y).pow(2).mean().backward()
        self.opt.second_step()
        with torch.no_grad():
            self.loss.copy_(loss)

    def observed(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()] + [self.loss.clone()] + \
            [t.clone() for t in state_tensors(self.opt)]

    def set_input(self, i: int) -> None:
        self.x.copy_(self.xs[i])
        self.y.copy_(self.ys[i])


def eager_run(make: Callable) -> list[list[torch.Tensor]]:
    """WARMUP + REPLAYS eager steps from a fresh setup; what is observed after each of the last REPLAYS steps."""
    case = make()
    seen = []
    for i in range(WARMUP + REPLAYS):
        case.set_input(i)
        case.step()
        if i >= WARMUP:
            seen.append(case.observed())
    sync()
    assert not case.opt.is_perturbed, "eager step left the weights perturbed"
    return seen


def graph_run(make: Callable) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The same steps: WARMUP eager on a side stream, one captured, replayed REPLAYS times with new inputs."""
    case = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(WARMUP):
            case.set_input(i)
            case.step()
    torch.cuda.current_stream().wait_stream(side)
    before = case.observed()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.step()
    if case.opt.is_perturbed:
        raise RuntimeError("the captured step left the optimizer marked as perturbed")
    seen = []
    for i in range(WARMUP, WARMUP + REPLAYS):
        case.set_input(i)
        graph.replay()
        seen.append(case.observed())
    torch.cuda.synchronize()
    return seen, before


def check_case(name: str, make: Callable, exact_required: bool = True) -> None:
    t0 = time.perf_counter()
    try:
        eager = eager_run(make)
        eager2 = eager_run(make)
        ok = all(same_bits(a, b) for a, b in zip(eager, eager2))
        detail = f"two eager runs of {WARMUP + REPLAYS} steps bit-identical: {ok}"
        case = make()
        if case.kind == "restore":
            w0 = [p.detach().clone() for p in case.params]
            case.set_input(0)
            case.step()
            sync()
            exact, moved = same_bits([p.detach() for p in case.params], w0), not same_bits(case.snap, w0)
            ok = ok and exact and moved
            detail += f"; restore gives back w bit for bit: {exact}; w + e differs from w: {moved}"
        record(f"eager {name}", "PASS" if ok else "FAIL", detail, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record(f"eager {name}", "FAIL", f"{type(e).__name__}: {str(e).strip()[:300]}", time.perf_counter() - t0)
        return
    t0 = time.perf_counter()
    if not IS_CUDA:
        record(f"graph {name}", "SKIP", f"no CUDA device ({DEV}): capture not run", 0.0)
        return
    try:
        replayed, before = graph_run(make)
        changed = not same_bits(replayed[-1], before)
        exact = [same_bits(r, e) for r, e in zip(replayed, eager)]
        diff = max(max_abs_diff(r, e) for r, e in zip(replayed, eager))
        detail = (f"{REPLAYS} replays after {WARMUP} warm-up steps: bit-identical to eager {sum(exact)}/{len(exact)}"
                  f" (max |diff| {diff:.1e}); weights moved by the replays: {changed}")
        if all(exact) and changed:
            status = "PASS"
        elif not changed:
            status = "FAIL"
        elif exact_required:
            status = "FAIL"
        else:
            close = all(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)
                        for r, e in zip(replayed, eager) for a, b in zip(r, e))
            status = "WARN" if close else "FAIL"
        record(f"graph {name}", status, detail, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record(f"graph {name}", "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
               time.perf_counter() - t0)


def main() -> int:
    report = sam_fused.backends()
    usable = [b for b in WANTED if report[b].available]
    print(f"GRAPH device {DEV}; backends {usable} (wanted {WANTED})", flush=True)
    for b in WANTED:
        if b not in usable:
            record(f"backend {b}", "FAIL", f"unavailable: {report[b].detail}")
    for b in usable:
        cases = [
            ("first_step+restore SAM fp32", lambda b=b: Synthetic(b, "restore", torch.float32, "sam")),
            ("first_step+restore ASAM bf16", lambda b=b: Synthetic(b, "restore", torch.bfloat16, "asam")),
            ("first_step+second_step SAM+SGD", lambda b=b: Synthetic(b, "second", torch.float32, "sam_sgd")),
            ("first_step+second_step ASAM+AdamW", lambda b=b: Synthetic(b, "second", torch.float32, "asam_adamw")),
            ("first_step+second_step F-SAM+SGD", lambda b=b: Synthetic(b, "second", torch.float32, "fsam_sgd")),
        ]
        for name, make in cases:
            check_case(f"{b} {name}", make)
        check_case(f"{b} mlp forward+backward+SAM step", lambda b=b: Mlp(b), exact_required=False)
    with open(os.path.join(OUTDIR, "checks_graphs.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
