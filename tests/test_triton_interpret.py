"""What only the Triton kernels (kernels/, torch.ops.sam_fused_triton) have, run by the Triton interpreter on CPU
tensors (docs/DESIGN.md section 7.2); their parity with the torch reference, op by op, is tests/test_parity.py's
(runner `triton_interp`).

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device. Here: the address-table cache, the Triton
ops' own input errors, mixed dtypes in one call, the op layer with backend="triton", and compilation for a GPU without
a GPU (every kernel specialization to a cubin for sm_80/sm_90 in a subprocess, kernels/aot.py); running the compiled
kernels, and their speed, are left to tests/test_triton_gpu.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_matches, assert_sumsq
from parity import Spec, Tensors, clone, random_list

from sam_fused import ops, reference

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it when CUDA is unavailable); "
                "on a GPU the compiled kernels are tested by test_triton_gpu.py", allow_module_level=True)
kernels = pytest.importorskip("sam_fused.kernels", reason="triton is not installed (pip install triton)")

T = torch.ops.sam_fused_triton


def _lists(dtype: torch.dtype, shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[Tensors, Tensors]:
    """Contiguous (params, grads) of the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    specs = [Spec(s) for s in shapes]
    return random_list(specs, "param", dtype, "cpu", gen), random_list(specs, "grad", dtype, "cpu", gen)


# ------------------------------------------------------------------------------------------ address-table cache


def test_table_cache_hit_and_rebuild_after_grads_reallocated() -> None:
    tables = kernels.tables
    tables.clear_cache()  # no entry of an earlier test can match the new tensors' addresses
    params, grads = _lists(torch.float32, [(0,), (1,), (7,), (4097,), (3, 5, 7, 2)])
    T.grad_sumsq(grads, params, 0.0, 1)
    builds = tables.stats["builds"]
    got = T.grad_sumsq(grads, params, 0.0, 1)  # same tensors: the cached tables are reused
    assert tables.stats["builds"] == builds
    assert_sumsq(got, reference.grad_sumsq(grads, params, 0.0, 1))
    old = list(grads)  # keep the old gradients alive so that the new ones get new addresses
    grads[:] = [torch.randn_like(g) for g in grads]  # same list object, new tensors (zero_grad(set_to_none=True))
    got = T.grad_sumsq(grads, params, 0.0, 1)
    assert tables.stats["builds"] == builds + 1
    assert_sumsq(got, reference.grad_sumsq(grads, params, 0.0, 1))
    assert not torch.equal(got, reference.grad_sumsq(old, params, 0.0, 1))


def test_set_to_none_between_steps() -> None:
    """A model's grads freed and reallocated by zero_grad(set_to_none=True), several times: always the new values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    params = list(model.parameters())
    for step in range(3):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 5) * (step + 1)).pow(2).sum().backward()
        grads = [p.grad for p in params]
        assert_sumsq(T.grad_sumsq(grads, None, 0.0, 1), reference.grad_sumsq(grads))


# ----------------------------------------------------------------------------------- validation and integration


def test_invalid_inputs_raise_clear_errors() -> None:
    params, grads = _lists(torch.float32, [(3,), (4, 2)])
    backups = [torch.empty_like(p) for p in params]
    s = torch.ones(1)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(8,\), expected \(4, 2\)"):
        T.perturb_(params, [grads[0], grads[1].reshape(8)], backups, s, 0.05)
    with pytest.raises(ValueError, match=r"backups\[0\] has dtype"):
        T.perturb_(params, grads, [backups[0].half(), backups[1]], s, 0.05)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.float64; the Triton kernels support"):
        T.restore_([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.int32"):
        T.grad_sumsq([torch.zeros(3, dtype=torch.int32)], None, 0.0, 1)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3,\); expected leading dim 2"):
        T.grad_sumsq(grads, None, 0.0, 2)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3,\), expected \(3, 3\)"):
        T.perturb_batched(params, grads, torch.ones(3), 0.05)  # k = sumsq.numel() = 3
    with pytest.raises(ValueError, match="sumsq has 0 elements"):
        T.perturb_(params, grads, backups, torch.ones(0), 0.05)
    # lists the dispatcher would route elsewhere (sparse, meta) reach the Python implementations only when called
    # directly; they must still be refused with a clear error
    impl = kernels.IMPLS
    with pytest.raises(TypeError, match=r"grads\[1\] is a sparse"):
        impl["grad_sumsq"]([grads[0], grads[1].to_sparse()], None, 0.0, 1)
    with pytest.raises(ValueError, match=r"ema\[1\] is on meta"):
        impl["fsam_direction_"](grads, [grads[0].clone(), grads[1].to("meta")], 1.0, 0.9, True)
    with pytest.raises(ValueError, match=r"params\[0\] is on meta; the Triton kernels run CUDA tensors"):
        impl["restore_"]([params[0].to("meta")], [params[0].to("meta")])


def test_mixed_dtypes_in_one_call() -> None:
    """A direct call with fp32 and bf16 tensors: one launch per dtype bucket, sums added."""
    p32, g32 = _lists(torch.float32, [(5,), (3, 3)])
    p16, g16 = _lists(torch.bfloat16, [(4,)], seed=1)
    params, grads = [p32[0], p16[0], p32[1]], [g32[0], g16[0], g32[1]]
    assert_sumsq(T.grad_sumsq(grads, params, 0.01, 1), reference.grad_sumsq(grads, params, 0.01, 1))
    sumsq = reference.grad_sumsq(grads)
    w_ref = clone(params)
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], sumsq, 0.05)
    T.perturb_(params, grads, [torch.empty_like(p) for p in params], sumsq, 0.05)
    for a, e in zip(params, w_ref):
        assert_matches(a, e)


def test_ops_layer_with_backend_triton() -> None:
    """sam_fused.ops routes CPU tensors to the Triton kernels when backend='triton' under the interpreter."""
    params, grads = _lists(torch.float32, [(7,), (2, 3)])
    s = ops.grad_sumsq(grads, backend="triton")
    assert_sumsq(s, reference.grad_sumsq(grads))
    original, backups = clone(params), [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, s, 0.05, backend="triton")
    ops.restore_(params, backups, backend="triton")
    assert all(torch.equal(p, o) for p, o in zip(params, original))


def test_expanded_weight_is_refused_before_anything_is_written() -> None:
    """A good tensor followed by an expanded one: the Triton ops used to write the first, then fail on the second."""
    params = [torch.randn(5), torch.randn(1).expand(4)]
    grads = [torch.randn(5), torch.randn(4)]
    before = [p.clone() for p in params]  # the expanded one as a plain copy
    backups = [torch.empty_like(p) for p in params]
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory"):
        T.perturb_(params, grads, backups, reference.grad_sumsq(grads), 0.05)
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory"):
        T.restore_(params, [torch.randn(5), torch.randn(4)])
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_without_a_gpu() -> None:
    """Every kernel specialization through the whole Triton compiler (TTIR .. PTX .. cubin via the bundled ptxas) for
    sm_80 and sm_90, in a subprocess without TRITON_INTERPRET; the PTX must compute the scale with
    sqrt.rn.f64/div.rn.f64 and have no approximate sqrt/division, no fma, no atomics, and the aligned (VEC > 1)
    specializations must use 16-byte vector loads/stores (~35 s per arch on a cold Triton cache)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "sam_fused.kernels.aot", "--arch", "80", "90"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    for arch in (80, 90):
        assert f"ok: every Triton kernel specialization compiled for sm_{arch}" in run.stdout


def test_aot_flags_scalar_accesses_in_an_aligned_specialization() -> None:
    """kernels/aot.py's PTX check itself: an aligned specialization without vector accesses is a problem."""
    from sam_fused.kernels import aot

    scalar = "ld.global.b32 %r1, [%rd1];\nst.global.b32 [%rd2], %r1;"
    assert aot.check_ptx("copy VEC=1", {"VEC": 1}, scalar) == []
    assert len(aot.check_ptx("copy VEC=4", {"VEC": 4}, scalar)) == 2
    assert len(aot.check_ptx("sumsq VEC=4", {"VEC": 4}, scalar)) == 1  # reads only: no store expected
    vector = "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\nst.global.v4.b32 [%rd2], {%r1, %r2, %r3, %r4};"
    assert aot.check_ptx("copy VEC=4", {"VEC": 4}, vector) == []
