"""Summary of a scripts/gpu_check.sh run: the stage table, a bench/RESULTS.md table to paste, bench details, checks.

Usage: python scripts/gpu/summarize.py LOG_DIR [ROWS_FILE]
  LOG_DIR    holds bench_*.json (python -m sam_fused.bench --json) and checks_*.json (edge.py, graphs.py)
  ROWS_FILE  the stage rows gpu_check.sh wrote (name status seconds ran_on note), printed first
Reads only files; needs no GPU and no torch (the dry run runs it on the CPU machine).
"""

from __future__ import annotations

import glob
import json
import os
import sys

RANK = {"PASS": 0, "SKIP": 1, "INFO": 2, "WARN": 3, "FAIL": 4}
PROFILE_LABEL = {"resnet50": "ResNet-50", "vit_b16": "ViT-B/16", "many_small": "many small", "tiny": "tiny"}
GPU_BACKENDS = ("cuda", "triton")


def load(path: str, out: list[str]):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        out.append(f"(could not read {os.path.basename(path)}: {e})")
        return None


def fmt(x, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def stage_table(rows_file: str | None) -> list[str]:
    if not rows_file or not os.path.exists(rows_file):
        return []
    out = ["== stages (ran on: gpu = ran kernels on the GPU; cpu = on the CPU only (build, dry run); - = not run) ==",
           f"{'stage':13s} {'status':7s} {'secs':>5s} {'ran on':7s} note"]
    with open(rows_file) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4:
                name, status, secs, ran_on = parts[:4]
                note = parts[4] if len(parts) > 4 else ""
                out.append(f"{name:13s} {status:7s} {secs:>5s} {ran_on:7s} {note}")
    return out


def results_md(benches: list[tuple[str, dict]], checks: list[dict]) -> list[str]:
    """The GPU section's table for bench/RESULTS.md: copy bandwidth, the fused step (first_step + restore) per profile
    and backend with x roofline, vs loop and vs foreach; then the CUDA-graph line."""
    out = []
    for name, rep in benches:
        m, st = rep.get("machine", {}), rep.get("settings", {})
        if st.get("device") != "cuda":
            continue
        steps = [r for r in rep.get("rows", []) if r.get("op") == "step" and r.get("backend") in GPU_BACKENDS]
        if not steps:
            continue
        variant = f"{st.get('dtype')}{', ASAM' if st.get('adaptive') else ''}"
        out.append(f"### GPU: {m.get('device_name')}, {variant} (`{name}`; torch {m.get('torch')}, "
                   f"median of {st.get('repeat')} after {st.get('warmup')} warm-up)")
        out.append("")
        out.append(f"copy bandwidth (`copy_`, best of start/end): {fmt(m.get('copy_bandwidth_gbps'), '.0f')} GB/s "
                   f"(start {fmt(m.get('copy_bandwidth_start_gbps'), '.0f')}, "
                   f"end {fmt(m.get('copy_bandwidth_end_gbps'), '.0f')})")
        out.append("")
        out.append("| profile | backend | fused step (ms) | GB/s | x roofline | vs loop | vs foreach |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        prof = rep.get("profiles", {})
        for r in steps:
            p = prof.get(r["profile"], {})
            label = PROFILE_LABEL.get(r["profile"], r["profile"])
            if p:
                label += f" ({p.get('tensors')} tensors, {p.get('params', 0) / 1e6:.1f} M)"
            out.append(f"| {label} | `{r['backend']}` | {fmt(r.get('median_ms'), '.3f')} | {fmt(r.get('gbps'), '.0f')} "
                       f"| {fmt(r.get('x_roofline'), '.2f')} | {fmt(r.get('speedup_vs_loop'), '.2f', 'x')} "
                       f"| {fmt(r.get('speedup_vs_foreach'), '.2f', 'x')} |")
        out.append("")
    graphs = [c for c in checks if c.get("group") == "graphs" and c["check"].startswith("graph ")]
    ran = [c for c in graphs if c["status"] != "SKIP"]
    if ran:
        per = {}
        for c in ran:
            b = c["check"].split()[1]
            ok, n = per.get(b, (0, 0))
            per[b] = (ok + (c["status"] == "PASS"), n + 1)
        parts = ", ".join(f"`{b}` {ok}/{n}" for b, (ok, n) in per.items())
        warn = [c["check"] for c in ran if c["status"] == "WARN"]
        fail = [c["check"] for c in ran if c["status"] == "FAIL"]
        out.append(f"CUDA graphs (scripts/gpu/graphs.py): whole SAM steps captured after warm-up and replayed, "
                   f"bit-identical to eager: {parts} cases"
                   + (f"; close but not bit-identical: {', '.join(warn)}" if warn else "")
                   + (f"; FAILED: {', '.join(fail)}" if fail else "") + ".")
    elif graphs:
        out.append("CUDA graphs: not run (no GPU).")
    if out:
        out = ["== for bench/RESULTS.md (GPU section; markdown, paste as is) ==", ""] + out
    return out


def bench_details(benches: list[tuple[str, dict]]) -> list[str]:
    out = []
    for name, rep in benches:
        m, st = rep.get("machine", {}), rep.get("settings", {})
        out.append(f"== {name}: {st.get('device')} {m.get('device_name')}, copy "
                   f"{fmt(m.get('copy_bandwidth_gbps'), '.0f')} GB/s, {st.get('dtype')}"
                   f"{' adaptive' if st.get('adaptive') else ''} ==")
        out.append(f"{'profile':11s} {'op':11s} {'backend':8s} {'ms':>9s} {'GB/s':>7s} {'xroof':>6s} "
                   f"{'vs loop':>8s} {'vs foreach':>10s}")
        for r in rep.get("rows", []):
            if r.get("backend") in ("loop", "foreach"):
                continue
            out.append(f"{r['profile']:11s} {r['op']:11s} {r['backend']:8s} {fmt(r.get('median_ms'), '9.3f')} "
                       f"{fmt(r.get('gbps'), '7.0f')} {fmt(r.get('x_roofline'), '6.2f')} "
                       f"{fmt(r.get('speedup_vs_loop'), '7.2f', 'x'):>8s} "
                       f"{fmt(r.get('speedup_vs_foreach'), '9.2f', 'x'):>10s}")
        for f in rep.get("failures", []):
            out.append(f"BENCH FAILED {f['backend']} {f['op']} {f['profile']}: {f['error'][:200]}")
        for b, why in rep.get("skipped", {}).items():
            out.append(f"(backend {b} skipped: {why})")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    log = argv[1]
    notes: list[str] = []
    benches = []
    for path in sorted(glob.glob(os.path.join(log, "bench_*.json"))):
        rep = load(path, notes)
        if rep:
            benches.append((os.path.basename(path), rep))
    checks: list[dict] = []
    for path in sorted(glob.glob(os.path.join(log, "checks_*.json"))):
        checks += load(path, notes) or []
    lines = stage_table(argv[2] if len(argv) > 2 else None)
    md = results_md(benches, checks)
    if md:
        lines += [""] + md
    if benches:
        lines += [""] + bench_details(benches)
    if checks:  # worst last, so that the tail of a long output keeps them
        lines += ["", "== checks (edge.py, graphs.py; worst last) =="]
        for r in sorted(checks, key=lambda r: RANK.get(r["status"], 5)):
            lines.append(f"{r['status']:5s} {r['group']:6s} {r['check']:44s} {r['detail'][:600]}")
    print("\n".join(notes + lines).strip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
