"""pytest-benchmark timing of one SAM step (first_step + restore) per backend on the many_small profile.

Run it explicitly: `pytest bench/` (add `--benchmark-only` to skip nothing else, `--benchmark-json` to save). The main
suite never collects it because pyproject's testpaths is tests/. Compare the rows of one run only: shared machine.
"""

import pytest
import torch
from sam_fused.bench import baselines, profiles

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
USABLE, SKIPPED = baselines.device_backends(DEVICE)


@pytest.fixture(scope="module")
def many_small() -> tuple:
    return profiles.materialize(profiles.shapes("many_small"), DEVICE, torch.float32)


def _sync() -> None:
    if DEVICE.type == "cuda":  # CUDA launches are asynchronous: time the work, not the launch
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", [*USABLE, *baselines.BASELINES, *SKIPPED])
def test_step_many_small(benchmark, many_small: tuple, backend: str) -> None:
    if backend in SKIPPED:
        pytest.skip(f"backend {backend} unusable on {DEVICE}: {SKIPPED[backend]}")
    impl = baselines.make_impl(backend)
    params, grads, backups = many_small
    benchmark.group = f"step many_small {DEVICE.type}"

    def step() -> None:
        impl.step(params, grads, backups)
        _sync()

    benchmark(step)
