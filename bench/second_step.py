"""SAM's second step with torch.optim.SGD as the base optimizer: restore + SGD update, fused vs two passes.

    python -m sam_fused.bench.second_step [--profiles resnet50,vit_b16,many_small] [--repeat 10] [--json PATH]

Per profile (fp32, SGD with momentum 0.9, nesterov, weight decay 5e-4, momentum buffers already created):
  * restore_ + SGD.step()           sam_fused restore_, then torch's default (single-tensor on the CPU) SGD step
  * restore_ + SGD(foreach).step()  the same with torch's multi-tensor SGD
  * restore_sgd_ (fused)            sam_fused.ops.restore_sgd_: one pass, bit-for-bit the result of the two above
Implementations are timed round-robin (one call each per round); the table reports medians and ratios to the
fused op, measured in the same run. The fused op moves 20 bytes per fp32 parameter (backup, g and buffer read; w and
buffer written); the two passes move 28 plus torch's temporaries. This is a benchmark, not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch

from sam_fused import ops

from . import profiles, timing

HYPER = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_calls(named: profiles.NamedShapes) -> dict[str, Callable[[], None]]:
    params, grads, backups = profiles.materialize(named)
    calls = {}
    for name, foreach in (("restore_ + SGD.step()", False), ("restore_ + SGD(foreach).step()", True)):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.SGD(ps, foreach=foreach, **HYPER)
        for p, g in zip(ps, grads):
            p.grad = g
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)

        def two_pass(ps: list = ps, opt: torch.optim.Optimizer = opt) -> None:
            with torch.no_grad():
                ops.restore_(ps, backups)
            opt.step()

        calls[name] = two_pass
    w, bufs = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    h = HYPER
    calls["restore_sgd_ (fused)"] = lambda: ops.restore_sgd_(w, backups, grads, bufs, h["lr"], h["weight_decay"],
                                                             h["momentum"], 0.0, h["nesterov"])
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sam_fused.bench.second_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default="resnet50,vit_b16,many_small",
                   help=f"comma list of {', '.join(sorted(profiles.PROFILES))} (default resnet50,vit_b16,many_small)")
    p.add_argument("--repeat", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and the machine info as JSON")
    args = p.parse_args(argv)
    unknown = [x for x in args.profiles.split(",") if x not in profiles.PROFILES]
    if unknown:
        p.error(f"unknown profile(s) {', '.join(unknown)}; choose from {', '.join(sorted(profiles.PROFILES))}")
    device = torch.device("cpu")
    machine = timing.machine_info(device)
    print(f"second step (restore + SGD, fp32): {machine['device_name']}, {machine['threads']} threads, "
          f"torch {machine['torch']}, median of {args.repeat} round-robin repeats after {args.warmup} warmups")
    rows = []
    for profile in args.profiles.split(","):
        named = profiles.shapes(profile)
        calls = make_calls(named)
        for fn in calls.values():
            timing.warm_up(fn, args.warmup, device)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeat):
            for name, fn in calls.items():
                samples[name] += timing.cpu_times_ms(fn, 1)
        fused = statistics.median(samples["restore_sgd_ (fused)"])
        for name, s in samples.items():
            median = statistics.median(s)
            rows.append({"profile": profile, "impl": name, "params": profiles.numel(named), "median_ms": median,
                         "min_ms": min(s), "vs_fused": median / fused})
        del calls
    print(f"\n{'profile':<11} {'implementation':<31} {'median ms':>10} {'min ms':>9} {'time / fused':>13}")
    for r in rows:
        print(f"{r['profile']:<11} {r['impl']:<31} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {r['vs_fused']:>12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "hyper": HYPER, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
