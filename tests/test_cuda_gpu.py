"""GPU tests of the CUDA C++ backend (csrc/cuda), marked `gpu` (docs/DESIGN.md sections 4, 5 and 7).

They need a CUDA device and the compiled sam_fused._C_cuda; anywhere else they are skipped (CI has no GPU: there,
.ci/cuda_check.sh proves the kernels compile, link, load and register, and tests/test_cuda_planner.py checks the
launch planner). On a GPU they check, against the `torch` reference backend run on the same device:
  * every op, fp32/bf16/fp16, k in {1, 2, 5}, adaptive or not, on mixed-shape lists: empty tensors, size 1, odd
    sizes, more than 65,536 elements, misaligned views (scalar path) beside aligned tensors (vector path),
    non-contiguous and channels_last tensors, lists long enough to need several launches;
  * restore_ bit-exact (NaN payloads, -0.0, infinities), perturb_ backups bit-exact, non-finite sumsq leaves w alone;
  * fp64 sums of squares: finite (and a perturbation) for finite gradients whose squares overflow fp32, the scale
    computed in fp64 and rounded once, a real inf/NaN gradient still skipping the step;
  * deterministic reductions, the current stream, input validation errors;
  * torch.library.opcheck on CUDA tensors;
  * a whole SAM step (first_step + second_step) captured in a CUDA graph, replayed, compared with eager execution.
Tolerances: fp32 within 1e-6 relative for elementwise results, bf16/fp16 within one unit of their own rounding; sums of
squares (fp64, their terms formed like the reference's, only the order of the additions differs) within 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import sam_fused
from sam_fused import ops, reference
from sam_fused._registry import OPS


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    status = sam_fused.backends()["cuda"]
    return status.available, f"cuda backend unavailable: {status.detail}"


_READY, _WHY = _cuda_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_WHY)]

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Empty, 0-dim, size 1, odd sizes, a 4-d tensor, tensors above 65,536 elements (several 16K-element chunks).
SHAPES = [(0,), (), (1,), (7,), (33, 5), (3, 4, 5, 6), (2, 0, 3), (70_001,), (257, 259)]
Tensors = list[torch.Tensor]


def _place(x: torch.Tensor, dtype: torch.dtype, misaligned: bool) -> torch.Tensor:
    """x on the GPU as `dtype`; misaligned: a contiguous view starting one element into its buffer, so its address
    is not 16-byte aligned and the kernels take their scalar path."""
    if not misaligned:
        return x.to(DEV, dtype)
    buf = torch.empty(x.numel() + 1, dtype=dtype, device=DEV)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    return view


def _lists(dtype: torch.dtype, k: int = 1, seed: int = 0, shapes: list | None = None) -> tuple[Tensors, Tensors]:
    """(params, grads); grads have a leading dim k when k > 1. Every other tensor is a misaligned view."""
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES if shapes is None else shapes
    params = [_place(torch.randn(s, generator=gen), dtype, i % 2 == 1) for i, s in enumerate(shapes)]
    grads = [_place(torch.randn((k, *s) if k > 1 else s, generator=gen), dtype, i % 3 == 1)
             for i, s in enumerate(shapes)]
    return params, grads


def _assert_elementwise_close(actual: Tensors, expected: Tensors) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"tensor {i}"
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7, msg=lambda m, i=i: f"tensor {i}: {m}")
        else:  # one unit of the storage dtype's own rounding
            torch.testing.assert_close(a.float(), e.float(), rtol=torch.finfo(a.dtype).eps, atol=1e-6,
                                       msg=lambda m, i=i: f"tensor {i}: {m}")


def _assert_sums_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.float64 and actual.device.type == "cuda"
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0.0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


# ---------------------------------------------------------------------------------------------------------------
# Parity with the reference, op by op.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sumsq(dtype: torch.dtype, k: int, adaptive: bool) -> None:
    params, grads = _lists(dtype, k)
    args = (grads, params if adaptive else None, 0.01, k)
    _assert_sums_close(ops.grad_sumsq(*args, backend="cuda"), reference.grad_sumsq(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_perturb(dtype: torch.dtype, adaptive: bool, normalize: bool) -> None:
    params, grads = _lists(dtype)
    sumsq = reference.grad_sumsq(grads, params if adaptive else None, 0.01)
    w_ref, w_new = [p.clone() for p in params], [p.clone() for p in params]
    b_ref, b_new = [torch.empty_like(p) for p in params], [torch.full_like(p, 7.0) for p in params]
    reference.perturb_(w_ref, grads, b_ref, sumsq, 0.05, 1e-12, adaptive, 0.01, normalize)
    ops.perturb_(w_new, grads, b_new, sumsq, 0.05, 1e-12, adaptive, 0.01, normalize, backend="cuda")
    _assert_elementwise_close(w_new, w_ref)
    assert all(_bit_equal(b, p) for b, p in zip(b_new, params)), "backups must be bit-exact copies of w"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_perturb_non_finite_sumsq_leaves_weights(dtype: torch.dtype, bad: float) -> None:
    params, grads = _lists(dtype)
    w = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(w, grads, backups, torch.tensor([bad], device=DEV), 0.05, adaptive=True, backend="cuda")
    assert all(_bit_equal(a, p) for a, p in zip(w, params))
    assert all(_bit_equal(b, p) for b, p in zip(backups, params))


def test_perturb_zero_gradient_is_zero_perturbation() -> None:
    params, _ = _lists(torch.float32)
    grads = [torch.zeros_like(p) for p in params]
    w = [p.clone() for p in params]
    sumsq = ops.grad_sumsq(grads, backend="cuda")
    assert sumsq.item() == 0.0
    ops.perturb_(w, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, backend="cuda")
    assert all(torch.equal(a, p) for a, p in zip(w, params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_batched(dtype: torch.dtype, k: int, adaptive: bool) -> None:
    params, grads = _lists(dtype, k if k > 1 else 2, seed=3)
    if k == 1:  # a [1, *shape] gradient: one micro-batch
        grads = [g[:1].clone() for g in grads]
    norm_grads = grads if k > 1 else [g[0] for g in grads]  # grad_sumsq's k = 1 gradients have no leading dim
    sumsq = reference.grad_sumsq(norm_grads, params if adaptive else None, 0.01, k)
    if k == 5:
        sumsq[2] = float("inf")  # that slice's copy must be the unperturbed weight
    out_ref = reference.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, 0.01)
    out_new = ops.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, 0.01, backend="cuda")
    _assert_elementwise_close(out_new, out_ref)
    assert all(o.is_contiguous() for o in out_new)


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_bit_exact(dtype: torch.dtype) -> None:
    """Arbitrary bit patterns (NaN payloads, -0.0, infinities, subnormals) come back exactly, aligned or not."""
    gen = torch.Generator().manual_seed(5)
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int16
    info = torch.iinfo(int_dtype)
    backups = []
    for i, s in enumerate(SHAPES):
        raw = torch.randint(info.min, info.max, s, generator=gen, dtype=int_dtype)
        backups.append(_place(raw.view(dtype), dtype, i % 2 == 0))
    params = [_place(torch.randn(s, generator=gen), dtype, i % 3 == 0) for i, s in enumerate(SHAPES)]
    ops.restore_(params, backups, backend="cuda")
    assert all(_bit_equal(p, b) for p, b in zip(params, backups))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_fsam_direction(dtype: torch.dtype, first: bool, adaptive: bool) -> None:
    params, grads = _lists(dtype, seed=4)
    gen = torch.Generator().manual_seed(6)
    ema = [_place(torch.randn(g.shape, generator=gen), dtype, i % 4 == 1) for i, g in enumerate(grads)]
    g_ref, g_new = [g.clone() for g in grads], [g.clone() for g in grads]
    m_ref, m_new = [m.clone() for m in ema], [m.clone() for m in ema]
    p = params if adaptive else None
    s_ref = reference.fsam_direction_(g_ref, m_ref, 0.7, 0.6, first, p, 0.01)
    s_new = ops.fsam_direction_(g_new, m_new, 0.7, 0.6, first, p, 0.01, backend="cuda")
    _assert_elementwise_close(g_new, g_ref)
    _assert_elementwise_close(m_new, m_ref)
    if first:
        assert all(_bit_equal(m, g) for m, g in zip(m_new, grads)), "first step: ema is an exact copy of g"
    _assert_sums_close(s_new, s_ref)


# ---------------------------------------------------------------------------------------------------------------
# Sums of squares beyond the fp32 range (the same checks as tests/test_cuda_planner.py's, under emulation there): every
# term is squared in fp64 and the scale computed in fp64, so a finite gradient whose squares overflow fp32
# (|g| > ~1.8e19) still perturbs; a real inf/NaN gradient still skips.

@pytest.mark.parametrize("dtype, value", [(torch.float32, 2e19), (torch.float32, 1e20), (torch.bfloat16, 1e20)])
def test_huge_gradient_is_perturbed(dtype: torch.dtype, value: float) -> None:
    w = torch.tensor([0.5, 1.0, -2.0], dtype=dtype, device=DEV)
    g = torch.tensor([value, 0.0, 0.0], dtype=dtype, device=DEV)
    sumsq = ops.grad_sumsq([g], backend="cuda")
    assert sumsq.dtype == torch.float64 and torch.isfinite(sumsq).all() and sumsq.item() > 3.4e38
    assert torch.equal(sumsq, reference.grad_sumsq([g]))  # one nonzero term: exact
    w_ref, w_new = w.clone(), w.clone()
    reference.perturb_([w_ref], [g], [torch.empty_like(w)], sumsq, 0.05)
    ops.perturb_([w_new], [g], [torch.empty_like(w)], sumsq, 0.05, backend="cuda")
    assert _bit_equal(w_new, w_ref)
    torch.testing.assert_close(w_new, w + torch.tensor([0.05, 0.0, 0.0], dtype=dtype, device=DEV))  # w + rho

    # The same within a list (vector packets, several blocks) and per micro-batch slice.
    params, grads = _lists(dtype, k=2, seed=14)
    grads[7][0, 123] = value  # the 70,001-element tensor, slice 0
    sums = ops.grad_sumsq(grads, micro_batches=2, backend="cuda")
    _assert_sums_close(sums, reference.grad_sumsq(grads, micro_batches=2))
    assert torch.isfinite(sums).all() and sums[0] > 3.4e38
    out = ops.perturb_batched(params, grads, sums, 0.05, backend="cuda")
    assert all(_bit_equal(a, e) for a, e in zip(out, reference.perturb_batched(params, grads, sums, 0.05)))
    _assert_elementwise_close([out[7][0, 123]], [(params[7][123].float() + 0.05).to(dtype)])


@pytest.mark.parametrize("g_value", [1e30, 1e10])
def test_huge_adaptive(g_value: float) -> None:
    """ASAM: t = |w| + eta = 1e10; t * g is 1e40 (beyond the fp32 range itself) or 1e20 (its square is)."""
    w = torch.tensor([1e10, 1e10, 0.5, -3.0], device=DEV)
    g = torch.tensor([g_value, 0.0, 3.0, -1.0], device=DEV)
    sumsq = ops.grad_sumsq([g], [w], 0.01, backend="cuda")
    _assert_sums_close(sumsq, reference.grad_sumsq([g], [w], 0.01))
    assert torch.isfinite(sumsq).all() and sumsq.item() >= (1e10 * g_value) ** 2 * (1 - 1e-6)
    w_ref, w_new = w.clone(), w.clone()
    reference.perturb_([w_ref], [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, True, 0.01)
    ops.perturb_([w_new], [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, True, 0.01, backend="cuda")
    assert _bit_equal(w_new, w_ref)  # fp32 element math: t^2 * g = 1e50 overflows there, as in the reference
    if g_value == 1e10:  # scale = 0.05 / 1e20, t^2 * g = 1e30: w moves by 5e8
        torch.testing.assert_close(w_new[0], torch.tensor(1.05e10, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_fsam_huge_direction(dtype: torch.dtype, first: bool, adaptive: bool) -> None:
    params, grads = _lists(dtype, seed=15)
    gen = torch.Generator().manual_seed(16)
    ema = [_place(torch.randn(g.shape, generator=gen), dtype, i % 4 == 1) for i, g in enumerate(grads)]
    grads[7][5], ema[7][5] = 3e19, 1e19  # d = 3e19 - 1e19 = 2e19 (first step: d = g = 3e19)
    grads[3][0], ema[3][0] = -1e20, 1e20  # d = -2e20
    g_ref, g_new = [g.clone() for g in grads], [g.clone() for g in grads]
    m_ref, m_new = [m.clone() for m in ema], [m.clone() for m in ema]
    p = params if adaptive else None
    s_ref = reference.fsam_direction_(g_ref, m_ref, 1.0, 0.5, first, p, 0.01)
    s_new = ops.fsam_direction_(g_new, m_new, 1.0, 0.5, first, p, 0.01, backend="cuda")
    assert all(_bit_equal(a, e) for a, e in zip(g_new + m_new, g_ref + m_ref))
    _assert_sums_close(s_new, s_ref)
    assert torch.isfinite(s_new).all() and s_new.item() > 3.4e38


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("adaptive", [False, True])
def test_non_finite_gradient_skips(bad: float, adaptive: bool) -> None:
    params, grads = _lists(torch.float32, seed=17)
    grads[7][40_000] = bad
    p = params if adaptive else None
    sumsq = ops.grad_sumsq(grads, p, 0.01, backend="cuda")
    assert sumsq.dtype == torch.float64 and not torch.isfinite(sumsq).any()
    assert torch.isnan(sumsq).item() == torch.isnan(reference.grad_sumsq(grads, p, 0.01)).item()
    w = [x.clone() for x in params]
    backups = [torch.empty_like(x) for x in params]
    ops.perturb_(w, grads, backups, sumsq, 0.05, 1e-12, adaptive, 0.01, backend="cuda")
    assert all(_bit_equal(a, x) for a, x in zip(w, params))
    assert all(_bit_equal(b, x) for b, x in zip(backups, params))
    ema = [torch.zeros_like(x) for x in grads]
    s = ops.fsam_direction_([x.clone() for x in grads], ema, 1.0, 0.5, False, p, 0.01, backend="cuda")
    assert not torch.isfinite(s).any()


@pytest.mark.parametrize("rho", [0.05, 0.3, 2 / 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_scale_from_fp64(rho: float, normalize: bool) -> None:
    """scale = rho / (sqrt(sumsq) + eps) in fp64 from rho and eps as given, rounded once to fp32: with w = 0 and
    g = 1 each slice's output is that fp32 scale (fp32 rho and eps would be off by an ulp for rho = 0.3, 2/3)."""
    sums = torch.tensor([0.0, 3.0, 1e6 + 1, 4e38, 1e80], dtype=torch.float64, device=DEV)
    k = sums.numel()
    params, grads = [torch.zeros(5, device=DEV)], [torch.ones(k, 5, device=DEV)]
    out = ops.perturb_batched(params, grads, sums, rho, 1e-12, False, 0.0, normalize, backend="cuda")
    scales = [rho / (s ** 0.5 + 1e-12) if normalize else rho for s in sums.tolist()]
    assert torch.equal(out[0], torch.tensor(scales, dtype=torch.float32, device=DEV)[:, None].expand(k, 5))
    expected = reference.perturb_batched(params, grads, sums, rho, 1e-12, False, 0.0, normalize)
    assert _bit_equal(out[0], expected[0])


# ---------------------------------------------------------------------------------------------------------------
# Layouts, launch splitting, determinism, streams.

def test_non_contiguous_and_channels_last() -> None:
    """Layouts the kernels cannot index flat (transposed against contiguous, strided, expanded) are staged through
    contiguous copies, and mutated ones are written back into the caller's tensors; channels_last lists, whose
    strides all agree, run as they are. Results match the reference, which handles any layout."""
    gen = torch.Generator().manual_seed(8)

    def transposed(rows: int, cols: int) -> torch.Tensor:  # shape (cols, rows), dense but not contiguous
        return torch.empty(rows, cols, device=DEV).t()

    def strided(n: int) -> torch.Tensor:  # every other element of a buffer: not dense
        return torch.empty(2 * n, device=DEV)[::2]

    def channels_last(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=DEV).to(memory_format=torch.channels_last)

    params = [transposed(7, 9).copy_(torch.randn(9, 7, generator=gen)),
              channels_last(4, 3, 6, 5).copy_(torch.randn(4, 3, 6, 5, generator=gen)),
              strided(20).copy_(torch.randn(20, generator=gen))]
    grads = [torch.randn(9, 7, generator=gen).to(DEV),
             channels_last(4, 3, 6, 5).copy_(torch.randn(4, 3, 6, 5, generator=gen)),
             torch.randn(1, generator=gen).to(DEV).expand(20)]
    sumsq = reference.grad_sumsq(grads, params, 0.01)
    _assert_sums_close(ops.grad_sumsq(grads, params, 0.01, backend="cuda"), sumsq)

    w_ref = [p.clone() for p in params]
    w_new = [transposed(7, 9).copy_(params[0]), channels_last(4, 3, 6, 5).copy_(params[1]),
             strided(20).copy_(params[2])]
    b_new = [transposed(7, 9), channels_last(4, 3, 6, 5), strided(20)]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, True, 0.01)
    ops.perturb_(w_new, grads, b_new, sumsq, 0.05, 1e-12, True, 0.01, backend="cuda")
    _assert_elementwise_close(w_new, w_ref)
    assert all(torch.equal(b, p) for b, p in zip(b_new, params))
    ops.restore_(w_new, b_new, backend="cuda")
    assert all(torch.equal(w, p) for w, p in zip(w_new, params))

    g_new, m_new = [g.clone() for g in w_ref], [transposed(7, 9).zero_(), channels_last(4, 3, 6, 5).zero_(),
                                                strided(20).zero_()]
    g_ref, m_ref = [g.clone() for g in w_ref], [torch.zeros_like(g) for g in w_ref]
    s_ref = reference.fsam_direction_(g_ref, m_ref, 1.0, 0.9, False, params, 0.01)
    s_new = ops.fsam_direction_(g_new, m_new, 1.0, 0.9, False, params, 0.01, backend="cuda")
    _assert_elementwise_close(g_new, g_ref)
    _assert_elementwise_close(m_new, m_ref)
    _assert_sums_close(s_new, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tensors_and_launches(dtype: torch.dtype) -> None:
    """More tensors than one argument struct holds (1,300 > 631..842 slots with CUDA >= 12.1's 32 KB of kernel
    parameters; 60..80 with 4 KB) and one tensor with more chunks than one launch has blocks (2,048 * 16K + 5
    elements; 320 blocks with 4 KB): several launches per op, a tensor continued across launches, partial sums across
    them."""
    shapes = [(i % 17 + 1, 3) for i in range(1300)] + [(2048 * 16384 + 5,)] + [(5, 5)] * 3
    params, grads = _lists(dtype, seed=9, shapes=shapes)
    sumsq = reference.grad_sumsq(grads, params, 0.0)
    _assert_sums_close(ops.grad_sumsq(grads, params, 0.0, backend="cuda"), sumsq)
    w_ref, w_new = [p.clone() for p in params], [p.clone() for p in params]
    b_new = [torch.empty_like(p) for p in params]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, True, 0.0)
    ops.perturb_(w_new, grads, b_new, sumsq, 0.05, 1e-12, True, 0.0, backend="cuda")
    _assert_elementwise_close(w_new, w_ref)
    ops.restore_(w_new, b_new, backend="cuda")
    assert all(_bit_equal(w, p) for w, p in zip(w_new, params))
    _, kgrads = _lists(dtype, k=2, seed=10, shapes=shapes)
    _assert_sums_close(ops.grad_sumsq(kgrads, micro_batches=2, backend="cuda"),
                       reference.grad_sumsq(kgrads, micro_batches=2))


def test_reductions_are_deterministic() -> None:
    params, grads = _lists(torch.float32, k=2, seed=11)
    first = ops.grad_sumsq(grads, params, 0.01, 2, backend="cuda")
    for _ in range(5):
        assert _bit_equal(ops.grad_sumsq(grads, params, 0.01, 2, backend="cuda"), first)
    ema = [torch.ones(g.shape[1:], device=DEV) for g in grads]
    d = [g[0].clone() for g in grads]
    sums = {ops.fsam_direction_([x.clone() for x in d], [m.clone() for m in ema], 1.0, 0.9, False,
                                backend="cuda").item() for _ in range(5)}
    assert len(sums) == 1


def test_runs_on_the_current_stream() -> None:
    params, grads = _lists(torch.float32, seed=12)
    expected = reference.grad_sumsq(grads, params, 0.01)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.grad_sumsq(grads, params, 0.01, backend="cuda")
        w = [p.clone() for p in params]
        b = [torch.empty_like(p) for p in params]
        ops.perturb_(w, grads, b, got, 0.05, backend="cuda")
        ops.restore_(w, b, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    _assert_sums_close(got, expected)
    assert all(torch.equal(a, p) for a, p in zip(w, params))


# ---------------------------------------------------------------------------------------------------------------
# Validation (the kernels are called directly, bypassing the op layer).

def test_validation_errors() -> None:
    cuda_ops = torch.ops.sam_fused
    p = [torch.zeros(3, device=DEV), torch.zeros(2, 2, device=DEV)]
    g = [torch.ones(3, device=DEV), torch.ones(2, 2, device=DEV)]
    b = [torch.empty_like(t) for t in p]
    s = torch.ones(1, device=DEV)
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        cuda_ops.perturb_(p, g[:1], b, s, 0.05)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        cuda_ops.perturb_(p, [g[0], torch.ones(4, device=DEV)], b, s, 0.05)
    with pytest.raises(ValueError, match=r"backups\[1\] has dtype"):
        cuda_ops.perturb_(p, g, [b[0], b[1].half()], s, 0.05)
    with pytest.raises(ValueError, match=r"grads\[1\] is on cpu"):
        cuda_ops.perturb_(p, [g[0], g[1].cpu()], b, s, 0.05)
    with pytest.raises(ValueError, match="sumsq is on cpu"):
        cuda_ops.perturb_(p, g, b, s.cpu(), 0.05)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        cuda_ops.restore_([t.double() for t in p], [t.double() for t in b])
    with pytest.raises(TypeError, match=r"grads\[1\] is a sparse"):
        cuda_ops.grad_sumsq([g[0], g[1].to_sparse()], None, 0.0, 1)
    with pytest.raises(ValueError, match="leading dim 2"):
        cuda_ops.grad_sumsq([torch.ones(3, 4, device=DEV)], None, 0.0, 2)
    with pytest.raises(ValueError, match="micro_batches"):
        cuda_ops.grad_sumsq(g, None, 0.0, 0)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):  # k = 3 sums of squares, k = 2 slices
        cuda_ops.perturb_batched(p, [torch.ones(2, *t.shape, device=DEV) for t in p], torch.ones(3, device=DEV), 0.05)
    with pytest.raises(ValueError, match="overlapping"):
        cuda_ops.restore_([torch.zeros(1, device=DEV).expand(3)], [torch.ones(3, device=DEV)])


# ---------------------------------------------------------------------------------------------------------------
# opcheck, self-check, CUDA graphs.

def _opcheck_args(name: str) -> tuple:
    params, grads = _lists(torch.float32, shapes=[(0,), (1,), (7,), (3, 5), (2, 3, 4, 5)])
    params2, kgrads = _lists(torch.float32, k=2, seed=1, shapes=[(1,), (7,), (3, 5)])
    sumsq = reference.grad_sumsq(grads)
    return {
        "grad_sumsq": (grads, params, 0.01, 1),
        "perturb_": (params, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, True, 0.01, True),
        "perturb_batched": (params2, kgrads, reference.grad_sumsq(kgrads, micro_batches=2), 0.05),
        "restore_": (params, [torch.randn_like(p) for p in params]),
        "fsam_direction_": (grads, [torch.randn_like(g) for g in grads], 1.0, 0.9, False, params, 0.01),
    }[name]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name: str) -> None:
    torch.library.opcheck(getattr(torch.ops.sam_fused, name), _opcheck_args(name))


def test_self_check_passes() -> None:
    from sam_fused._backends import self_check_backend

    assert self_check_backend("cuda", DEV) is None


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 10)).to(DEV)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_in_cuda_graph(adaptive: bool) -> None:
    """A whole SAM step (forward, backward, first_step, forward, backward, second_step with SGD + momentum),
    captured once and replayed, gives the weights that eager execution gives: the CUDA ops never sync with the host
    and run on the capturing stream."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(32, 64, generator=gen).to(DEV)
    y = torch.randn(32, 10, generator=gen).to(DEV)

    def make() -> tuple[torch.nn.Module, sam_fused.SAM]:
        model = _mlp(0)
        return model, sam_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, eta=0.01,
                                    lr=0.05, momentum=0.9, backend="cuda")

    def step(model: torch.nn.Module, opt: sam_fused.SAM) -> torch.Tensor:
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.first_step(zero_grad=True)
        (model(x) - y).pow(2).mean().backward()
        opt.second_step(zero_grad=True)
        return loss.detach()

    warmup, replays = 3, 4
    g_model, g_opt = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream (allocations, optimizer state, backups)
        for _ in range(warmup):
            step(g_model, g_opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(g_model, g_opt)
    losses = []
    for _ in range(replays):
        graph.replay()
        losses.append(static_loss.clone())
    torch.cuda.synchronize()

    e_model, e_opt = make()
    e_losses = [step(e_model, e_opt) for _ in range(warmup + replays)][warmup:]
    assert not g_opt.is_perturbed
    for (name, gp), ep in zip(g_model.named_parameters(), e_model.parameters()):
        torch.testing.assert_close(gp, ep, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(torch.stack(losses), torch.stack(e_losses), rtol=1e-5, atol=1e-6)

    # And the eager cuda step agrees with the torch backend's.
    r_model, _ = make()
    r_opt = sam_fused.SAM(r_model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, eta=0.01, lr=0.05,
                          momentum=0.9, backend="torch")
    for _ in range(warmup + replays):
        step(r_model, r_opt)
    for rp, ep in zip(r_model.parameters(), e_model.parameters()):
        torch.testing.assert_close(ep, rp, rtol=1e-5, atol=1e-6)
