"""First-use self-check of a backend against the torch reference (docs/DESIGN.md section 4).

No GPU is available to this project's CI, so a GPU backend picked by ``auto`` proves itself on each device it meets:
every op runs on a small random tensor list and must match the reference (restore bit-exact). A mismatch names the
op; the dispatcher then warns once and falls back for the rest of the process.
"""

from __future__ import annotations

import torch

from . import ops

SHAPES = [(0,), (1,), (7,), (33, 5), (3, 4, 5, 6), (70_001,)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in (torch.float32, torch.float64):  # fp32 weights, fp64 sums of squares (summed in another order)
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    return torch.allclose(a.float(), b.float(), rtol=2 * torch.finfo(a.dtype).eps, atol=1e-6, equal_nan=True)


def _lists(device: torch.device, dtype: torch.dtype, k: int = 1, seed: int = 0) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in SHAPES]
    grads = [torch.randn((k, *s) if k > 1 else s, generator=gen).to(device, dtype) for s in SHAPES]
    return params, grads


def _check_dtype(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    params, grads = _lists(device, dtype)
    for adaptive in (False, True):
        args = (grads, params if adaptive else None, 0.01)
        s_ref, s_new = ops.grad_sumsq(*args, backend="torch"), ops.grad_sumsq(*args, backend=backend)
        if not _close(s_new, s_ref):
            return f"grad_sumsq(adaptive={adaptive})"
        w_ref, w_new = [p.clone() for p in params], [p.clone() for p in params]
        b_ref, b_new = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
        ops.perturb_(w_ref, grads, b_ref, s_ref, 0.05, adaptive=adaptive, eta=0.01, backend="torch")
        ops.perturb_(w_new, grads, b_new, s_ref, 0.05, adaptive=adaptive, eta=0.01, backend=backend)
        backups_ok = all(torch.equal(a, b) for a, b in zip(b_new, params))
        if not backups_ok or not all(_close(a, b) for a, b in zip(w_new, w_ref)):
            return f"perturb_(adaptive={adaptive})"
        ops.restore_(w_new, b_new, backend=backend)
        if not all(torch.equal(a, b) for a, b in zip(w_new, params)):
            return "restore_ (not bit-exact)"
    k = 2
    _, kgrads = _lists(device, dtype, k, seed=1)
    s_ref = ops.grad_sumsq(kgrads, micro_batches=k, backend="torch")
    if not _close(ops.grad_sumsq(kgrads, micro_batches=k, backend=backend), s_ref):
        return "grad_sumsq(micro_batches=2)"
    out_ref = ops.perturb_batched(params, kgrads, s_ref, 0.05, backend="torch")
    out_new = ops.perturb_batched(params, kgrads, s_ref, 0.05, backend=backend)
    if not all(_close(a, b) for a, b in zip(out_new, out_ref)):
        return "perturb_batched"
    for first in (True, False):
        g_ref, g_new = [g.clone() for g in grads], [g.clone() for g in grads]
        m_ref, m_new = [p.clone() for p in params], [p.clone() for p in params]
        s_ref = ops.fsam_direction_(g_ref, m_ref, 1.0, 0.9, first, backend="torch")
        s_new = ops.fsam_direction_(g_new, m_new, 1.0, 0.9, first, backend=backend)
        if not (_close(s_new, s_ref) and all(_close(a, b) for a, b in zip(g_new + m_new, g_ref + m_ref))):
            return f"fsam_direction_(first={first})"
    return None


def self_check(backend: str, device: torch.device) -> str | None:
    """None if `backend` matches the reference on `device`, else a short description of the first mismatch."""
    try:
        for dtype in (torch.float32, torch.bfloat16):
            failure = _check_dtype(backend, device, dtype)
            if failure:
                return f"{failure}, {dtype}"
    except Exception as e:  # a kernel that cannot even run here is a failed check, not a crash of the user's step
        return f"raised {type(e).__name__}: {e}"
    return None
