"""SGD linear stability (Dexter et al., ICLR 2024; docs/DESIGN.md section 9) on constructed per-example Hessian
families.

Expected values come from closed forms derived here or from brute force (explicit Kronecker products, the exact
expectation over all Bernoulli batches), never from the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from sam_fused import diagnostics
from sam_fused.diagnostics import OperatorTooLarge

F64 = torch.float64


def orthonormal(d: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """m orthonormal columns in R^d: [d, m]."""
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=gen, dtype=F64))
    return q


def aligned_family(group_sizes: list[int], curvature: float = 2.0, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Examples in group g all have H_i = curvature * u_g u_g^T, with orthonormal u_g: [n, d, d]."""
    u = orthonormal(d, len(group_sizes), torch.Generator().manual_seed(seed))
    rank_one = [curvature * torch.outer(u[:, g], u[:, g]) for g in range(len(group_sizes))]
    return torch.stack([rank_one[g] for g, size in enumerate(group_sizes) for _ in range(size)])


def rank_r_family(n: int, d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """Random PSD H_i = A_i A_i^T with A_i [d, r] Gaussian (random scale per example)."""
    a = torch.randn(n, d, r, generator=gen, dtype=F64) * torch.rand(n, 1, 1, generator=gen, dtype=F64) * 2
    return a @ a.transpose(1, 2)


def brute_force_operator(hessians: torch.Tensor, lr: float, batch_size: float) -> torch.Tensor:
    """(I - eta H)(x)(I - eta H) + eta^2 (n/B - 1)/n^2 sum_i H_i (x) H_i with explicit Kronecker products."""
    n, d, _ = hessians.shape
    step = torch.eye(d, dtype=F64) - lr * hessians.mean(0)
    noise = sum(torch.kron(h, h) for h in hessians)
    return torch.kron(step, step) + lr**2 * (n / batch_size - 1) / n**2 * noise


def spectral_radius(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(m).abs().max())


# -- coherence -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_sizes", [[3, 3, 3], [1, 2, 4], [5], [1, 1, 1, 1]])
def test_sigma_counts_examples_sharing_one_direction(group_sizes: list[int]) -> None:
    """Aligned within a group, orthogonal across groups: S is block-diagonal with all-ones blocks times c, so
    lambda_max(S) = c * (largest group) and sigma = the size of the largest group."""
    coh = diagnostics.coherence(aligned_family(group_sizes, curvature=2.5))
    assert coh.sigma == pytest.approx(max(group_sizes), rel=1e-9)
    assert coh.max_example_lambda == pytest.approx(2.5, rel=1e-12)


def test_sigma_is_between_one_and_n_for_rank_one_families() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, d = int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(1, 10, (1,), generator=gen))
        sigma = diagnostics.coherence(rank_r_family(n, d, 1, gen)).sigma
        assert 1 - 1e-9 <= sigma <= n + 1e-9


def test_sigma_bounds_for_higher_rank_families() -> None:
    """sigma >= 1 always; for rank-r H_i only sigma <= n sqrt(r) holds, and sigma > n happens (n=1, H=I_d)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        n, r = int(torch.randint(1, 8, (1,), generator=gen)), int(torch.randint(2, 5, (1,), generator=gen))
        sigma = diagnostics.coherence(rank_r_family(n, 6, r, gen)).sigma
        assert 1 - 1e-9 <= sigma <= n * math.sqrt(r) + 1e-9
    assert diagnostics.coherence(torch.eye(9, dtype=F64)[None]).sigma == pytest.approx(3.0, rel=1e-12)


# -- exact mean-square operator --------------------------------------------------------------------------------------


def test_operator_matches_kronecker_brute_force() -> None:
    """Full-rank mean Hessian (n > d rank-one examples), so range(H) is everything and the radii must agree."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        h = rank_r_family(7, 4, 1, gen)
        lr = float(torch.rand(1, generator=gen)) * 2 / diagnostics.mean_lambda_max(h)
        for b in (1, 2.5, 7):
            got = diagnostics.mean_square_spectral_radius(h, lr, b)
            assert got.rank == 4 and got.operator_size == 16
            assert got.radius == pytest.approx(spectral_radius(brute_force_operator(h, lr, b)), rel=1e-10)


def test_operator_is_the_second_moment_map_of_bernoulli_sgd() -> None:
    """E[J (x) J] over all 2^n batches, J = I - (eta/B) sum_{i in batch} H_i, each i drawn with probability B/n."""
    gen = torch.Generator().manual_seed(3)
    n, d, b = 5, 3, 2.0
    h = rank_r_family(n, d, 1, gen)
    lr = 1.3 / diagnostics.mean_lambda_max(h)
    p = b / n
    expected = torch.zeros(d * d, d * d, dtype=F64)
    for mask in itertools.product((0, 1), repeat=n):
        j = torch.eye(d, dtype=F64) - lr / b * sum((h[i] for i in range(n) if mask[i]), torch.zeros(d, d, dtype=F64))
        expected += p ** sum(mask) * (1 - p) ** (n - sum(mask)) * torch.kron(j, j)
    torch.testing.assert_close(brute_force_operator(h, lr, b), expected, rtol=1e-12, atol=1e-12)
    got = diagnostics.mean_square_spectral_radius(h, lr, b).radius
    assert got == pytest.approx(spectral_radius(expected), rel=1e-10)


def test_null_space_of_h_is_left_out() -> None:
    """With rank(H) < d the full operator has eigenvalue exactly 1 on null directions; on range(H) it does not."""
    h = aligned_family([2, 2], d=6)  # rank 2 in R^6
    lr = 0.5 / diagnostics.mean_lambda_max(h)
    got = diagnostics.mean_square_spectral_radius(h, lr, 4)  # B = n: GD, radius (1 - 0.5)^2 on range(H)
    assert got.rank == 2
    assert got.radius == pytest.approx(0.25, rel=1e-12)
    assert spectral_radius(brute_force_operator(h, lr, 4)) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("n, s", [(12, 3), (20, 4), (10, 1)])
def test_stability_boundary_at_batch_n_over_sigma_plus_one(n: int, s: int) -> None:
    """n/s groups of s aligned examples, eta * lambda_max(H) = 1. On each direction the operator is
    (1 - eta lambda)^2 + eta^2 (n/B - 1)/n^2 * s c^2 = (n/B - 1)/s, so the radius crosses 1 at B = n/(s+1)."""
    h = aligned_family([s] * (n // s), curvature=3.0, d=n // s + 2)
    lr = 1.0 / diagnostics.mean_lambda_max(h)
    assert diagnostics.coherence(h).sigma == pytest.approx(s, rel=1e-9)
    boundary = n / (s + 1)
    for b in (boundary / 2, boundary * 0.9, boundary, boundary * 1.1, boundary * 2, n):
        radius = diagnostics.mean_square_spectral_radius(h, lr, b).radius
        assert radius == pytest.approx((n / b - 1) / s, rel=1e-9, abs=1e-12)
    assert diagnostics.stability_verdict(h, lr, boundary * 0.9).stable is False
    assert diagnostics.stability_verdict(h, lr, boundary * 1.1).stable is True


def test_divergence_condition_implies_exact_instability() -> None:
    """Whenever (eta/sigma)^2 (n/B - 1) lambda_max(H)^2 > 1, the exact mean-square radius exceeds 1."""
    gen = torch.Generator().manual_seed(4)
    triggered = 0
    for trial in range(300):
        n = int(torch.randint(2, 10, (1,), generator=gen))
        d = int(torch.randint(2, 7, (1,), generator=gen))
        h = rank_r_family(n, d, 1 + trial % 3, gen)
        lam = diagnostics.mean_lambda_max(h)
        lr = float(torch.rand(1, generator=gen)) * 2.5 / lam
        b = float(torch.randint(1, n + 1, (1,), generator=gen))
        if diagnostics.coherence_condition(h, lr, b) > 1:
            triggered += 1
            assert diagnostics.mean_square_spectral_radius(h, lr, b).radius > 1
    assert triggered >= 30  # the property was exercised, not vacuous


def test_gd_bound_decides_full_batch() -> None:
    h = aligned_family([2, 3])
    lam = diagnostics.mean_lambda_max(h)
    for eta_lam, stable in ((1.99, True), (2.01, False)):
        exact = diagnostics.stability_verdict(h, eta_lam / lam, 5)
        bound = diagnostics.stability_verdict(h, eta_lam / lam, 5, exact=False)
        assert exact.criterion == "exact" and exact.stable is stable
        assert bound.criterion == "gd_bound" and bound.stable is stable
        assert exact.spectral_radius == pytest.approx((1 - eta_lam) ** 2, rel=1e-9)


# -- verdicts --------------------------------------------------------------------------------------------------------


def test_verdict_says_which_criterion_decided() -> None:
    h = aligned_family([4, 4, 4], curvature=1.0, d=5)  # n = 12, sigma = 4, lambda_max(H) = 1/3
    lam = diagnostics.mean_lambda_max(h)
    exact = diagnostics.stability_verdict(h, 1.0 / lam, 1)
    assert exact.criterion == "exact" and exact.stable is False and exact.spectral_radius == pytest.approx(11 / 4)

    # operator too large: fall back, and say why
    coh = diagnostics.stability_verdict(h, 1.0 / lam, 0.5, max_operator_size=1)  # (1/4)^2 * 23 > 1
    assert coh.criterion == "coherence" and coh.stable is False
    assert coh.coherence_value == pytest.approx((1 / 4) ** 2 * 23) and "max_operator_size" in coh.exact_skipped
    gd = diagnostics.stability_verdict(h, 2.5 / lam, 6, max_operator_size=1)
    assert gd.criterion == "gd_bound" and gd.stable is False
    unknown = diagnostics.stability_verdict(h, 1.0 / lam, 6, max_operator_size=1)  # (1/4)^2 * 1 <= 1
    assert unknown.criterion == "undetermined" and unknown.stable is None and unknown.spectral_radius is None
    assert "undetermined" in str(unknown)
    # the verdict names what "unstable" means: the linearized iteration's second moment under Bernoulli(B/n) sampling
    assert "mean-square unstable by exact" in str(exact) and "linearized, Bernoulli(B/n) sampling" in str(exact)
    assert "mean-square unstable by coherence" in str(coh)
    with pytest.raises(OperatorTooLarge):
        diagnostics.stability_verdict(h, 1.0 / lam, 6, exact=True, max_operator_size=1)


def test_negative_curvature_is_projected_and_reported() -> None:
    h = aligned_family([2, 2], curvature=1.0, d=4)
    bent = h.clone()
    bent[0] -= 0.1 * torch.eye(4, dtype=F64)  # eigenvalues of H_0: 0.9, -0.1 (x3)
    verdict = diagnostics.stability_verdict(bent, 0.5, 2)
    assert verdict.negative_curvature == pytest.approx(0.1, rel=1e-9)
    assert diagnostics.stability_verdict(h, 0.5, 2).negative_curvature < 1e-12  # PSD up to rounding


def test_invalid_families_and_batch_sizes() -> None:
    h = aligned_family([2])
    with pytest.raises(ValueError, match="batch_size"):
        diagnostics.stability_verdict(h, 0.1, 3)
    with pytest.raises(ValueError, match="shape"):
        diagnostics.coherence(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="zero"):
        diagnostics.coherence(torch.zeros(3, 2, 2))


# -- from a model ----------------------------------------------------------------------------------------------------


def test_sgd_linear_stability_of_least_squares() -> None:
    """Linear regression with loss (x.w - y)^2: H_i = 2 x_i x_i^T exactly (any w), so the model-level verdict must
    equal the verdict on that closed-form family."""
    gen = torch.Generator().manual_seed(5)
    n, d = 10, 4
    x = torch.randn(n, d, generator=gen, dtype=F64)
    y = torch.randn(n, generator=gen, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    loss_fn = lambda out, t: (out.squeeze(-1) - t).pow(2).mean()  # noqa: E731
    family = 2 * x[:, :, None] * x[:, None, :]
    torch.testing.assert_close(diagnostics.per_example_hessians(model, loss_fn, x, y), family, rtol=1e-12, atol=1e-12)
    lam = diagnostics.mean_lambda_max(family)
    for eta_lam, b in ((0.5, 1), (1.5, 2), (1.9, 10), (0.9, 3)):
        got = diagnostics.sgd_linear_stability(model, loss_fn, x, y, lr=eta_lam / lam, batch_size=b)
        want = diagnostics.mean_square_spectral_radius(family, eta_lam / lam, b).radius
        assert got.criterion == "exact" and got.spectral_radius == pytest.approx(want, rel=1e-9)
        assert got.stable is (want < 1)
    with pytest.raises(ValueError, match="max_params"):
        diagnostics.sgd_linear_stability(model, loss_fn, x, y, lr=0.1, batch_size=2, max_params=3)
