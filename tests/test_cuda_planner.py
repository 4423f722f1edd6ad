"""The host side of the CUDA backend, tested on the CPU (docs/DESIGN.md section 7): the launch planner, and what only
the kernels' emulation shows (launch splitting); the emulated kernels' parity with the torch reference, op by op, is
tests/test_parity.py's (runner `cuda_emu`).

1. The planner (csrc/cuda/mta_planner.h) is plain host C++ shared by the CUDA extension and, for these tests, by a
   test-only extension built on the fly (tests/native.py: csrc/testing/planner_ops.cpp, a C++ compiler is all it
   needs), which exposes it as torch.ops.sam_fused_planner.plan_chunks. A plan is a list of launches; each launch has
   at most max_tensors tensors and max_blocks blocks, and each block covers one chunk of one tensor. The kernels trust
   it blindly, so these tests check what they rely on: every element of every tensor in exactly one block, empty
   tensors skipped, the limits respected, tensors continued across launches, blocks in list order.
2. Kernel emulation (csrc/testing/emu, built on the fly by tests/native.py): csrc/cuda/*.cu compiled by the host
   compiler, each CUDA thread a std::thread, on CPU tensors. Here, a list long enough for several launches per op. It
   says nothing about real GPU execution: that is tests/test_cuda_gpu.py, on a GPU. It needs the CUDA headers (the
   toolkit nvcc belongs to) and a C++ compiler; the first run compiles for ~40 s, later runs reuse it.
"""

from __future__ import annotations

import random
from collections import defaultdict

import native
import pytest
import torch
from helpers import assert_matches, assert_sumsq
from parity import RUNNERS, assert_all_bits_equal, misaligned_specs

from sam_fused import reference


@pytest.fixture(scope="module")
def planner() -> object:
    """torch.ops.sam_fused_planner (built once per source version, cached under ~/.cache/sam_fused/planner)."""
    if native.compiler_missing():
        pytest.skip(native.compiler_missing())
    return native.planner_ops()


pytestmark = pytest.mark.usefixtures("planner")  # every test here needs a C++ compiler

Row = tuple[int, int, int, int, int]  # (launch, block, tensor, chunk_start, chunk_len)


def plan(numels: list[int], chunk: int, max_tensors: int, max_blocks: int) -> list[Row]:
    flat = native.planner_ops().plan_chunks(numels, chunk, max_tensors, max_blocks)
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


def test_small_hand_checked() -> None:
    rows = plan([0, 5, 40000, 3], 16384, 2, 2)
    assert rows == [
        (0, 0, 1, 0, 5), (0, 1, 2, 0, 16384),  # launch 0: 2 blocks (its limit), tensors 1 and 2
        (1, 0, 2, 16384, 16384), (1, 1, 2, 32768, 7232),  # tensor 2 continues in launch 1
        (2, 0, 3, 0, 3),
    ]


def test_empty_lists_and_empty_tensors() -> None:
    assert plan([], 16, 4, 4) == []
    assert plan([0, 0, 0], 16, 4, 4) == []
    rows = check_plan([0, 1, 0, 17, 0], 16, 4, 4)
    assert {r[2] for r in rows} == {1, 3}


def test_tensor_limit_starts_new_launch() -> None:
    rows = check_plan([3] * 10, 16, 4, 100)
    launches = defaultdict(set)
    for r in rows:
        launches[r[0]].add(r[2])
    assert [sorted(t) for _, t in sorted(launches.items())] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_block_limit_splits_a_tensor() -> None:
    rows = check_plan([10 * 16 + 1], 16, 4, 3)
    assert len(rows) == 11
    assert max(r[0] for r in rows) == 3  # 3 + 3 + 3 + 2 blocks
    assert rows[-1][3:] == (160, 1)


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


@pytest.mark.parametrize("budget", PARAM_BUDGETS)
def test_kernel_limits_fit_the_argument_struct(budget: int) -> None:
    """The limits the kernels are compiled with: chunks keep 16-byte vectors aligned, and the by-value argument
    struct of MtaArgs<D> (D addresses + an element count per tensor, a 4-byte chunk index + 2-byte slot per block)
    plus the other parameters stays within the kernel parameter budget for every depth the kernels use."""
    chunk, max_blocks, *max_tensors = native.planner_ops().kernel_limits(budget)
    assert chunk % 8 == 0  # the widest packet is 8 elements (bf16/fp16)
    assert max_blocks < 2**16 and max(max_tensors) < 2**16  # slots are uint16
    for depth, tensors in enumerate(max_tensors, start=1):
        struct = 8 * (depth + 1) * tensors + 6 * max_blocks
        assert struct + SCALAR_BYTES <= budget, f"depth {depth}"
        assert struct + SCALAR_BYTES + 8 * (depth + 1) > budget, f"depth {depth}: a tensor slot left unused"


def test_large_budget_limits() -> None:
    """With CUDA >= 12.1's 32 KB of parameters one launch covers several hundred tensors and ~2 waves of blocks on an
    H200 (132 SMs x 8 resident blocks): a 2,000-tensor list is 3-4 launches per op, not 36."""
    _, max_blocks, *max_tensors = native.planner_ops().kernel_limits(32764)
    assert max_blocks == 2048 and max_tensors == [1263, 842, 631, 505]
    _, classic_blocks, *classic_tensors = native.planner_ops().kernel_limits(4096)
    assert classic_blocks == 320 and classic_tensors == [120, 80, 60, 48]
    for depth in (2, 3):
        rows = check_plan([2048] * 2000, 16384, max_tensors[depth - 1], max_blocks)
        assert len({r[0] for r in rows}) == -(-2000 // max_tensors[depth - 1])
    with pytest.raises(ValueError):
        native.planner_ops().kernel_limits(8192)


@pytest.mark.parametrize("budget", PARAM_BUDGETS)
def test_model_profiles_with_kernel_limits(budget: int) -> None:
    """Parameter lists like the benchmark profiles (a ResNet-like mix, many small tensors) with the real limits."""
    chunk, max_blocks, *max_tensors = native.planner_ops().kernel_limits(budget)
    rng = random.Random(0)
    resnet_like = [rng.choice([64, 128, 256, 512]) * rng.choice([64, 128, 256, 512]) * rng.choice([1, 9])
                   for _ in range(161)]
    many_small = [2048] * 2000
    for numels in (resnet_like, many_small, [70_001, 0, 1, 3 * chunk + 5, max_blocks * chunk + 1]):
        for depth_limit in max_tensors:
            check_plan(numels, chunk, depth_limit, max_blocks)


def test_huge_tensor() -> None:
    """Element offsets are 64-bit: a tensor of more than 2**31 elements is planned without overflow."""
    chunk = 16384
    n = 2**31 + 12345
    rows = plan([n], chunk, 8, 320)
    assert len(rows) == -(-n // chunk)
    assert sum(r[4] for r in rows) == n
    assert rows[-1][3] == (len(rows) - 1) * chunk


@pytest.mark.parametrize("args", [([4], 0, 1, 1), ([4], 16, 0, 1), ([4], 16, 1, 0), ([4, -1], 16, 1, 1)])
def test_invalid_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        native.planner_ops().plan_chunks(*args)


# ---------------------------------------------------------------------------------------------------------------
# 2. The CUDA kernels' source under CPU emulation.

EMU = next(r for r in RUNNERS if r.name == "cuda_emu")


@pytest.fixture(scope="module")
def emu() -> object:
    """torch.ops.sam_fused_emu (built once per source version, cached under ~/.cache/sam_fused/cuda_emu)."""
    if native.emu_missing():
        pytest.skip(native.emu_missing())
    return native.emu_ops()


@pytest.mark.slow
def test_emulated_many_launches(emu: object) -> None:
    """902 tensors (more than an argument struct of depth 2 or 3 holds: 842 / 631 slots), the 842nd with more chunks
    than its launch has blocks left (841 + 1,208 > 2,048): several launches per op, a tensor continued across
    launches, partial sums placed across them. (Emulated blocks run one after another, ~10 ms each for a reduction
    on 2 cores: this list has ~2,100 blocks, so each op runs once.)"""
    shapes = [(i % 17 + 1, 3) for i in range(841)] + [(1207 * 16384 + 5,)] + [(i % 5 + 1,) for i in range(60)]
    params, grads = EMU.lists(torch.float32, seed=9, specs=misaligned_specs(shapes))
    before = emu.launch_count()
    sumsq = emu.grad_sumsq(grads, params, 0.0, 1)
    assert emu.launch_count() - before >= 3  # >= 2 multi-tensor launches + the finishing one
    assert_sumsq(sumsq, reference.grad_sumsq(grads, params, 0.0), EMU.sums_rtol)
    w_ref, w_new = [p.clone() for p in params], [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, True, 0.0)
    before = emu.launch_count()
    emu.perturb_(w_new, grads, backups, sumsq, 0.05, 1e-12, True, 0.0, True)
    assert emu.launch_count() - before >= 2
    for i, (a, e) in enumerate(zip(w_new, w_ref)):
        assert_matches(a, e, f"params[{i}]")
    emu.restore_(w_new, backups)
    assert_all_bits_equal(w_new, params, "restored")
