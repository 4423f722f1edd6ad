"""The host side of the CUDA backend, tested on the CPU (docs/DESIGN.md section 7): the launch planner, and the kernels'
own source run under a CPU emulation of the few CUDA features they use.

1. The planner (csrc/cuda/mta_planner.h) is plain host C++ shared by the CUDA extension and, for these tests, by the
   CPU extension, which exposes it as torch.ops.sam_fused_testing.plan_chunks (csrc/testing/planner_ops.cpp). A plan
   is a list of launches; each launch has at most max_tensors tensors and max_blocks blocks, and each block covers
   one chunk of one tensor. The kernels trust it blindly, so these tests check what they rely on: every element of
   every tensor in exactly one block, empty tensors skipped, the limits respected, tensors continued across
   launches, blocks in list order.
2. Kernel emulation (csrc/testing/emu): csrc/cuda/*.cu compiled by the host compiler, each CUDA thread a std::thread,
   on CPU tensors, compared with the torch reference. It checks the kernels' indexing (chunks, micro-batch slices,
   16-byte vector packets and scalar tails, misaligned views), the multi-launch loop, the math and the two-stage
   reductions (fp64 sums of squares: finite for gradients whose squares overflow fp32). It says nothing about real GPU
   execution: that is tests/test_cuda_gpu.py, on a GPU. It needs the CUDA headers (the toolkit nvcc belongs to) and a
   C++ compiler; the first run compiles for ~40 s, later runs reuse it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import sam_fused  # noqa: F401  (loads the package; the planner op comes with its CPU extension)
from sam_fused import reference


def _planner_available() -> bool:
    try:
        importlib.import_module("sam_fused._C_cpu")
    except ImportError:
        return False
    try:
        torch.ops.sam_fused_testing.plan_chunks  # noqa: B018  (raises AttributeError when not registered)
    except (AttributeError, RuntimeError):
        return False
    return True


needs_planner = pytest.mark.skipif(
    not _planner_available(), reason="sam_fused._C_cpu (with torch.ops.sam_fused_testing.plan_chunks) is not built")

Row = tuple[int, int, int, int, int]  # (launch, block, tensor, chunk_start, chunk_len)


def plan(numels: list[int], chunk: int, max_tensors: int, max_blocks: int) -> list[Row]:
    flat = torch.ops.sam_fused_testing.plan_chunks(numels, chunk, max_tensors, max_blocks)
    assert len(flat) % 5 == 0
    return [tuple(flat[i:i + 5]) for i in range(0, len(flat), 5)]


def check_plan(numels: list[int], chunk: int, max_tensors: int, max_blocks: int) -> list[Row]:
    """Plans and asserts every guarantee the kernels rely on; returns the rows for further checks."""
    rows = plan(numels, chunk, max_tensors, max_blocks)
    # Rows come launch by launch, blocks numbered 0.. within each launch (the grid's blockIdx.x).
    by_launch: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        by_launch[r[0]].append(r)
    assert sorted(by_launch) == list(range(len(by_launch)))
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    for launch, lrows in by_launch.items():
        assert [r[1] for r in lrows] == list(range(len(lrows))), f"launch {launch}: block numbering"
        assert len(lrows) <= max_blocks, f"launch {launch} has {len(lrows)} blocks > {max_blocks}"
        tensors = {r[2] for r in lrows}
        assert len(tensors) <= max_tensors, f"launch {launch} has {len(tensors)} tensors > {max_tensors}"
    # Every element of every tensor exactly once: per tensor, the chunks tile [0, numel) in order.
    by_tensor: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        by_tensor[r[2]].append(r)
    for i, n in enumerate(numels):
        trows = by_tensor.get(i, [])
        if n == 0:
            assert not trows, f"empty tensor {i} got blocks"
            continue
        pos = 0
        for r in trows:  # global (launch, block) order is the tensor's chunk order
            assert r[3] == pos, f"tensor {i}: chunk starts at {r[3]}, expected {pos}"
            assert r[4] == min(chunk, n - pos), f"tensor {i}: chunk at {pos} has length {r[4]}"
            assert r[3] % chunk == 0
            pos += r[4]
        assert pos == n, f"tensor {i}: {pos} of {n} elements covered"
    assert set(by_tensor) <= set(range(len(numels)))
    # Global block order is list order: tensor by tensor, chunk by chunk (the reductions' partial-sum order).
    assert [(r[2], r[3]) for r in rows] == sorted((r[2], r[3]) for r in rows)
    return rows


@needs_planner
def test_small_hand_checked() -> None:
    rows = plan([0, 5, 40000, 3], 16384, 2, 2)
    assert rows == [
        (0, 0, 1, 0, 5), (0, 1, 2, 0, 16384),  # launch 0: 2 blocks (its limit), tensors 1 and 2
        (1, 0, 2, 16384, 16384), (1, 1, 2, 32768, 7232),  # tensor 2 continues in launch 1
        (2, 0, 3, 0, 3),
    ]


@needs_planner
def test_empty_lists_and_empty_tensors() -> None:
    assert plan([], 16, 4, 4) == []
    assert plan([0, 0, 0], 16, 4, 4) == []
    rows = check_plan([0, 1, 0, 17, 0], 16, 4, 4)
    assert {r[2] for r in rows} == {1, 3}


@needs_planner
def test_tensor_limit_starts_new_launch() -> None:
    rows = check_plan([3] * 10, 16, 4, 100)
    launches = defaultdict(set)
    for r in rows:
        launches[r[0]].add(r[2])
    assert [sorted(t) for _, t in sorted(launches.items())] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@needs_planner
def test_block_limit_splits_a_tensor() -> None:
    rows = check_plan([10 * 16 + 1], 16, 4, 3)
    assert len(rows) == 11
    assert max(r[0] for r in rows) == 3  # 3 + 3 + 3 + 2 blocks
    assert rows[-1][3:] == (160, 1)


@needs_planner
def test_launches_are_full_before_a_new_one() -> None:
    """A new launch starts only when the previous one is out of blocks, or out of tensor slots for a new tensor."""
    rng = random.Random(7)
    numels = [rng.choice([0, 1, 5, 16, 33, 200]) for _ in range(300)]
    max_tensors, max_blocks = 5, 7
    rows = check_plan(numels, 16, max_tensors, max_blocks)
    launches = sorted({r[0] for r in rows})
    for launch in launches[:-1]:
        lrows = [r for r in rows if r[0] == launch]
        nxt = next(r for r in rows if r[0] == launch + 1)
        full_blocks = len(lrows) == max_blocks
        full_tensors = len({r[2] for r in lrows}) == max_tensors and nxt[3] == 0  # next one starts a new tensor
        assert full_blocks or full_tensors, f"launch {launch} was closed early"


@needs_planner
@pytest.mark.parametrize("seed", range(20))
def test_random_sizes(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.randint(0, 400)
    big = 300_000 if seed % 2 else 50  # odd seeds: large tensors; even seeds: tiny ones, where chunk 1 is cheap
    numels = [rng.choice([0, 1, 2, 7, 64, 1000, 4096]) if rng.random() < 0.5 else rng.randint(0, big)
              for _ in range(count)]
    chunk = rng.choice([1, 3, 8, 64, 1024, 16384])
    chunk = max(chunk, -(-sum(numels) // 20_000))  # at most ~20k blocks, so the Python checks stay fast
    max_tensors = rng.randint(1, 120)
    max_blocks = rng.randint(1, 400)
    check_plan(numels, chunk, max_tensors, max_blocks)


PARAM_BUDGETS = [32764, 4096]  # kernel parameter bytes: CUDA >= 12.1 on sm_70+ / older toolkits (mta_planner.h)
SCALAR_BYTES = 256  # what the argument struct leaves of the budget for the kernels' other parameters


@needs_planner
@pytest.mark.parametrize("budget", PARAM_BUDGETS)
def test_kernel_limits_fit_the_argument_struct(budget: int) -> None:
    """The limits the kernels are compiled with: chunks keep 16-byte vectors aligned, and the by-value argument
    struct of MtaArgs<D> (D addresses + an element count per tensor, a 4-byte chunk index + 2-byte slot per block)
    plus the other parameters stays within the kernel parameter budget for every depth the kernels use."""
    chunk, max_blocks, *max_tensors = torch.ops.sam_fused_testing.kernel_limits(budget)
    assert chunk % 8 == 0  # the widest packet is 8 elements (bf16/fp16)
    assert max_blocks < 2**16 and max(max_tensors) < 2**16  # slots are uint16
    for depth, tensors in enumerate(max_tensors, start=1):
        struct = 8 * (depth + 1) * tensors + 6 * max_blocks
        assert struct + SCALAR_BYTES <= budget, f"depth {depth}"
        assert struct + SCALAR_BYTES + 8 * (depth + 1) > budget, f"depth {depth}: a tensor slot left unused"


@needs_planner
def test_large_budget_limits() -> None:
    """With CUDA >= 12.1's 32 KB of parameters one launch covers several hundred tensors and ~2 waves of blocks on an
    H200 (132 SMs x 8 resident blocks): a 2,000-tensor list is 3-4 launches per op, not 36."""
    _, max_blocks, *max_tensors = torch.ops.sam_fused_testing.kernel_limits(32764)
    assert max_blocks == 2048 and max_tensors == [1263, 842, 631, 505]
    _, classic_blocks, *classic_tensors = torch.ops.sam_fused_testing.kernel_limits(4096)
    assert classic_blocks == 320 and classic_tensors == [120, 80, 60, 48]
    for depth in (2, 3):
        rows = check_plan([2048] * 2000, 16384, max_tensors[depth - 1], max_blocks)
        assert len({r[0] for r in rows}) == -(-2000 // max_tensors[depth - 1])
    with pytest.raises(ValueError):
        torch.ops.sam_fused_testing.kernel_limits(8192)


@needs_planner
@pytest.mark.parametrize("budget", PARAM_BUDGETS)
def test_model_profiles_with_kernel_limits(budget: int) -> None:
    """Parameter lists like the benchmark profiles (a ResNet-like mix, many small tensors) with the real limits."""
    chunk, max_blocks, *max_tensors = torch.ops.sam_fused_testing.kernel_limits(budget)
    rng = random.Random(0)
    resnet_like = [rng.choice([64, 128, 256, 512]) * rng.choice([64, 128, 256, 512]) * rng.choice([1, 9])
                   for _ in range(161)]
    many_small = [2048] * 2000
    for numels in (resnet_like, many_small, [70_001, 0, 1, 3 * chunk + 5, max_blocks * chunk + 1]):
        for depth_limit in max_tensors:
            check_plan(numels, chunk, depth_limit, max_blocks)


@needs_planner
def test_huge_tensor() -> None:
    """Element offsets are 64-bit: a tensor of more than 2**31 elements is planned without overflow."""
    chunk = 16384
    n = 2**31 + 12345
    rows = plan([n], chunk, 8, 320)
    assert len(rows) == -(-n // chunk)
    assert sum(r[4] for r in rows) == n
    assert rows[-1][3] == (len(rows) - 1) * chunk


@needs_planner
@pytest.mark.parametrize("args", [([4], 0, 1, 1), ([4], 16, 0, 1), ([4], 16, 1, 0), ([4, -1], 16, 1, 1)])
def test_invalid_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        torch.ops.sam_fused_testing.plan_chunks(*args)


# ---------------------------------------------------------------------------------------------------------------
# 2. The CUDA kernels' source under CPU emulation, against the torch reference.

REPO = Path(__file__).resolve().parent.parent
LAUNCH = re.compile(r"(\w+(?:<\w+>)?)<<<(.*?)>>>\(")  # kernel<T><<<grid, block, smem, stream>>>(


def _cuda_include() -> str | None:
    """The include folder of a CUDA toolkit (CUDA_HOME / CUDA_PATH, nvcc's own, the usual places), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a wrapper outside its toolkit: its dry run names the toolkit ("#$ TOP=...")
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp, "probe.cu")
            probe.write_text("")
            run = subprocess.run([nvcc, "-dryrun", "-c", str(probe), "-o", str(probe.with_suffix(".o"))],
                                 capture_output=True, text=True)
            roots += [line.split("=", 1)[1].strip() for line in (run.stdout + run.stderr).splitlines()
                      if line.startswith("#$ TOP=")]
    roots += ["/usr/local/cuda", "/opt/cuda"]
    for root in roots:
        if root and Path(root, "include", "cuda_bf16.h").is_file():
            return str(Path(root, "include").resolve())
    return None


@pytest.fixture(scope="module")
def emu() -> object:
    """torch.ops.sam_fused_emu: the kernels of csrc/cuda run by csrc/testing/emu/cuda_emu.h (built once per source
    version, cached under ~/.cache/sam_fused/cuda_emu)."""
    include = _cuda_include()
    if include is None:
        pytest.skip("no CUDA toolkit headers (cuda_bf16.h) found: the kernel emulation needs them")
    from torch.utils.cpp_extension import load

    kernel_files = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    inputs = kernel_files + sorted((REPO / "csrc" / "cuda").glob("*.h")) + sorted((REPO / "csrc" / "cuda").glob(
        "*.cuh")) + [REPO / "csrc" / "shared" / "sam_math.h"] + sorted((REPO / "csrc" / "testing" / "emu").iterdir())
    digest = hashlib.sha256(torch.__version__.encode())
    for path in inputs:
        digest.update(path.read_bytes())
    tag = digest.hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sam_fused", "cuda_emu", tag)
    cache.mkdir(parents=True, exist_ok=True)
    for cu in kernel_files:  # the launches become emu::launch(kernel, emu::Grid{...}, args)
        text, count = LAUNCH.subn(r"emu::launch(\1, emu::Grid{\2}, ", cu.read_text())
        assert count > 0 and "<<<" not in text, f"{cu.name}: unexpected launch syntax"
        (cache / f"{cu.stem}.inc").write_text(text)
    load(f"sam_fused_cuda_emu_{tag}", [str(REPO / "csrc" / "testing" / "emu" / "emu_ops.cpp")],
         extra_include_paths=[str(REPO / "csrc"), str(REPO / "csrc" / "testing" / "emu"), str(cache), include],
         extra_cflags=["-O1", "-ffp-contract=off", "-Wno-attributes"], build_directory=str(cache),
         is_python_module=False)
    return torch.ops.sam_fused_emu


EMU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Empty, 0-dim, size 1, odd sizes, > 65,536 elements, one element past a 16K chunk.
EMU_SHAPES = [(0,), (), (1,), (7,), (33, 5), (3, 4, 5, 6), (2, 0, 3), (70_001,), (16_385,)]


def _place(x: torch.Tensor, dtype: torch.dtype, misaligned: bool) -> torch.Tensor:
    """A contiguous copy of x; misaligned: starting one element into its buffer (not 16-byte aligned: scalar path)."""
    if not misaligned:
        return x.to(dtype).clone()
    view = torch.empty(x.numel() + 1, dtype=dtype)[1:].view(x.shape)
    return view.copy_(x)


def _emu_lists(dtype: torch.dtype, k: int = 1, seed: int = 0, shapes: list | None = None) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    shapes = EMU_SHAPES if shapes is None else shapes
    params = [_place(torch.randn(s, generator=gen), dtype, i % 2 == 1) for i, s in enumerate(shapes)]
    grads = [_place(torch.randn((k, *s) if k > 1 else s, generator=gen), dtype, i % 3 == 1)
             for i, s in enumerate(shapes)]
    return params, grads


def _close(actual: list, expected: list) -> None:
    """fp32 within 1e-6 relative, bf16/fp16 within one unit of their rounding (docs/DESIGN.md section 4)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"tensor {i}"
        rtol = 1e-6 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=1e-7, msg=lambda m, i=i: f"tensor {i}: {m}")


def _sums_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Sums of squares are fp64 for every input dtype, their terms formed exactly like the reference's: only the
    order of the fp64 additions differs."""
    assert actual.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0.0)


def _bit_equal(a: list, b: list) -> bool:
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])

    return all(x.shape == y.shape and torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("adaptive", [False, True])
def test_emulated_grad_sumsq(emu: object, dtype: torch.dtype, k: int, adaptive: bool) -> None:
    params, grads = _emu_lists(dtype, k)
    args = (grads, params if adaptive else None, 0.01, k)
    _sums_close(emu.grad_sumsq(*args), reference.grad_sumsq(*args))


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_emulated_perturb(emu: object, dtype: torch.dtype, adaptive: bool) -> None:
    params, grads = _emu_lists(dtype)
    sumsq = reference.grad_sumsq(grads, params if adaptive else None, 0.01)
    for normalize in (True, False):
        w_ref, w_new = [p.clone() for p in params], [_place(p, dtype, i % 2 == 0) for i, p in enumerate(params)]
        b_new = [torch.full_like(p, 7.0) for p in params]
        reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, adaptive, 0.01,
                           normalize)
        emu.perturb_(w_new, grads, b_new, sumsq, 0.05, 1e-12, adaptive, 0.01, normalize)
        _close(w_new, w_ref)
        assert _bit_equal(b_new, params), "backups must be bit-exact copies of w"


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_emulated_perturb_non_finite(emu: object, bad: float) -> None:
    params, grads = _emu_lists(torch.bfloat16)
    w = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    emu.perturb_(w, grads, backups, torch.tensor([bad]), 0.05, 1e-12, True, 0.01, True)
    assert _bit_equal(w, params) and _bit_equal(backups, params)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("k", [1, 5])
def test_emulated_perturb_batched(emu: object, dtype: torch.dtype, k: int) -> None:
    params, grads = _emu_lists(dtype, max(k, 2), seed=3)
    if k == 1:
        grads = [g[:1].clone() for g in grads]
    sumsq = reference.grad_sumsq(grads if k > 1 else [g[0] for g in grads], params, 0.01, k)
    if k == 5:
        sumsq[2] = float("inf")  # that slice's copy is the unperturbed weight
    expected = reference.perturb_batched(params, grads, sumsq, 0.05, 1e-12, True, 0.01)
    _close(emu.perturb_batched(params, grads, sumsq, 0.05, 1e-12, True, 0.01, True), expected)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_restore_bit_exact(emu: object, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int16
    info = torch.iinfo(int_dtype)
    backups = [_place(torch.randint(info.min, info.max, s, generator=gen, dtype=int_dtype).view(dtype), dtype,
                      i % 2 == 0) for i, s in enumerate(EMU_SHAPES)]  # any bits: NaN payloads, -0.0, infinities
    params = [_place(torch.randn(s, generator=gen), dtype, i % 3 == 0) for i, s in enumerate(EMU_SHAPES)]
    emu.restore_(params, backups)
    assert _bit_equal(params, backups)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_emulated_fsam_direction(emu: object, dtype: torch.dtype, first: bool, adaptive: bool) -> None:
    params, grads = _emu_lists(dtype, seed=4)
    gen = torch.Generator().manual_seed(6)
    ema = [_place(torch.randn(g.shape, generator=gen), dtype, i % 4 == 1) for i, g in enumerate(grads)]
    g_ref, g_new = [g.clone() for g in grads], [g.clone() for g in grads]
    m_ref, m_new = [m.clone() for m in ema], [m.clone() for m in ema]
    p = params if adaptive else None
    s_ref = reference.fsam_direction_(g_ref, m_ref, 0.7, 0.6, first, p, 0.01)
    s_new = emu.fsam_direction_(g_new, m_new, 0.7, 0.6, first, p, 0.01)
    _close(g_new, g_ref)
    _close(m_new, m_ref)
    if first:
        assert _bit_equal(m_new, grads), "first step: ema is an exact copy of g"
    _sums_close(s_new, s_ref)


@pytest.mark.slow
def test_emulated_many_launches(emu: object) -> None:
    """902 tensors (more than an argument struct of depth 2 or 3 holds: 842 / 631 slots), the 842nd with more chunks
    than its launch has blocks left (841 + 1,208 > 2,048): several launches per op, a tensor continued across
    launches, partial sums placed across them. (Emulated blocks run one after another, ~10 ms each for a reduction
    on 2 cores: this list has ~2,100 blocks, so each op runs once.)"""
    shapes = [(i % 17 + 1, 3) for i in range(841)] + [(1207 * 16384 + 5,)] + [(i % 5 + 1,) for i in range(60)]
    params, grads = _emu_lists(torch.float32, seed=9, shapes=shapes)
    before = emu.launch_count()
    sumsq = emu.grad_sumsq(grads, params, 0.0, 1)
    assert emu.launch_count() - before >= 3  # >= 2 multi-tensor launches + the finishing one
    _sums_close(sumsq, reference.grad_sumsq(grads, params, 0.0))
    w_ref, w_new = [p.clone() for p in params], [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, True, 0.0)
    before = emu.launch_count()
    emu.perturb_(w_new, grads, backups, sumsq, 0.05, 1e-12, True, 0.0, True)
    assert emu.launch_count() - before >= 2
    _close(w_new, w_ref)
    emu.restore_(w_new, backups)
    assert _bit_equal(w_new, params)


# ---------------------------------------------------------------------------------------------------------------
# Sums of squares beyond the fp32 range: every term is squared in fp64 and the scale computed in fp64, so a finite
# gradient whose squares overflow fp32 (|g| > ~1.8e19) still perturbs; a real inf/NaN gradient still skips.

@pytest.mark.parametrize("dtype, value", [(torch.float32, 2e19), (torch.float32, 1e20), (torch.bfloat16, 1e20)])
def test_emulated_huge_gradient_is_perturbed(emu: object, dtype: torch.dtype, value: float) -> None:
    w = torch.tensor([0.5, 1.0, -2.0], dtype=dtype)
    g = torch.tensor([value, 0.0, 0.0], dtype=dtype)
    sumsq = emu.grad_sumsq([g], None, 0.0, 1)
    assert sumsq.dtype == torch.float64 and torch.isfinite(sumsq).all() and sumsq.item() > 3.4e38
    assert torch.equal(sumsq, reference.grad_sumsq([g]))  # one nonzero term: exact
    w_ref, w_new = w.clone(), w.clone()
    reference.perturb_([w_ref], [g], [torch.empty_like(w)], sumsq, 0.05)
    emu.perturb_([w_new], [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, False, 0.0, True)
    assert _bit_equal([w_new], [w_ref])
    torch.testing.assert_close(w_new, w + torch.tensor([0.05, 0.0, 0.0], dtype=dtype))  # ||g|| = |g[0]|: w + rho

    # The same within a list (vector packets, several blocks) and per micro-batch slice.
    params, grads = _emu_lists(dtype, k=2, seed=14)
    grads[7][0, 123] = value  # the 70,001-element tensor, slice 0
    sums = emu.grad_sumsq(grads, None, 0.0, 2)
    _sums_close(sums, reference.grad_sumsq(grads, None, 0.0, 2))
    assert torch.isfinite(sums).all() and sums[0] > 3.4e38
    out = emu.perturb_batched(params, grads, sums, 0.05, 1e-12, False, 0.0, True)
    assert _bit_equal(out, reference.perturb_batched(params, grads, sums, 0.05))
    _close([out[7][0, 123]], [(params[7][123].float() + 0.05).to(dtype)])  # slice 0's norm is about |value|


@pytest.mark.parametrize("g_value", [1e30, 1e10])
def test_emulated_huge_adaptive(emu: object, g_value: float) -> None:
    """ASAM: t = |w| + eta = 1e10; t * g is 1e40 (beyond the fp32 range itself) or 1e20 (its square is)."""
    w = torch.tensor([1e10, 1e10, 0.5, -3.0])
    g = torch.tensor([g_value, 0.0, 3.0, -1.0])
    sumsq = emu.grad_sumsq([g], [w], 0.01, 1)
    _sums_close(sumsq, reference.grad_sumsq([g], [w], 0.01))
    assert torch.isfinite(sumsq).all() and sumsq.item() >= (1e10 * g_value) ** 2 * (1 - 1e-6)
    w_ref, w_new = w.clone(), w.clone()
    reference.perturb_([w_ref], [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, True, 0.01)
    emu.perturb_([w_new], [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, True, 0.01, True)
    assert _bit_equal([w_new], [w_ref])  # fp32 element math: t^2 * g = 1e50 overflows there, as in the reference
    if g_value == 1e10:  # scale = 0.05 / 1e20, t^2 * g = 1e30: w moves by 5e8
        torch.testing.assert_close(w_new[0], torch.tensor(1.05e10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_emulated_fsam_huge_direction(emu: object, dtype: torch.dtype, first: bool, adaptive: bool) -> None:
    params, grads = _emu_lists(dtype, seed=15)
    gen = torch.Generator().manual_seed(16)
    ema = [_place(torch.randn(g.shape, generator=gen), dtype, i % 4 == 1) for i, g in enumerate(grads)]
    grads[7][5], ema[7][5] = 3e19, 1e19  # d = 3e19 - 1e19 = 2e19 (first step: d = g = 3e19)
    grads[3][0], ema[3][0] = -1e20, 1e20  # d = -2e20
    g_ref, g_new = [g.clone() for g in grads], [g.clone() for g in grads]
    m_ref, m_new = [m.clone() for m in ema], [m.clone() for m in ema]
    p = params if adaptive else None
    s_ref = reference.fsam_direction_(g_ref, m_ref, 1.0, 0.5, first, p, 0.01)
    s_new = emu.fsam_direction_(g_new, m_new, 1.0, 0.5, first, p, 0.01)
    assert _bit_equal(g_new, g_ref) and _bit_equal(m_new, m_ref)
    _sums_close(s_new, s_ref)
    assert torch.isfinite(s_new).all() and s_new.item() > 3.4e38


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("adaptive", [False, True])
def test_emulated_non_finite_gradient_skips(emu: object, bad: float, adaptive: bool) -> None:
    params, grads = _emu_lists(torch.float32, seed=17)
    grads[7][40_000] = bad
    p = params if adaptive else None
    sumsq = emu.grad_sumsq(grads, p, 0.01, 1)
    assert sumsq.dtype == torch.float64 and not torch.isfinite(sumsq).any()
    assert torch.isnan(sumsq).item() == torch.isnan(reference.grad_sumsq(grads, p, 0.01)).item()
    w = [x.clone() for x in params]
    backups = [torch.empty_like(x) for x in params]
    emu.perturb_(w, grads, backups, sumsq, 0.05, 1e-12, adaptive, 0.01, True)
    assert _bit_equal(w, params) and _bit_equal(backups, params)
    ema = [torch.zeros_like(x) for x in grads]
    assert not torch.isfinite(emu.fsam_direction_([x.clone() for x in grads], ema, 1.0, 0.5, False, p, 0.01)).any()


@pytest.mark.parametrize("rho", [0.05, 0.3, 2 / 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_emulated_scale_from_fp64(emu: object, rho: float, normalize: bool) -> None:
    """scale = rho / (sqrt(sumsq) + eps) in fp64 from rho and eps as given, rounded once to fp32: with w = 0 and
    g = 1 each slice's output is that fp32 scale (fp32 rho and eps would be off by an ulp for rho = 0.3, 2/3)."""
    sums = torch.tensor([0.0, 3.0, 1e6 + 1, 4e38, 1e80], dtype=torch.float64)
    k = sums.numel()
    params, grads = [torch.zeros(5)], [torch.ones(k, 5)]
    out = emu.perturb_batched(params, grads, sums, rho, 1e-12, False, 0.0, normalize)
    scales = [rho / (s ** 0.5 + 1e-12) if normalize else rho for s in sums.tolist()]
    assert torch.equal(out[0], torch.tensor(scales, dtype=torch.float32)[:, None].expand(k, 5))
    assert _bit_equal(out, reference.perturb_batched(params, grads, sums, rho, 1e-12, False, 0.0, normalize))
