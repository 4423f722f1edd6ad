"""Input validation shared by the Python backends (the torch reference, and the Triton ops which dereference raw
addresses and so must never see a mismatched list). The compiled C++ ops make the same checks in C++.

Errors are ValueError / TypeError naming the list and the index (docs/DESIGN.md section 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(t: object, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where} is a {type(t).__name__}, expected a torch.Tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{where} is a sparse/non-strided tensor ({t.layout}); sam_fused needs dense tensors")
    if t.is_complex():
        raise TypeError(f"{where} is complex ({t.dtype}); sam_fused supports real floating-point tensors only")
    if not t.is_floating_point():
        raise TypeError(f"{where} has dtype {t.dtype}; expected a floating-point tensor")
    return t


def check_writable(t: torch.Tensor, where: str) -> None:
    """A tensor an op writes must not be an expanded view (elements sharing memory): the write would be ambiguous,
    and torch raises only once earlier tensors of the list were already written."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):  # plain ints: traceable
        raise ValueError(f"{where} has elements that share memory (an expanded view, stride {t.stride()}); "
                         "sam_fused writes it in place and needs a tensor whose elements are distinct")


def check_lists(
    primary_name: str,
    primary: Sequence[torch.Tensor],
    others: dict[str, Sequence[torch.Tensor] | None],
    lead: dict[str, int] | None = None,
    written: tuple[str, ...] = (),
) -> None:
    """Every list in `others` (None entries skipped) must match `primary` tensor by tensor: length, device, dtype and
    shape, with an extra leading dim lead[name] for the lists named in `lead`. The lists named in `written` are
    written in place: their tensors must not be expanded views. Everything is checked before any op writes."""
    lead = lead or {}
    n = len(primary)
    for name, ts in others.items():
        if ts is not None and len(ts) != n:
            raise ValueError(f"{name} has {len(ts)} tensors but {primary_name} has {n}")
    for i, p in enumerate(primary):
        check_tensor(p, f"{primary_name}[{i}]")
        if primary_name in written:
            check_writable(p, f"{primary_name}[{i}]")
        for name, ts in others.items():
            if ts is None:
                continue
            t = check_tensor(ts[i], f"{name}[{i}]")
            if name in written:
                check_writable(t, f"{name}[{i}]")
            if t.device != p.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {primary_name}[{i}] is on {p.device}")
            if t.dtype != p.dtype:
                raise ValueError(f"{name}[{i}] has dtype {t.dtype} but {primary_name}[{i}] has {p.dtype}")
            shape = (lead[name], *p.shape) if name in lead else tuple(p.shape)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {shape}")


def check_sliced(grads: Sequence[torch.Tensor], k: int) -> None:
    """Without params, grad_sumsq's grads only need the leading micro-batch dim k (when k > 1)."""
    for i, g in enumerate(grads):
        check_tensor(g, f"grads[{i}]")
        if k > 1 and (g.dim() == 0 or g.shape[0] != k):
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}; expected leading dim {k}")


# The lists each mutating op writes in place (the Triton ops pass the same names).
PERTURB_WRITES, RESTORE_WRITES, FSAM_WRITES = ("params", "backups"), ("params",), ("grads", "ema")
RESTORE_SGD_WRITES = ("params", "momentum_buffers")

# The list checks of each op, called by the reference ops and by the fake (meta) impls of sam_fused/_registry.py:
# a call the dispatcher routes to the fakes (a meta tensor in a list) must fail like any other mismatched call.


def check_grad_sumsq(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None, k: int) -> None:
    if params is None:
        check_sliced(grads, k)
    else:
        check_lists("params", params, {"grads": grads}, {"grads": k} if k > 1 else None)


def check_perturb(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  backups: Sequence[torch.Tensor]) -> None:
    check_lists("params", params, {"grads": grads, "backups": backups}, written=PERTURB_WRITES)


def check_perturb_batched(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], k: int) -> None:
    check_lists("params", params, {"grads": grads}, {"grads": k})


def check_restore(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor]) -> None:
    check_lists("params", params, {"backups": backups}, written=RESTORE_WRITES)


def check_fsam(grads: Sequence[torch.Tensor], ema: Sequence[torch.Tensor],
               params: Sequence[torch.Tensor] | None) -> None:
    check_lists("grads", grads, {"ema": ema, "params": params}, written=FSAM_WRITES)


def check_restore_sgd(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      momentum_buffers: Sequence[torch.Tensor], momentum: float) -> None:
    """momentum_buffers: one per param when momentum != 0 (torch.optim.SGD's state), else an empty list."""
    if momentum != 0.0 and len(momentum_buffers) != len(params):
        raise ValueError(f"momentum_buffers has {len(momentum_buffers)} tensors but params has {len(params)} "
                         "(one per param when momentum != 0)")
    check_lists("params", params, {"backups": backups, "grads": grads,
                                   "momentum_buffers": momentum_buffers if momentum != 0.0 else None},
                written=RESTORE_SGD_WRITES)
