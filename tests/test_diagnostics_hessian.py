"""Hessian eigenvalues, trace and exact Hessians against torch.autograd.functional.hessian of a hand-written MLP."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from sam_fused import diagnostics

N, D_IN, HIDDEN, D_OUT = 32, 4, 6, 3
SIZES = [(HIDDEN, D_IN), (HIDDEN,), (D_OUT, HIDDEN), (D_OUT,)]  # named_parameters order of make_mlp()


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D_OUT)).double()


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_IN, generator=gen, dtype=torch.float64), torch.randn(N, D_OUT, generator=gen,
                                                                               dtype=torch.float64)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def mlp_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MLP written out by hand as a function of its flat parameters (independent of the library)."""
    parts, i = [], 0
    for shape in SIZES:
        size = math.prod(shape)
        parts.append(flat[i:i + size].reshape(shape))
        i += size
    w1, b1, w2, b2 = parts
    return mse(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)


def reference_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(lambda w: mlp_loss(w, x, y), flat)


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    model, (x, y) = make_mlp(), make_data()
    return model, x, y, reference_hessian(model, x, y)


def test_reference_hessian_is_indefinite(problem) -> None:
    """The MLP is away from a minimum: the test below exercise a Hessian with negative eigenvalues too."""
    *_, h = problem
    assert torch.linalg.eigvalsh(h)[0] < -0.1


def test_lanczos_top_eigenvalues_match_exact(problem) -> None:
    model, x, y, h = problem
    est = diagnostics.hessian_eigenvalues(model, mse, x, y, k=3, method="lanczos", tol=1e-8)
    exact = torch.linalg.eigvalsh(h).flip(0)[:3]
    assert est.converged and est.method == "lanczos"
    torch.testing.assert_close(torch.tensor(est.eigenvalues, dtype=torch.float64), exact, rtol=1e-7, atol=0)
    assert max(est.residuals) < 1e-8
    assert est.iterations <= h.shape[0]
    # the returned vectors are eigenvectors of the reference Hessian
    vecs = est.eigenvectors.to(torch.float64)
    torch.testing.assert_close(vecs @ h, exact[:, None] * vecs, rtol=0, atol=1e-6)


def test_power_iteration_top_eigenvalues_match_exact(problem) -> None:
    model, x, y, h = problem
    est = diagnostics.hessian_eigenvalues(model, mse, x, y, k=2, method="power", max_iter=3000, tol=1e-9)
    exact = torch.linalg.eigvalsh(h).flip(0)[:2]
    assert est.converged and est.method == "power"
    torch.testing.assert_close(torch.tensor(est.eigenvalues, dtype=torch.float64), exact, rtol=1e-9, atol=0)
    assert max(est.residuals) < 1e-9  # tol bounds the residual, which bounds the eigenvalue error


def test_unconverged_estimates_say_so(problem) -> None:
    model, x, y, _ = problem
    for method in ("power", "lanczos"):
        est = diagnostics.hessian_eigenvalues(model, mse, x, y, k=2, method=method, max_iter=2, tol=1e-12)
        assert not est.converged
        assert est.iterations <= 4


class Quadratic(nn.Module):
    """forward() returns 0.5 w^T A w: the Hessian is A."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.linspace(-1, 1, a.shape[0], dtype=a.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + 0 * x.sum()


def identity_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out


def rotated(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_largest_algebraic_eigenvalue_when_a_negative_one_dominates(method: str) -> None:
    """A saddle with curvature -5 and largest positive curvature 3: the largest eigenvalue is 3, not -5."""
    model = Quadratic(rotated([-5.0, 3.0, 1.0, 0.5, -0.2]))
    dummy = torch.zeros(1, 1, dtype=torch.float64)
    est = diagnostics.hessian_eigenvalues(model, identity_loss, dummy, dummy, k=2, method=method, max_iter=500,
                                          tol=1e-12)
    torch.testing.assert_close(torch.tensor(est.eigenvalues, dtype=torch.float64),
                               torch.tensor([3.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)


def test_lanczos_finds_repeated_eigenvalues() -> None:
    a = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    est = diagnostics.lanczos(lambda v: a @ v, 6, k=4, dtype=torch.float64, tol=1e-10)
    torch.testing.assert_close(torch.tensor(est.eigenvalues, dtype=torch.float64),
                               torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-9, atol=0)


def test_hutchinson_trace_matches_exact_within_its_error(problem) -> None:
    model, x, y, h = problem
    est = diagnostics.hessian_trace(model, mse, x, y, max_samples=1000, rtol=0.05, seed=3)
    exact = float(h.trace())
    assert est.converged and est.samples < 1000
    assert 2 * est.std_error <= 0.05 * abs(est.trace)
    assert abs(est.trace - exact) < 4 * est.std_error


def test_hutchinson_standard_error_is_calibrated(problem) -> None:
    """Across independent seeds, the spread of the estimates matches the reported standard errors."""
    model, x, y, h = problem
    runs = [diagnostics.hessian_trace(model, mse, x, y, max_samples=20, min_samples=20, seed=s) for s in range(40)]
    estimates = torch.tensor([r.trace for r in runs], dtype=torch.float64)
    mean_se = sum(r.std_error for r in runs) / len(runs)
    assert all(r.samples == 20 for r in runs)
    assert 0.6 < float(estimates.std()) / mean_se < 1.6
    assert abs(float(estimates.mean()) - float(h.trace())) < 4 * mean_se / math.sqrt(len(runs))


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    """v^T A v = tr(A) for every Rademacher v when A is diagonal: zero variance."""
    model = Quadratic(torch.diag(torch.tensor([3.0, -1.0, 0.25, 2.0], dtype=torch.float64)))
    dummy = torch.zeros(1, 1, dtype=torch.float64)
    est = diagnostics.hessian_trace(model, identity_loss, dummy, dummy, min_samples=5)
    assert est.trace == pytest.approx(4.25, rel=1e-12) and est.std_error == 0 and est.samples == 5


def test_exact_hessian_matches_reference(problem) -> None:
    model, x, y, h = problem
    torch.testing.assert_close(diagnostics.exact_hessian(model, mse, x, y), h, rtol=1e-10, atol=1e-12)


def test_per_example_hessians_match_reference(problem) -> None:
    model, x, y, h = problem
    per_example = diagnostics.per_example_hessians(model, mse, x, y)
    assert per_example.shape == (N, h.shape[0], h.shape[0])
    for i in (0, 7, N - 1):
        torch.testing.assert_close(per_example[i], reference_hessian(model, x[i:i + 1], y[i:i + 1]), rtol=1e-10,
                                   atol=1e-12)
    torch.testing.assert_close(per_example.mean(0), h, rtol=1e-10, atol=1e-12)  # mean loss: H = mean H_i


def test_dense_hessians_refuse_large_models(problem) -> None:
    model, x, y, _ = problem
    d = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="max_params"):
        diagnostics.exact_hessian(model, mse, x, y, max_params=d - 1)
    with pytest.raises(ValueError, match="max_entries"):
        diagnostics.per_example_hessians(model, mse, x, y, max_entries=N * d * d - 1)


def test_diagnostics_leave_the_model_untouched() -> None:
    """Parameters, gradients and BatchNorm running statistics are the same before and after."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diagnostics.hessian_eigenvalues(model, mse, x, y, k=2, max_iter=10)
    diagnostics.hessian_trace(model, mse, x, y, max_samples=10)
    diagnostics.m_sharpness(model, mse, x, y, rho=0.1, micro_batch_size=8)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_invalid_arguments() -> None:
    model, (x, y) = make_mlp(), make_data()
    with pytest.raises(ValueError, match="method"):
        diagnostics.hessian_eigenvalues(model, mse, x, y, method="arnoldi")
    with pytest.raises(ValueError, match="k must be"):
        diagnostics.lanczos(lambda v: v, 3, k=4)
    with pytest.raises(ValueError, match="min_samples"):
        diagnostics.hutchinson_trace(lambda v: v, 3, min_samples=1)


def test_exact_hessians_raise_no_deprecation_warning() -> None:
    """torch.func.hessian's forward-mode AD loads TorchScript decompositions, deprecated in torch >= 2.10; the dense
    Hessians here must not (a fresh process: torch loads them once per process)."""
    code = ("import torch, warnings\nfrom torch import nn\nfrom sam_fused import diagnostics\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()\n"
            "x, y = torch.randn(5, 3, dtype=torch.double), torch.randn(5, 1, dtype=torch.double)\n"
            "mse = nn.functional.mse_loss\n"
            "diagnostics.exact_hessian(model, mse, x, y); diagnostics.per_example_hessians(model, mse, x, y)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def _mlp_at_init(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    return model, torch.randn(64, 10, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)


def test_power_iteration_converged_means_what_it_says() -> None:
    """converged: each value within tol * |value| of an eigenvalue, values in descending order. It used to stop on a
    small change of the Rayleigh quotient: ~10% off, unsorted, and converged=True on a 10-32-4 MLP at init."""
    tol = 1e-4
    for seed in range(20):
        model, x, y = _mlp_at_init(seed)
        est = diagnostics.hessian_eigenvalues(model, mse, x, y, k=3, method="power", tol=tol, seed=seed)
        assert est.eigenvalues == sorted(est.eigenvalues, reverse=True), seed
        if not est.converged:
            continue
        exact = torch.linalg.eigvalsh(diagnostics.exact_hessian(model, mse, x, y))
        for value in est.eigenvalues:
            assert float((exact - value).abs().min()) <= tol * abs(value) * (1 + 1e-9), (seed, value)


def test_hutchinson_converged_is_a_95_percent_statement(problem) -> None:
    """Among converged runs, the error exceeds rtol about once in 20 (it stopped at one standard error: ~1 in 3)."""
    model, x, y, h = problem
    exact, rtol = float(h.trace()), 0.1
    runs = [diagnostics.hessian_trace(model, mse, x, y, max_samples=400, rtol=rtol, seed=s) for s in range(60)]
    converged = [r for r in runs if r.converged]
    assert len(converged) >= 50
    misses = sum(abs(r.trace - exact) > rtol * abs(exact) for r in converged)
    assert misses <= 0.15 * len(converged), (misses, len(converged))
