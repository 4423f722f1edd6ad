"""Host overhead of a SAM step: ``python -m sam_fused.bench --host``.

first_step + restore on many one-element tensors, so that the kernels' own work is negligible and what is timed is
the per-tensor host cost: the optimizer's bookkeeping (slots, backups), the op layer's grouping, the dispatch and
the kernels' argument checks. Rows: the SAM optimizer, and the op layer called directly (grad_sumsq + perturb_ +
restore_), per backend; the loop port for scale. Reported as microseconds per step and per tensor (medians).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

import sam_fused

from . import baselines, timing

TENSORS = 2000


def _tensors(n: int, device: torch.device) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1, generator=gen).to(device)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(1, generator=gen).to(device)
    return params, [p.grad for p in params]


def step_calls(backend: str, n: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """The timed calls for one backend: "SAM" (the optimizer) and "ops" (the op layer directly), or "loop"."""
    params, grads = _tensors(n, device)
    weights = [p.detach() for p in params]
    if backend == "loop":
        return {"ops": lambda: baselines.loop_step(weights, grads, [])}
    opt = sam_fused.SAM(params, torch.optim.SGD, lr=0.1, backend=backend)
    backups = [torch.empty_like(w) for w in weights]

    def sam_step() -> None:
        opt.first_step()
        opt.restore()

    return {"SAM": sam_step, "ops": lambda: baselines.fused_step(weights, grads, backups, backend=backend)}


def measure(backends: list[str], device: torch.device, repeat: int, warmup: int,
            n: int = TENSORS) -> list[dict]:
    """One row per (backend, level): median microseconds per step and per tensor, timed round-robin."""
    timer, _ = timing.make_timer(device)
    calls = {(b, level): fn for b in backends for level, fn in step_calls(b, n, device).items()}
    for fn in calls.values():
        timing.warm_up(fn, warmup, device)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    with torch.no_grad():
        for _ in range(repeat):
            for key, fn in calls.items():
                samples[key] += timer(fn, 1)
    rows = []
    for (backend, level), ms in samples.items():
        us = statistics.median(ms) * 1e3
        rows.append({"backend": backend, "level": level, "tensors": n, "us_per_step": us, "us_per_tensor": us / n})
    return rows


def format_rows(rows: list[dict]) -> str:
    header = f"{'backend':<8} {'level':<5} {'tensors':>7} {'us/step':>10} {'us/tensor':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['backend']:<8} {r['level']:<5} {r['tensors']:>7} {r['us_per_step']:>10.0f} "
                     f"{r['us_per_tensor']:>10.3f}")
    return "\n".join(lines)
