"""Every op of sam_fused, defined in one place (docs/DESIGN.md section 3).

Each schema below is defined in two namespaces:
  * ``sam_fused``        the op users and ``torch.compile`` see. The pure-PyTorch reference is registered for
                         ``CompositeExplicitAutograd`` (any device); the compiled C++ backends register their
                         kernels for the ``CPU`` / ``CUDA`` keys from ``csrc/<backend>/`` and take precedence there.
  * ``sam_fused_triton`` the Triton kernels of ``kernels/`` (their own namespace because the CUDA key of
                         ``sam_fused`` belongs to the CUDA C++ kernels).
A fake (meta) implementation per op lets ``torch.compile`` and ``opcheck`` trace them; it validates the lists like
the reference, since a meta tensor in any list routes a call to it.

Shapes: ``p`` any shape; with ``k = micro_batches > 1`` every grad is ``[k, *p.shape]``.
``sumsq`` is fp64 for every input dtype (terms squared in fp64: finite for any finite fp32 gradient): ``[k]`` per
micro-batch (``[1]`` for plain SAM). The perturb ops take it in fp64 and compute the scale from it in fp64.
"""

from __future__ import annotations

import torch

from . import _checks, reference

NAMESPACES = ("sam_fused", "sam_fused_triton")

SCHEMAS = {
    "grad_sumsq": "grad_sumsq(Tensor[] grads, Tensor[]? params=None, float eta=0.0, int micro_batches=1) -> Tensor",
    "perturb_": (
        "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sumsq, float rho, "
        "float eps=1e-12, bool adaptive=False, float eta=0.0, bool normalize=True) -> ()"
    ),
    "perturb_batched": (
        "perturb_batched(Tensor[] params, Tensor[] grads, Tensor sumsq, float rho, float eps=1e-12, "
        "bool adaptive=False, float eta=0.0, bool normalize=True) -> Tensor[]"
    ),
    "restore_": "restore_(Tensor(a!)[] params, Tensor[] backups) -> ()",
    "fsam_direction_": (
        "fsam_direction_(Tensor(a!)[] grads, Tensor(b!)[] ema, float sigma, float lmbda, bool first, "
        "Tensor[]? params=None, float eta=0.0) -> Tensor"
    ),
}

OPS = tuple(SCHEMAS)

# Fused optimizer steps: restore + the base optimizer's update in one pass, bit-for-bit equal to restore_ followed by
# torch's own step. Namespace sam_fused only, fp32 CPU kernel (csrc/cpu/restore_sgd.cpp) and the reference for any
# device; SAM.second_step uses it when it can (see SAM._fused_sgd_plan).
STEP_SCHEMAS = {
    "restore_sgd_": (
        "restore_sgd_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "float lr, float weight_decay=0.0, float momentum=0.0, float dampening=0.0, bool nesterov=False) -> ()"
    ),
}


def _device_of(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _fake_grad_sumsq(grads, params=None, eta=0.0, micro_batches=1):
    _checks.check_grad_sumsq(grads, params, micro_batches)
    return torch.empty(micro_batches, dtype=reference.SUMSQ_DTYPE, device=_device_of(grads))


def _fake_perturb_(params, grads, backups, sumsq, rho, eps=1e-12, adaptive=False, eta=0.0, normalize=True):
    _checks.check_perturb(params, grads, backups)
    return None


def _fake_perturb_batched(params, grads, sumsq, rho, eps=1e-12, adaptive=False, eta=0.0, normalize=True):
    _checks.check_perturb_batched(params, grads, sumsq.numel())
    return [torch.empty_like(g, dtype=p.dtype) for p, g in zip(params, grads)]


def _fake_restore_(params, backups):
    _checks.check_restore(params, backups)
    return None


def _fake_fsam_direction_(grads, ema, sigma, lmbda, first, params=None, eta=0.0):
    _checks.check_fsam(grads, ema, params)
    return torch.empty(1, dtype=reference.SUMSQ_DTYPE, device=_device_of(grads))


def _fake_restore_sgd_(params, backups, grads, momentum_buffers, lr, weight_decay=0.0, momentum=0.0, dampening=0.0,
                       nesterov=False):
    _checks.check_restore_sgd(params, backups, grads, momentum_buffers, momentum)
    return None


_FAKES = {
    "grad_sumsq": _fake_grad_sumsq,
    "perturb_": _fake_perturb_,
    "perturb_batched": _fake_perturb_batched,
    "restore_": _fake_restore_,
    "fsam_direction_": _fake_fsam_direction_,
    "restore_sgd_": _fake_restore_sgd_,
}

_libraries = []  # keep the Library objects alive: dropping one unregisters its ops


def define_ops(namespace: str, steps: bool = False) -> torch.library.Library:
    """Defines every op of SCHEMAS (and STEP_SCHEMAS if `steps`) with its fake in `namespace`; keep the returned
    Library alive (dropping it unregisters the ops). Also used by the tests for the kernel emulation's namespace."""
    lib = torch.library.Library(namespace, "DEF")
    for name, schema in (SCHEMAS | (STEP_SCHEMAS if steps else {})).items():
        lib.define(schema)
        torch.library.register_fake(f"{namespace}::{name}", _FAKES[name], lib=lib)
    return lib


def _define_all() -> None:
    for ns in NAMESPACES:
        _libraries.append(define_ops(ns, steps=ns == "sam_fused"))
    reference_impl = torch.library.Library("sam_fused", "IMPL")
    for name in (*OPS, *STEP_SCHEMAS):
        reference_impl.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
    _libraries.append(reference_impl)


_define_all()
