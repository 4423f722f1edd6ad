"""`python -m sam_fused.bench` (or `sam-fused-bench`): time the SAM op layer per backend, print one table.

Rows are op x backend x profile. Ops: grad_sumsq, perturb_, restore_ and "step" (first_step + restore, i.e.
grad_sumsq + perturb_ + restore_), for every sam_fused backend usable on the device, plus two pseudo-backends: "loop"
(the per-parameter Python loop of the most used SAM port) and "foreach" (torch._foreach_*), see baselines.py.

The work is memory-bound (docs/DESIGN.md section 8), so each row reports the effective bandwidth over the op's minimal
traffic and the ratio of its time to the roofline: that traffic at the machine's copy bandwidth (best dst.copy_(src),
measured at the start and the end of the run). "vs loop" / "vs foreach" divide the baseline's time for the same op (its
equivalent part) by the row's time. Backends are timed round-robin, one call each per round, so that load from other
users of a shared machine hits them alike: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from . import baselines, host, profiles, timing

OPS = ("grad_sumsq", "perturb_", "restore_", "step")
# Minimal element reads + writes per parameter: grad_sumsq reads g; perturb_ reads w, g and writes w, backup;
# restore_ reads backup and writes w. ASAM's norm also needs |w|, one more read (grad_sumsq and step).
ACCESSES = {"grad_sumsq": 1, "perturb_": 4, "restore_": 2, "step": 7}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROFILES = "resnet50,vit_b16,many_small"
LEGEND = ("x roofline: time / memory-traffic bound (lower is better; 1.00 = copy speed) | vs loop, vs foreach: speedup "
          "over the per-parameter-loop port, over torch._foreach_* code | torch: sam_fused's pure-PyTorch backend")
QUICK_PROFILES = "tiny,many_small"


def bytes_moved(op: str, numel: int, itemsize: int, adaptive: bool, impl: baselines.Impl) -> int:
    if op == "restore_" and not impl.restore_copies:
        return 0
    extra = 1 if adaptive and op in ("grad_sumsq", "step") else 0
    return (ACCESSES[op] + extra) * itemsize * numel


def op_call(impl: baselines.Impl, op: str, tensors: tuple, rho: float, adaptive: bool) -> Callable[[], object]:
    """A no-argument callable running `op` of `impl`; its inputs (norm, perturbed state) are prepared here, untimed."""
    params, grads, backups = tensors
    if op == "grad_sumsq":
        return lambda: impl.norm(params, grads, adaptive)
    if op == "step":
        return lambda: impl.step(params, grads, backups, rho, adaptive)
    norm = impl.norm(params, grads, adaptive)
    if op == "perturb_":
        return lambda: impl.perturb(params, grads, backups, norm, rho, adaptive)
    saved = impl.perturb(params, grads, backups, norm, rho, adaptive)  # restore_ needs a perturbed state
    return lambda: impl.restore(params, backups, saved)


class Progress:
    """Progress on stderr, so that the table on stdout stays clean: one rewritten line on a terminal, one line per
    (profile, op) in a log (a CI job or `> file` shows where a run of several minutes is)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.live, self.text = sys.stderr.isatty(), ""

    def set_description(self, text: str) -> None:
        self.text = text
        elapsed = time.perf_counter() - self.start
        line = f"[{self.done}/{self.total} rounds, {elapsed:.0f} s] {text}"
        if self.live:
            print(f"\r{line:<60}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.live:
            self.set_description(self.text)

    def close(self) -> None:
        if self.live:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)


def measure_op(op: str, impls: dict[str, baselines.Impl], tensors: tuple, args: argparse.Namespace,
               timer: timing.Timer, bar, failure: Callable[[str, Exception], None]) -> dict[str, list[float]]:
    """Samples (ms) of `op` per implementation, taken round-robin; an implementation that raises is dropped."""
    calls = {}
    for name, impl in impls.items():
        try:
            fn = op_call(impl, op, tensors, args.rho, args.adaptive)
            timing.warm_up(fn, args.warmup, args.device)
            calls[name] = fn
        except Exception as e:  # a backend under development must not stop the whole run
            failure(name, e)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeat):
        for name, fn in list(calls.items()):
            try:
                samples[name] += timer(fn, 1)
            except Exception as e:
                failure(name, e)
                del calls[name], samples[name]
        bar.update()
    return samples


def make_row(profile: str, named: profiles.NamedShapes, op: str, impl: baselines.Impl, samples: list[float],
             itemsize: int, args: argparse.Namespace) -> dict:
    numel = profiles.numel(named)
    median = statistics.median(samples)
    return {"profile": profile, "op": op, "backend": impl.name, "dtype": args.dtype, "device": str(args.device),
            "tensors": len(named), "params": numel, "bytes": bytes_moved(op, numel, itemsize, args.adaptive, impl),
            "median_ms": median, "min_ms": min(samples), "times_ms": samples}


def bench_profile(name: str, impls: dict[str, baselines.Impl], args: argparse.Namespace, timer: timing.Timer,
                  bar, failures: list[dict]) -> list[dict]:
    named = profiles.shapes(name)
    tensors = profiles.materialize(named, args.device, DTYPES[args.dtype])
    itemsize = tensors[0][0].element_size()
    rows = []
    for op in args.ops:
        bar.set_description(f"{name} {op}")

        def failure(backend: str, e: Exception, op: str = op) -> None:
            failures.append({"profile": name, "op": op, "backend": backend, "error": f"{type(e).__name__}: {e}"})

        samples = measure_op(op, impls, tensors, args, timer, bar, failure)
        rows += [make_row(name, named, op, impls[b], s, itemsize, args) for b, s in samples.items()]
    del tensors  # ViT-B fp32 params + grads + backups is ~1 GB: free before the next profile
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_derived(rows: list[dict], bandwidth: float) -> None:
    """GB/s, ratio to the roofline, and speedup_vs_<baseline> = baseline time / row time for the same profile and op
    (None where not measured or not comparable: the loop's restore copies nothing)."""
    for r in rows:
        seconds = r["median_ms"] * 1e-3
        r["gbps"] = r["bytes"] / seconds / 1e9 if r["bytes"] else None
        r["roofline_ms"] = r["bytes"] / bandwidth * 1e3
        r["x_roofline"] = r["median_ms"] / r["roofline_ms"] if r["bytes"] else None
    by_key = {(r["profile"], r["op"], r["backend"]): r for r in rows}
    for r in rows:
        for base in baselines.BASELINES:
            b = by_key.get((r["profile"], r["op"], base))
            comparable = b is not None and (b["bytes"] > 0) == (r["bytes"] > 0)
            r[f"speedup_vs_{base}"] = b["median_ms"] / r["median_ms"] if comparable else None


def format_table(rows: list[dict]) -> str:
    def num(x: float | None, spec: str, suffix: str = "") -> str:
        return "n/a" if x is None else f"{x:{spec}}{suffix}"

    header = (f"{'profile':<11} {'op':<11} {'backend':<8} {'median ms':>10} {'GB/s':>7} {'x roofline':>10} "
              f"{'vs loop':>8} {'vs foreach':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['profile']:<11} {r['op']:<11} {r['backend']:<8} {r['median_ms']:>10.3f} "
                     f"{num(r['gbps'], '.2f'):>7} {num(r['x_roofline'], '.2f'):>10} "
                     f"{num(r['speedup_vs_loop'], '.2f', 'x'):>8} {num(r['speedup_vs_foreach'], '.2f', 'x'):>10}")
    return "\n".join(lines)


def prog_name() -> str:
    """How the user started us: the console script or `python -m`."""
    return "sam-fused-bench" if os.path.basename(sys.argv[0]) == "sam-fused-bench" else "python -m sam_fused.bench"


def parse_device(p: argparse.ArgumentParser, text: str) -> torch.device:
    """--device, refused with a clear message (exit 2) when this process cannot run it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        p.error(f"--device {text!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            p.error(f"--device {text}: no CUDA device is visible (torch {torch.__version__} is {build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        p.error(f"--device {text}: the benchmark runs on cpu or cuda")
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = baselines.impl_names()
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog=prog_name(), description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device,
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--profiles", default=None, help=f"comma list of {', '.join(sorted(profiles.PROFILES))} "
                   f"(default {DEFAULT_PROFILES}; with --quick {QUICK_PROFILES})")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="storage dtype (default float32)")
    p.add_argument("--backends", default=None, help=f"comma list of {', '.join(names)} (default: every backend "
                   "usable on the device, plus loop and foreach); a listed backend that cannot run here is an error")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)} (default all)")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds per op (default 10; with --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per op and backend (default 2; --quick 1)")
    p.add_argument("--rho", type=float, default=0.05, help="SAM radius (default 0.05)")
    p.add_argument("--adaptive", action="store_true", help="ASAM (T = |w|, eta = 0, as in the most used port)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, small profiles, small copy buffer")
    p.add_argument("--json", metavar="PATH", help="also write every row and the machine info as JSON")
    p.add_argument("--host", action="store_true", help=f"time the host overhead instead: SAM.first_step + restore "
                   f"and the op layer on {host.TENSORS} one-element tensors, in us per step and per tensor")
    args = p.parse_args(argv)
    args.device = parse_device(p, args.device)
    args.profiles = (args.profiles or (QUICK_PROFILES if args.quick else DEFAULT_PROFILES)).split(",")
    args.ops = args.ops.split(",")
    args.backends = args.backends.split(",") if args.backends else None
    args.repeat = args.repeat or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")
    for what, given, allowed in (("profile", args.profiles, profiles.PROFILES), ("op", args.ops, OPS),
                                 ("backend", args.backends or [], names)):
        for x in given:
            if x not in allowed:
                p.error(f"unknown {what} {x!r}; choose from {', '.join(sorted(allowed))}")
    args.parser = p
    return args


def select_impls(args: argparse.Namespace) -> tuple[dict[str, baselines.Impl], dict[str, str]]:
    """The implementations to time, and the requested (or, by default, all) backends that cannot run here, with why."""
    usable, skipped = baselines.device_backends(args.device)
    if args.backends:
        wanted = args.backends
        refused = [f"backend {b} cannot run on {args.device} here: {why}" for b, why in skipped.items() if b in wanted]
        if refused:
            args.parser.error("; ".join(refused))
        skipped = {}
    else:
        wanted = usable + list(baselines.BASELINES)
    return {b: baselines.make_impl(b) for b in wanted if b not in skipped}, skipped


def main_host(args: argparse.Namespace, impls: dict[str, baselines.Impl]) -> int:
    """--host: the per-tensor host cost of a step (bench/host.py); --profiles, --ops and --dtype do not apply."""
    machine = timing.machine_info(args.device)
    print(f"sam_fused bench --host: {machine['device_name']} ({args.device}), {machine['threads']} threads, "
          f"torch {machine['torch']}; first_step + restore on {host.TENSORS} x 1 fp32 tensors, median of "
          f"{args.repeat} after {args.warmup} warmup")
    rows = host.measure([b for b in impls if b != "foreach"], args.device, args.repeat, args.warmup)
    print(host.format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    impls, skipped = select_impls(args)
    if args.host:
        return main_host(args, impls)
    timer, timer_name = timing.make_timer(args.device)
    copy_numel = 1 << (24 if args.quick else 26)
    bandwidth_start = timing.copy_bandwidth(args.device, timer, copy_numel, max(args.repeat, 5))

    machine = timing.machine_info(args.device)
    print(f"sam_fused bench: {machine['device_name']} ({args.device}), {machine['threads']} threads, "
          f"torch {machine['torch']}, {args.dtype}{', adaptive' if args.adaptive else ''}, rho {args.rho}; "
          f"timer {timer_name}, median of {args.repeat} after {args.warmup} warmup")
    for b, why in skipped.items():
        print(f"skipped backend {b}: {why}")
    for name in args.profiles:
        named = profiles.shapes(name)
        print(f"profile {name}: {len(named)} tensors, {profiles.numel(named):,} parameters")

    rows: list[dict] = []
    failures: list[dict] = []
    bar = Progress(len(args.profiles) * len(args.ops) * args.repeat)
    with torch.no_grad():
        for name in args.profiles:
            rows += bench_profile(name, impls, args, timer, bar, failures)
    bar.close()
    bandwidth_end = timing.copy_bandwidth(args.device, timer, copy_numel, max(args.repeat, 5))
    bandwidth = max(bandwidth_start, bandwidth_end)
    add_derived(rows, bandwidth)
    machine |= {"copy_bandwidth_gbps": bandwidth / 1e9, "copy_bandwidth_start_gbps": bandwidth_start / 1e9,
                "copy_bandwidth_end_gbps": bandwidth_end / 1e9, "copy_numel": copy_numel, "timer": timer_name}

    print(f"copy bandwidth (best dst.copy_(src) of {copy_numel:,} fp32, read + write): {bandwidth / 1e9:.2f} GB/s "
          f"(start {bandwidth_start / 1e9:.2f}, end {bandwidth_end / 1e9:.2f})\n")
    print(LEGEND)
    print(format_table(rows))
    print("GB/s and x roofline count the op's minimal traffic; x roofline = median time / (bytes / copy bandwidth).\n"
          "loop restore_ swaps storage (p.data = old_p) and copies nothing (n/a); it paid for clones in its perturb_.")
    for f in failures:
        print(f"FAILED {f['backend']} {f['op']} on {f['profile']}: {f['error']}")
    if args.json:
        settings = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items() if k != "parser"}
        sizes = {n: {"tensors": len(profiles.shapes(n)), "params": profiles.numel(profiles.shapes(n))}
                 for n in args.profiles}
        report = {"machine": machine, "settings": settings, "skipped": skipped, "failures": failures,
                  "profiles": sizes, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
