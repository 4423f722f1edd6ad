"""Edge checks of sam_fused's GPU backends, one group per process (run by scripts/gpu_check.sh).

Groups:
  parity  cuda/triton against the C++ cpu backend on CPU copies: misaligned packed views, odd sizes, tails, k slices,
          every op, fp32/bf16/fp16; 3,012 tensors (several launches); determinism of the reductions.
  large   tensors of more than 2^31 elements, k-slices whose j * numel crosses 2^31 (about 20 GB of GPU memory).
  perf    bandwidth against copy_, host overhead, channels_last staging, Triton vector width and recompiles,
          self-check cost, `auto` first use (fresh and inside a CUDA-graph capture), multi-GPU current device.
Every check prints one line `EDGE STATUS name secs detail` and the group writes $EDGE_OUT/checks_<group>.json,
which scripts/gpu/summarize.py reads. Exit status 1 when a check FAILed.

Knobs (environment): EDGE_DEVICE (cuda), EDGE_BACKENDS (cuda,triton), EDGE_LARGE_LOG2 (31), EDGE_BW_LOG2 (28),
EDGE_OUT (.). Dry run without a GPU (what `gpu_check.sh --dry-run` does): EDGE_DEVICE=cpu EDGE_BACKENDS=cpu
EDGE_LARGE_LOG2=20 python scripts/gpu/edge.py parity.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import traceback

import torch

import sam_fused
from sam_fused import ops

GROUP = sys.argv[1] if len(sys.argv) > 1 else "parity"
OUTDIR = os.environ.get("EDGE_OUT", ".")
DEV = torch.device(os.environ.get("EDGE_DEVICE", "cuda"))
IS_CUDA = DEV.type == "cuda"
LARGE_LOG2 = int(os.environ.get("EDGE_LARGE_LOG2", "31"))
BW_LOG2 = int(os.environ.get("EDGE_BW_LOG2", "28"))  # 2^28 fp32 = 1 GiB per tensor
REPORT = sam_fused.backends()
WANTED = [b for b in os.environ.get("EDGE_BACKENDS", "cuda,triton").split(",") if b]
USABLE = [b for b in WANTED if REPORT[b].available]
CPU_B = "cpu" if REPORT["cpu"].available else "torch"
results: list[dict] = []


def sync() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


def record(name: str, status: str, detail: str = "", secs: float = 0.0) -> None:
    results.append({"group": GROUP, "check": name, "status": status, "secs": round(secs, 2), "detail": detail})
    print(f"EDGE {status:5s} {name:40s} {secs:6.1f}s  {detail}", flush=True)


def run(name: str, fn) -> None:
    """fn() returns (status, detail) or a detail string (PASS); an exception is a FAIL."""
    t0 = time.perf_counter()
    try:
        out = fn()
        status, detail = out if isinstance(out, tuple) else ("PASS", out or "")
        sync()
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        status, detail = "FAIL", f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
        traceback.print_exc()
        if "illegal" in str(e).lower() or "misaligned" in str(e).lower():
            detail += " [CUDA context is now unusable: later checks of this group will fail too]"
    record(name, status, detail, time.perf_counter() - t0)
    if IS_CUDA:
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def bench_ms(fn) -> float:
    if not IS_CUDA:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    r = do_bench(fn, warmup=10, rep=60, quantiles=[0.5])
    return float(r[0] if isinstance(r, (list, tuple)) else r)


# ------------------------------------------------------------------------------------------------- comparisons


def _ordered(x: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32 if x.element_size() == 4 else torch.int16).long()
    sign = 1 << (x.element_size() * 8 - 1)
    return torch.where(bits >= 0, bits, -(bits + sign))


def max_ulp(a_list, b_list) -> float:
    worst = 0
    for a, b in zip(a_list, b_list):
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        if a.numel() == 0:
            continue
        if not torch.equal(a.isnan(), b.isnan()):
            return float("inf")
        keep = ~a.isnan()
        d = (_ordered(a)[keep] - _ordered(b)[keep]).abs()
        if d.numel():
            worst = max(worst, int(d.max()))
    return worst


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    iv = torch.int32 if a.element_size() == 4 else torch.int16
    return torch.equal(a.view(iv), b.view(iv))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------------------- tensor lists


def packed(shapes, dtype, offset: int, gen, lead: int | None = None, device=None) -> list:
    """Tensors packed back to back in one buffer starting `offset` elements in: odd sizes and offsets give
    data_ptrs that are not 16-byte aligned (the kernels' scalar path), as in a flattened parameter buffer."""
    device = DEV if device is None else device
    full = [((lead,) if lead else ()) + tuple(s) for s in shapes]
    sizes = [math.prod(s) for s in full]
    buf = torch.empty(sum(sizes) + offset, dtype=dtype, device=device)
    out, pos = [], offset
    for s, n in zip(full, sizes):
        v = buf[pos:pos + n].view(s)
        v.copy_(torch.randn(s, generator=gen).to(dtype))
        out.append(v)
        pos += n
    return out


def like_packed(ts: list, offset: int) -> list:
    """Copies of ts packed the same way (same values, other addresses)."""
    buf = torch.empty(sum(t.numel() for t in ts) + offset, dtype=ts[0].dtype, device=ts[0].device)
    out, pos = [], offset
    for t in ts:
        v = buf[pos:pos + t.numel()].view(t.shape)
        v.copy_(t)
        out.append(v)
        pos += t.numel()
    return out


def misaligned(ts: list) -> int:
    return sum(1 for t in ts if t.numel() and t.data_ptr() % 16)


SHAPES = [(0,), (), (1,), (7,), (33, 5), (3, 4, 5, 6), (2, 0, 3), (70_001,), (257, 259), (2 * 16384 + 3,), (8,), (9, 1)]


# ------------------------------------------------------------------------------------------------- group: parity


def parity(backend: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    k = 3
    P = packed(SHAPES, dtype, 1, gen)
    G = packed(SHAPES, dtype, 3, gen)
    KG = packed(SHAPES, dtype, 5, gen, lead=k)
    E = packed(SHAPES, dtype, 0, gen)
    Pc, Gc, KGc, Ec = ([t.cpu() for t in L] for L in (P, G, KG, E))
    problems, worst = [], {"sum_rel": 0.0, "ulp": 0.0}

    def ulp(name, a, b):
        u = max_ulp(a, b)
        worst["ulp"] = max(worst["ulp"], u)
        if u > 1:
            problems.append(f"{name}: {u} ulp")

    def srel(name, a, b, tol=1e-5):
        r = rel_err(a, b)
        worst["sum_rel"] = max(worst["sum_rel"], r)
        if not r <= tol:
            problems.append(f"{name}: rel {r:.2e}")

    for adaptive in (False, True):
        tag = "asam" if adaptive else "sam"
        pg, pc = (P, Pc) if adaptive else (None, None)
        s_dev = ops.grad_sumsq(G, pg, 0.01, backend=backend)
        s_cpu = ops.grad_sumsq(Gc, pc, 0.01, backend=CPU_B)
        srel(f"grad_sumsq {tag}", s_dev, s_cpu)
        W, Bk = like_packed(P, 1), like_packed(P, 2)
        for b in Bk:
            b.fill_(float("nan"))  # poison: every backup element must be written
        Wc, Bc = [t.clone() for t in Pc], [torch.empty_like(t) for t in Pc]
        ops.perturb_(W, G, Bk, s_cpu.to(DEV), 0.05, 1e-12, adaptive, 0.01, True, backend=backend)
        ops.perturb_(Wc, Gc, Bc, s_cpu, 0.05, 1e-12, adaptive, 0.01, True, backend=CPU_B)
        ulp(f"perturb_ {tag}", W, Wc)
        if not all(bit_equal(b, p) for b, p in zip(Bk, Pc)):
            problems.append(f"perturb_ {tag}: backups not bit-exact")
        ops.restore_(W, Bk, backend=backend)
        if not all(bit_equal(w, p) for w, p in zip(W, Pc)):
            problems.append(f"restore_ {tag}: not bit-exact")
        sk = ops.grad_sumsq(KGc, pc, 0.01, k, backend=CPU_B)
        srel(f"grad_sumsq k={k} {tag}", ops.grad_sumsq(KG, pg, 0.01, k, backend=backend), sk)
        out = ops.perturb_batched(P, KG, sk.to(DEV), 0.05, 1e-12, adaptive, 0.01, True, backend=backend)
        outc = ops.perturb_batched(Pc, KGc, sk, 0.05, 1e-12, adaptive, 0.01, True, backend=CPU_B)
        ulp(f"perturb_batched {tag}", out, outc)
        for first in (True, False):
            g1, m1 = like_packed(G, 1), like_packed(E, 3)
            g1c, m1c = [t.clone() for t in Gc], [t.clone() for t in Ec]
            sf = ops.fsam_direction_(g1, m1, 0.7, 0.6, first, pg, 0.01, backend=backend)
            sfc = ops.fsam_direction_(g1c, m1c, 0.7, 0.6, first, pc, 0.01, backend=CPU_B)
            srel(f"fsam first={first} {tag} sum", sf, sfc)
            ulp(f"fsam first={first} {tag} d", g1, g1c)
            ulp(f"fsam first={first} {tag} ema", m1, m1c)
            if first and not all(bit_equal(m, g) for m, g in zip(m1, Gc)):
                problems.append(f"fsam first {tag}: ema not a bit-exact copy of g")
    detail = (f"vs {CPU_B} on CPU; {misaligned(P + G + KG)} misaligned views; worst sum rel {worst['sum_rel']:.1e}, "
              f"worst {worst['ulp']} ulp")
    return ("FAIL", "; ".join(problems[:4]) + " | " + detail) if problems else ("PASS", detail)


def many_tensors(backend: str):
    """3,012 tensors, two of them longer than one launch's 320 x 16K blocks: several launches, partial sums across
    them; compared with the torch reference on the same device."""
    gen, rnd = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 3000, (3000,), generator=rnd).tolist()
    big = 320 * 16384 + 17 if IS_CUDA else 40_000
    shapes = [(n,) for n in sizes] + [(big,)] * 2 + [(5, 1, 3)] * 10
    P, G = packed(shapes, torch.float32, 1, gen), packed(shapes, torch.float32, 0, gen)
    problems = []
    s_ref = ops.grad_sumsq(G, P, 0.01, backend="torch")
    s_new = ops.grad_sumsq(G, P, 0.01, backend=backend)
    if rel_err(s_new, s_ref) > 1e-5:
        problems.append(f"grad_sumsq rel {rel_err(s_new, s_ref):.1e}")
    W, Wr = like_packed(P, 0), like_packed(P, 0)
    Bk, Br = like_packed(P, 1), like_packed(P, 1)
    ops.perturb_(Wr, G, Br, s_ref, 0.05, 1e-12, True, 0.01, True, backend="torch")
    ops.perturb_(W, G, Bk, s_ref, 0.05, 1e-12, True, 0.01, True, backend=backend)
    u = max_ulp(W, Wr)
    if u > 1:
        problems.append(f"perturb_ {u} ulp")
    ops.restore_(W, Bk, backend=backend)
    if not all(bit_equal(a, b) for a, b in zip(W, P)):
        problems.append("restore_ not bit-exact")
    sf = ops.fsam_direction_(like_packed(G, 1), like_packed(P, 0), 0.7, 0.6, False, None, 0.0, backend=backend)
    sfr = ops.fsam_direction_(like_packed(G, 1), like_packed(P, 0), 0.7, 0.6, False, None, 0.0, backend="torch")
    if rel_err(sf, sfr) > 1e-5:
        problems.append(f"fsam sum rel {rel_err(sf, sfr):.1e}")
    launches = ""
    if IS_CUDA:
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                ops.perturb_(W, G, Bk, s_ref, 0.05, 1e-12, True, 0.01, True, backend=backend)
                torch.cuda.synchronize()
            n = sum(e.count for e in prof.key_averages() if "perturb" in e.key)
            launches = f"; perturb_ = {n} kernel launch(es) for {len(shapes)} tensors"
        except Exception as e:  # noqa: BLE001
            launches = f"; profiler: {type(e).__name__}"
    detail = f"{len(shapes)} tensors, {sum(map(math.prod, shapes)):,} elements{launches}"
    return ("FAIL", "; ".join(problems) + " | " + detail) if problems else ("PASS", detail)


def determinism(backend: str):
    gen = torch.Generator().manual_seed(5)
    shapes = [(768, 3072)] * 3 + [(3072,)] * 3 + SHAPES
    P, KG = packed(shapes, torch.float32, 1, gen), packed(shapes, torch.float32, 0, gen, lead=2)
    first = ops.grad_sumsq(KG, P, 0.01, 2, backend=backend)
    same = all(bit_equal(ops.grad_sumsq(KG, P, 0.01, 2, backend=backend), first) for _ in range(5))
    G = [g[0] for g in KG]
    sums = [ops.fsam_direction_(like_packed(G, 1), like_packed(P, 0), 1.0, 0.9, False, None, 0.0,
                                backend=backend) for _ in range(4)]
    same_f = all(bit_equal(s, sums[0]) for s in sums)
    ok = same and same_f
    return ("PASS" if ok else "FAIL", f"grad_sumsq x6 identical: {same}; fsam sum x4 identical: {same_f}")


# ------------------------------------------------------------------------------------------------- group: large


def large_bf16(backend: str):
    """bf16 tensors of 2^31 + 4099 elements (4.3 GB each): element offsets past int32, exact expected values,
    every element checked (backups poisoned with NaN first)."""
    n = (1 << LARGE_LOG2) + 4099
    bf = torch.bfloat16
    problems = []
    g = torch.ones(n, dtype=bf, device=DEV)
    g[-4099:] = 2.0
    s = ops.grad_sumsq([g], backend=backend)
    exact = torch.tensor([float((n - 4099) + 4 * 4099)], dtype=torch.float64).float()
    if rel_err(s, exact) > (0 if backend == "cuda" else 2.5e-7):
        problems.append(f"grad_sumsq {s.item():.1f} != {exact.item():.1f}")
    sumsq = torch.tensor([4.0], device=DEV)
    scale = torch.tensor([0.05]) / (torch.tensor([4.0]).sqrt() + torch.tensor([1e-12]))
    e1, e2 = (scale * 1.0).to(bf).item(), (scale * 2.0).to(bf).item()
    w = torch.zeros(n, dtype=bf, device=DEV)
    b = torch.full((n,), float("nan"), dtype=bf, device=DEV)
    ops.perturb_([w], [g], [b], sumsq, 0.05, backend=backend)
    if not bool((w[:-4099] == e1).all()):
        bad = (w[:-4099] != e1).nonzero()[:3].flatten().tolist()
        problems.append(f"perturb_ head wrong at {bad}")
    if not bool((w[-4099:] == e2).all()):
        problems.append("perturb_ tail (past 2^31) wrong")
    if not bool((b == 0).all()):
        bad = (b != 0).nonzero()[:3].flatten().tolist()
        problems.append(f"backup not written at {bad}")
    ops.restore_([w], [b], backend=backend)
    if not bool((w == 0).all()):
        problems.append("restore_ incomplete")
    del g, w, b
    return ("FAIL", "; ".join(problems)) if problems else ("PASS", f"n = 2^{LARGE_LOG2} + 4099")


def large_slices(backend: str):
    """k = 2 micro-batch slices of a 2^30 + 5 element bf16 tensor: j * numel crosses 2^31."""
    n = (1 << (LARGE_LOG2 - 1)) + 5
    bf = torch.bfloat16
    problems = []
    kg = torch.ones(2, n, dtype=bf, device=DEV)
    kg[1, -5:] = 2.0
    s = ops.grad_sumsq([kg], None, 0.0, 2, backend=backend)
    exact = torch.tensor([float(n), float(n - 5 + 20)], dtype=torch.float64).float()
    if rel_err(s, exact) > 2.5e-7:
        problems.append(f"grad_sumsq k=2 {s.tolist()} != {exact.tolist()}")
    w = torch.zeros(n, dtype=bf, device=DEV)
    out = ops.perturb_batched([w], [kg], torch.tensor([1.0, 4.0], device=DEV), 0.05, backend=backend)[0]
    sc0 = torch.tensor([0.05]) / (torch.tensor([1.0]).sqrt() + torch.tensor([1e-12]))
    sc1 = torch.tensor([0.05]) / (torch.tensor([4.0]).sqrt() + torch.tensor([1e-12]))
    e0, e1, e2 = (sc0 * 1.0).to(bf).item(), (sc1 * 1.0).to(bf).item(), (sc1 * 2.0).to(bf).item()
    if not bool((out[0] == e0).all()):
        problems.append("perturb_batched slice 0 wrong")
    if not bool((out[1, :-5] == e1).all()) or not bool((out[1, -5:] == e2).all()):
        problems.append("perturb_batched slice 1 (offsets past 2^31) wrong")
    del kg, w, out
    return ("FAIL", "; ".join(problems)) if problems else ("PASS", f"k=2 x n = 2^{LARGE_LOG2 - 1} + 5")


def large_fp32_restore(backend: str):
    n = (1 << LARGE_LOG2) + 3
    w = torch.zeros(n, device=DEV)
    b = torch.full((n,), 1.5, device=DEV)
    ops.restore_([w], [b], backend=backend)
    ok = bool((w == 1.5).all())
    s = ops.grad_sumsq([b], backend=backend)
    exact = torch.tensor([2.25 * n], dtype=torch.float64).float()
    ok_s = rel_err(s, exact) <= 2.5e-7
    del w, b
    return ("PASS" if ok and ok_s else "FAIL",
            f"fp32 n = 2^{LARGE_LOG2} + 3: restore_ {'ok' if ok else 'WRONG'}, grad_sumsq {s.item():.4e} "
            f"vs {exact.item():.4e}")


# ------------------------------------------------------------------------------------------------- group: perf


def bandwidth():
    rows, worst = [], 0.0
    for dtype, n in ((torch.float32, 1 << BW_LOG2), (torch.bfloat16, 1 << (BW_LOG2 + 1))):
        p = torch.randn(n, device=DEV).to(dtype)
        g = torch.randn(n, device=DEV).to(dtype)
        b = torch.empty_like(p)
        s = torch.tensor([float(n)], device=DEV)
        es = p.element_size()
        copy_bw = 2 * n * es / (bench_ms(lambda p=p, b=b: b.copy_(p)) * 1e-3)
        for backend in USABLE:
            for op, fn, nbytes in (
                ("grad_sumsq", lambda g=g, be=backend: ops.grad_sumsq([g], backend=be), 1),
                ("perturb_", lambda p=p, g=g, b=b, s=s, be=backend:
                    ops.perturb_([p], [g], [b], s, 1e-9, backend=be), 4),
                ("restore_", lambda p=p, b=b, be=backend: ops.restore_([p], [b], backend=be), 2),
            ):
                ms = bench_ms(fn)
                x = ms / (nbytes * n * es / copy_bw * 1e3)
                worst = max(worst, x)
                rows.append(f"{backend}/{str(dtype)[6:]}/{op} {nbytes * n * es / ms / 1e6:.0f} GB/s x{x:.2f}")
        rows.append(f"copy_/{str(dtype)[6:]} {copy_bw / 1e9:.0f} GB/s")
    return ("WARN" if worst > 1.5 else "INFO", "; ".join(rows) + " (x = time / copy roofline)")


def host_overhead():
    n = 2000
    P = [torch.randn(2048, device=DEV) for _ in range(n)]
    G = [torch.randn(2048, device=DEV) for _ in range(n)]
    Bk = [torch.empty_like(p) for p in P]
    s = torch.tensor([1e6], device=DEV)
    rows, worst = [], 0.0
    for backend in USABLE:
        for op, fn in (("grad_sumsq", lambda be=backend: ops.grad_sumsq(G, backend=be)),
                       ("perturb_", lambda be=backend: ops.perturb_(P, G, Bk, s, 1e-9, backend=be)),
                       ("restore_", lambda be=backend: ops.restore_(P, Bk, backend=be))):
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            host = (time.perf_counter() - t0) / 5 * 1e3
            sync()
            dev = bench_ms(fn)
            worst = max(worst, host)
            rows.append(f"{backend}/{op} host {host:.2f} ms, timed {dev:.3f} ms")
    return ("WARN" if worst > 1.0 else "INFO", "2000 x 2048 fp32: " + "; ".join(rows))


def channels_last():
    from sam_fused.bench.profiles import resnet50_shapes

    shapes = [s for _, s in resnet50_shapes() if len(s) == 4]
    P = [torch.randn(s, device=DEV).contiguous(memory_format=torch.channels_last) for s in shapes]
    G = [torch.randn_like(p) for p in P]
    b_cf = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in P]  # what SAM._backups_for makes
    b_cl = [torch.empty_like(p) for p in P]  # preserve_format: same strides as the param
    Pc = [p.contiguous() for p in P]
    Gc = [g.contiguous() for g in G]
    b_c = [torch.empty_like(p) for p in Pc]
    s = torch.tensor([1e6], device=DEV)
    rows, worst = [], 1.0
    for backend in USABLE:
        def step(params, grads, backups, backend=backend):
            ops.perturb_(params, grads, backups, s, 1e-9, backend=backend)
            ops.restore_(params, backups, backend=backend)

        t_c = bench_ms(lambda: step(Pc, Gc, b_c))
        t_cl = bench_ms(lambda: step(P, G, b_cl))
        t_cf = bench_ms(lambda: step(P, G, b_cf))
        worst = max(worst, t_cf / t_c, t_cl / t_c)
        rows.append(f"{backend}: contiguous {t_c:.3f} ms, channels_last+cl backups {t_cl:.3f} ms, "
                    f"channels_last+contiguous backups (SAM default) {t_cf:.3f} ms")
    return ("WARN" if worst > 1.5 else "INFO", "ResNet-50 convs perturb_+restore_: " + "; ".join(rows))


def _jit_variants(fn) -> list:
    kernels = []
    for v in (getattr(fn, "device_caches", None) or {}).values():
        cache = v[0] if isinstance(v, tuple) else v
        kernels += list(cache.values())
    if not kernels:
        for v in (getattr(fn, "cache", None) or {}).values():
            kernels += list(v.values())
    return kernels


def triton_vector_width():
    if "triton" not in USABLE:
        return ("SKIP", "triton backend unavailable")
    from sam_fused.kernels import grad_sumsq as tn
    from sam_fused.kernels import perturb as tp

    p = torch.randn(1 << 20, device=DEV)
    g, b = torch.randn_like(p), torch.empty_like(p)
    ops.grad_sumsq([g], backend="triton")
    ops.perturb_([p], [g], [b], torch.ones(1, device=DEV), 1e-9, backend="triton")
    ops.restore_([p], [b], backend="triton")
    rows, vec_total = [], 0
    for name, fn in (("copy", tp._copy_kernel), ("perturb", tp._perturb_kernel), ("sumsq", tn._sumsq_partials)):
        ptx = [getattr(k, "asm", {}).get("ptx", "") for k in _jit_variants(fn)]
        ldst = [ln for x in ptx for ln in x.splitlines() if re.search(r"\b(?:ld|st)\.global\b", ln)]
        vec = sum(1 for ln in ldst if re.search(r"\.v[24]\.", ln))
        scal = len(ldst) - vec
        vec_total += vec
        rows.append(f"{name}: {len(ptx)} variant(s), {vec} vector / {scal} scalar global ld/st")
    return ("WARN" if vec_total == 0 else "INFO", "; ".join(rows))


def triton_recompiles():
    if "triton" not in USABLE:
        return ("SKIP", "triton backend unavailable")
    from sam_fused.kernels import grad_sumsq as tn
    from sam_fused.kernels import perturb as tp

    gen = torch.Generator().manual_seed(4)
    before = (len(_jit_variants(tn._sumsq_partials)), len(_jit_variants(tp._perturb_kernel)))
    times = []
    for length in range(1, 41):
        shapes = [(int(x),) for x in torch.randint(1, 20000, (length,), generator=gen)]
        P = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
        G = [torch.randn_like(x) for x in P]
        Bk = [torch.empty_like(x) for x in P]
        sync()
        t0 = time.perf_counter()
        s = ops.grad_sumsq(G, backend="triton")
        ops.perturb_(P, G, Bk, s, 0.05, backend="triton")
        sync()
        times.append(time.perf_counter() - t0)
    after = (len(_jit_variants(tn._sumsq_partials)), len(_jit_variants(tp._perturb_kernel)))
    slow = [f"len {i + 1}: {t * 1e3:.0f} ms" for i, t in enumerate(times) if i >= 2 and t > 0.25]
    detail = f"variants sumsq {before[0]}->{after[0]}, perturb {before[1]}->{after[1]} over list lengths 1..40"
    if slow:
        detail += "; slow calls (recompiles?): " + ", ".join(slow[:5])
    return ("FAIL" if slow or after[0] - before[0] > 4 else "PASS", detail)


def selfcheck_cost():
    from sam_fused._backends import self_check_backend

    rows, status = [], "INFO"
    for backend in USABLE:
        t0 = time.perf_counter()
        r = self_check_backend(backend, DEV)
        rows.append(f"{backend}: {'ok' if r is None else r} in {time.perf_counter() - t0:.2f}s")
        if r is not None:
            status = "FAIL"
    return (status, "; ".join(rows))


AUTO_FRESH = r"""
import time, warnings, torch, sam_fused
from sam_fused import ops, _backends
dev = torch.device("cuda")
res = {}
for dt in (torch.float32, torch.bfloat16, torch.float16):
    gs = [torch.randn(1000, device=dev).to(dt) for _ in range(3)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ops.grad_sumsq(gs)
        torch.cuda.synchronize()
    res[str(dt)[6:]] = [_backends.choose("auto", dev, dt), round(time.perf_counter() - t0, 2),
                        [str(x.message)[:160] for x in w]]
print("RESULT", res)
"""

AUTO_CAPTURE = r"""
import warnings, torch, sam_fused
from sam_fused import ops, _backends
dev = torch.device("cuda")
gs = [torch.randn(1000, device=dev) for _ in range(4)]
torch.cuda.synchronize()
g, err = torch.cuda.CUDAGraph(), None
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    try:
        with torch.cuda.graph(g):
            s = ops.grad_sumsq(gs)
    except Exception as e:
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
print("RESULT", {"verified": {k[0]: v for k, v in _backends._verified.items()},
                 "chosen": {f"{k[0]}/{str(k[2])[6:]}": v for k, v in _backends._chosen.items()},
                 "error": err, "warnings": [str(x.message)[:160] for x in w]})
"""

MULTI_GPU = r"""
import torch, sam_fused
from sam_fused import ops
torch.cuda.set_device(0)
d1 = torch.device("cuda", 1)
out = {}
for backend in ("cuda", "triton"):
    try:
        p = torch.zeros(100_000, device=d1); b = torch.full_like(p, 2.0)
        ops.restore_([p], [b], backend=backend)
        torch.cuda.synchronize(d1)
        out[backend] = "ok" if bool((p == 2.0).all()) else "WRONG RESULT"
    except Exception as e:
        out[backend] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
print("RESULT", out)
"""


def _subprocess(code: str, timeout: int = 120) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"rc {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return line[7:]


def auto_fresh():
    if not IS_CUDA:
        return ("SKIP", "no CUDA")
    res = _subprocess(AUTO_FRESH)
    ok = res.count("'cuda'") == 3
    return ("PASS" if ok else "FAIL", f"first auto call per dtype -> [backend, seconds, warnings]: {res}")


def auto_in_capture():
    if not IS_CUDA:
        return ("SKIP", "no CUDA")
    res = _subprocess(AUTO_CAPTURE)
    bad = "'cuda': False" in res
    return ("WARN" if bad else "PASS", f"first auto call inside torch.cuda.graph capture: {res}")


def multi_gpu():
    if not IS_CUDA or torch.cuda.device_count() < 2:
        return ("SKIP", f"{torch.cuda.device_count() if IS_CUDA else 0} GPU(s): needs 2")
    res = _subprocess(MULTI_GPU)
    return ("PASS" if res.count("'ok'") == 2 else "FAIL", f"tensors on cuda:1, current device cuda:0: {res}")


# ------------------------------------------------------------------------------------------------- main


def main() -> int:
    info = f"device {DEV}" + (f" ({torch.cuda.get_device_name(DEV)})" if IS_CUDA else "")
    print(f"EDGE group {GROUP}: {info}; backends {USABLE} (wanted {WANTED}); CPU comparison backend {CPU_B}",
          flush=True)
    for b in WANTED:
        if b not in USABLE:
            record(f"backend {b}", "FAIL", f"unavailable: {REPORT[b].detail}")
    if GROUP == "parity":
        for backend in USABLE:
            for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
                run(f"parity {backend} {dname}", lambda b=backend, d=dtype: parity(b, d))
            run(f"many tensors {backend}", lambda b=backend: many_tensors(b))
            run(f"determinism {backend}", lambda b=backend: determinism(b))
    elif GROUP == "large":
        for backend in USABLE:
            run(f"large bf16 2^{LARGE_LOG2}+ {backend}", lambda b=backend: large_bf16(b))
            run(f"large k-slices {backend}", lambda b=backend: large_slices(b))
            run(f"large fp32 restore {backend}", lambda b=backend: large_fp32_restore(b))
    elif GROUP == "perf":
        run(f"bandwidth 2^{BW_LOG2} fp32 / 2^{BW_LOG2 + 1} bf16", bandwidth)
        run("triton vector width (PTX)", triton_vector_width)
        run("host overhead 2000 tensors", host_overhead)
        run("channels_last staging", channels_last)
        run("triton recompiles by list length", triton_recompiles)
        run("self-check cost", selfcheck_cost)
        run("auto first use (fresh process)", auto_fresh)
        run("auto first use inside graph capture", auto_in_capture)
        run("multi-GPU current device", multi_gpu)
    else:
        print(f"unknown group {GROUP}", file=sys.stderr)
        return 2
    with open(os.path.join(OUTDIR, f"checks_{GROUP}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
