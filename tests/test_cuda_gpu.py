"""What only the CUDA C++ backend (csrc/cuda) shows on a GPU, marked `gpu` (docs/DESIGN.md sections 4, 5 and 7); its
parity with the torch reference, op by op, is tests/test_parity.py's (runner `cuda_gpu`, also marked `gpu`).

They need a CUDA device and the compiled sam_fused._C_cuda; anywhere else they are skipped (CI has no GPU: there,
.ci/cuda_check.sh proves the kernels compile, link, load and register, and tests/test_cuda_planner.py checks the
launch planner and the kernels' source under emulation). On a GPU, against the `torch` reference on the same device:
  * non-contiguous (staged) and channels_last (in place) tensors, lists long enough to need several launches;
  * the current stream, the kernels' own input errors (device mismatches, dtypes, sparse, overlapping outputs);
  * the first-use self-check, and a whole SAM step captured in a CUDA graph, replayed, compared with eager execution.
Tolerances: fp32 within 1e-6 relative for elementwise results, bf16/fp16 within one unit of their own rounding; sums of
squares (fp64, their terms formed like the reference's, only the order of the additions differs) within 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bits_equal, assert_sumsq
from parity import RUNNERS, Tensors, assert_close_eps, misaligned_specs

import sam_fused
from sam_fused import ops, reference


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    status = sam_fused.backends()["cuda"]
    return status.available, f"cuda backend unavailable: {status.detail}"


_READY, _WHY = _cuda_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_WHY)]

DEV = torch.device("cuda")
CUDA = next(r for r in RUNNERS if r.name == "cuda_gpu")


def _lists(dtype: torch.dtype, k: int = 1, seed: int = 0, shapes: list | None = None) -> tuple[Tensors, Tensors]:
    """(params, grads) on the GPU; grads have a leading dim k when k > 1. Misaligned views (the kernels' scalar path)
    beside aligned tensors (parity.misaligned_specs)."""
    return CUDA.lists(dtype, k, seed, specs=None if shapes is None else misaligned_specs(shapes))


def _assert_elementwise_close(actual: Tensors, expected: Tensors) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close_eps(a, e, f"tensor {i}")


def _assert_sums_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.device.type == "cuda"
    assert_sumsq(actual, expected, CUDA.sums_rtol)


# ---------------------------------------------------------------------------------------------------------------
# Layouts, launch splitting, streams.

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
    for w, p in zip(w_new, params):
        assert_bits_equal(w, p)
    _, kgrads = _lists(dtype, k=2, seed=10, shapes=shapes)
    _assert_sums_close(ops.grad_sumsq(kgrads, micro_batches=2, backend="cuda"),
                       reference.grad_sumsq(kgrads, micro_batches=2))


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
    with pytest.raises(ValueError, match=r"grads\[1\] is on cpu"):
        cuda_ops.perturb_(p, [g[0], g[1].cpu()], b, s, 0.05)
    with pytest.raises(ValueError, match="sumsq is on cpu"):
        cuda_ops.perturb_(p, g, b, s.cpu(), 0.05)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        cuda_ops.restore_([t.double() for t in p], [t.double() for t in b])
    with pytest.raises(TypeError, match=r"grads\[1\] is a sparse"):
        cuda_ops.grad_sumsq([g[0], g[1].to_sparse()], None, 0.0, 1)
    with pytest.raises(ValueError, match="overlapping"):
        cuda_ops.restore_([torch.zeros(1, device=DEV).expand(3)], [torch.ones(3, device=DEV)])


# ---------------------------------------------------------------------------------------------------------------
# Self-check, CUDA graphs.

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
