"""Linear stability of SGD at a (near-)minimum, from per-example Hessians (Dexter et al., ICLR 2024;
docs/DESIGN.md section 9).

Near a minimum w*, SGD on the mean loss of n examples with learning rate eta and expected batch size B (each example
drawn independently with probability B/n) is linearized as x_{t+1} = J_t x_t, x = w - w*,
J = I - (eta/B) sum_i x_i H_i with x_i ~ Bernoulli(B/n) and H_i the (PSD) Hessian of example i. The second moment
E[x x^T] evolves by the linear map

    T(X) = (I - eta H) X (I - eta H) + eta^2 (n/B - 1) / n^2 * sum_i H_i X H_i,      H = mean_i H_i,

i.e. by the matrix (I - eta H) (x) (I - eta H) + eta^2 (n/B - 1)/n^2 * sum_i H_i (x) H_i on vec(X). SGD is
mean-square stable iff its spectral radius is below 1. Three criteria, cheapest last:

* exact: that spectral radius. J is the identity on the null space of H (PSD H_i vanish there), so directions with
  no curvature neither grow nor decay and only the range of H matters: the operator is built on range(H) (r^2 x r^2
  for rank r, not d^2 x d^2), with sum_i A_i (x) A_i formed by one einsum (never n Kronecker products). It is
  symmetric, so its spectral radius is its largest |eigenvalue| (eigvalsh).
* coherence (sufficient for divergence; Dexter et al.'s restatement of a sufficient condition for the same
  mean-square divergence, not a different notion): with S_ij = sqrt(tr(H_i H_j)) and sigma = lambda_max(S) / max_i
  lambda_max(H_i), SGD diverges when (eta/sigma)^2 (n/B - 1) lambda_max(H)^2 > 1. (Why it implies the exact
  criterion: lambda_max(sum_i H_i) <= lambda_max(S), so the condition gives eta^2 (n/B-1)/n^2 max_i
  lambda_max(H_i)^2 > 1, and the noise term alone reaches that along the top eigenvector of the sharpest H_i.)
* GD bound: full-batch GD (B = n) is stable iff eta * lambda_max(H) < 2; beyond it SGD diverges for every B.

The functions taking `hessians` ([n, d, d]) let the theory be checked on constructed families; `sgd_linear_stability`
computes exact per-example Hessians of a small model first. All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._objective import Batch, LossFn
from .hessian import MAX_HESSIAN_ENTRIES, MAX_HESSIAN_PARAMS, per_example_hessians

# Largest exact operator: r^2 rows, r = rank of H. 2500 rows (r = 50) is a 50 MB matrix and a second of eigvalsh.
MAX_OPERATOR_SIZE = 2500
RANK_RTOL = 1e-6  # eigen-directions of H with curvature below RANK_RTOL * lambda_max(H) count as flat


class OperatorTooLarge(ValueError):
    """The exact mean-square operator does not fit the allowed size."""


@dataclass
class Family:
    """A PSD per-example Hessian family in float64 and its spectra."""

    hessians: torch.Tensor  # [n, d, d], symmetric PSD
    example_lambda_max: torch.Tensor  # [n], lambda_max(H_i)
    negative_curvature: float  # largest negative eigenvalue removed from any H_i, relative to max_i lambda_max(H_i)

    @property
    def n(self) -> int:
        return self.hessians.shape[0]


def psd_family(hessians: torch.Tensor) -> Family:
    """Symmetrize and project each H_i onto the PSD cone (the theory assumes PSD H_i; near a minimum the loss
    Hessian has small negative eigenvalues from the residual term). How much was removed is recorded."""
    if hessians.dim() != 3 or hessians.shape[1] != hessians.shape[2] or hessians.shape[0] == 0:
        raise ValueError(f"hessians must have shape [n, d, d] with n >= 1, got {tuple(hessians.shape)}")
    h = hessians.detach().to(torch.float64)
    h = (h + h.transpose(1, 2)) / 2
    evals, evecs = torch.linalg.eigh(h)  # ascending, [n, d] and [n, d, d]
    top = evals[:, -1].clamp_min(0)
    if float(top.max()) <= 0:
        raise ValueError("every per-example Hessian is zero (or negative semi-definite): no curvature to analyse")
    negative = float((-evals[:, 0]).clamp_min(0).max()) / float(top.max())
    if negative > 0:
        h = evecs @ torch.diag_embed(evals.clamp_min(0)) @ evecs.transpose(1, 2)
    return Family(h, top, negative)


def _batch_noise_factor(n: int, batch_size: float) -> float:
    """(n/B - 1): the variance factor of Bernoulli(B/n) sampling."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in (0, n={n}], got {batch_size}")
    return n / batch_size - 1


@dataclass
class Coherence:
    """sigma = lambda_max(S) / max_i lambda_max(H_i), S_ij = sqrt(tr(H_i H_j)).

    sigma >= 1 always (S_ii = ||H_i||_F >= lambda_max(H_i)). sigma <= n when every H_i has rank one (scalar-output
    losses at an interpolating minimum, the paper's main setting); for rank-r H_i only sigma <= n * sqrt(r) holds,
    e.g. n = 1, H_1 = I_d gives sigma = sqrt(d).
    """

    sigma: float
    lambda_max_s: float
    max_example_lambda: float


def coherence(hessians: torch.Tensor | Family) -> Coherence:
    """Coherence of a per-example Hessian family [n, d, d] (projected onto PSD first)."""
    fam = hessians if isinstance(hessians, Family) else psd_family(hessians)
    flat = fam.hessians.reshape(fam.n, -1)
    gram = flat @ flat.T  # tr(H_i H_j) = <H_i, H_j>_F for symmetric H
    # An inner product of d^2 terms carries rounding of about d^2 eps ||H_i||_F ||H_j||_F; the square root would
    # blow that up (sqrt(1e-32) = 1e-16, but sqrt(1e-17) = 3e-9), so entries at rounding level are zero.
    norms = gram.diagonal().sqrt()
    noise = flat.shape[1] * torch.finfo(gram.dtype).eps * torch.outer(norms, norms)
    s = torch.where(gram > noise, gram, torch.zeros_like(gram)).sqrt()
    lambda_s = float(torch.linalg.eigvalsh(s)[-1])
    top = float(fam.example_lambda_max.max())
    return Coherence(lambda_s / top, lambda_s, top)


def mean_lambda_max(hessians: torch.Tensor | Family) -> float:
    """lambda_max(H) of the mean Hessian H = mean_i H_i."""
    fam = hessians if isinstance(hessians, Family) else psd_family(hessians)
    return float(torch.linalg.eigvalsh(fam.hessians.mean(0))[-1])


def coherence_condition(hessians: torch.Tensor | Family, lr: float, batch_size: float) -> float:
    """(eta / sigma)^2 (n/B - 1) lambda_max(H)^2: above 1, SGD diverges (a sufficient condition)."""
    fam = hessians if isinstance(hessians, Family) else psd_family(hessians)
    return _coherence_value(lr, batch_size, fam.n, coherence(fam).sigma, mean_lambda_max(fam))


def _coherence_value(lr: float, batch_size: float, n: int, sigma: float, lambda_max: float) -> float:
    return (lr / sigma) ** 2 * _batch_noise_factor(n, batch_size) * lambda_max**2


@dataclass
class SpectralRadius:
    radius: float
    rank: int  # r = dimension of range(H) kept
    operator_size: int  # r^2, rows of the operator that was formed


def mean_square_spectral_radius(hessians: torch.Tensor | Family, lr: float, batch_size: float,
                                max_operator_size: int = MAX_OPERATOR_SIZE,
                                rank_rtol: float = RANK_RTOL) -> SpectralRadius:
    """Exact spectral radius of (I - eta H)(x)(I - eta H) + eta^2 (n/B - 1)/n^2 sum_i H_i (x) H_i on range(H).

    Eigen-directions of H with curvature <= rank_rtol * lambda_max(H) are treated as flat (eigenvalue 1, neither
    growing nor decaying) and left out. Raises OperatorTooLarge (a ValueError) when r^2 > max_operator_size:
    memory is r^4 float64 numbers.
    """
    fam = hessians if isinstance(hessians, Family) else psd_family(hessians)
    factor = _batch_noise_factor(fam.n, batch_size)
    evals, evecs = torch.linalg.eigh(fam.hessians.mean(0))
    keep = evals > rank_rtol * evals[-1]
    r = int(keep.sum())
    if r * r > max_operator_size:
        raise OperatorTooLarge(f"the exact operator on range(H) has {r * r} rows (rank r = {r}), more than "
                               f"max_operator_size={max_operator_size} ({r**4 * 8 / 2**20:.0f} MB needed)")
    basis = evecs[:, keep]  # [d, r], orthonormal eigenvectors of H
    a = basis.T @ fam.hessians @ basis  # [n, r, r], H_i in that basis
    noise = torch.einsum("iab,icd->acbd", a, a).reshape(r * r, r * r)  # sum_i A_i (x) A_i, row (a, c), col (b, d)
    operator = lr**2 * factor / fam.n**2 * noise
    damping = 1 - lr * evals[keep]  # I - eta H is diagonal in this basis
    operator.diagonal().add_(torch.outer(damping, damping).reshape(-1))
    radius = float(torch.linalg.eigvalsh(operator).abs().max())
    return SpectralRadius(radius, r, r * r)


@dataclass
class StabilityVerdict:
    """Is SGD (learning rate lr, expected batch size B) linearly stable at this minimum, and by which criterion.

    What "stable" means here: MEAN-SQUARE stability of the LINEARIZED iteration, with each example drawn independently
    with probability B/n (Bernoulli sampling, batch size B on average). "Unstable" says the second moment of the
    linearized iterates grows; it does not say that a given run diverges: real runs (fixed-size batches, drawn with or
    without replacement, finitely many steps, a nonlinear loss) often stay bounded where it says unstable, and
    with-replacement sampling has another noise factor, which can flip the verdict near the threshold. The coherence
    criterion is no separate notion: it restates (Dexter et al.) a sufficient condition for this same mean-square
    divergence in terms of the Hessians' coherence sigma.

    stable: True / False, or None when no criterion decides (the exact radius was skipped and the coherence
    condition, which is only sufficient for divergence, does not hold).
    criterion: "exact" (mean-square spectral radius), "gd_bound" (eta lambda_max(H) >= 2 diverges for every B; for
    B = n it decides both ways), "coherence" (the divergence condition holds) or "undetermined".
    """

    stable: bool | None
    criterion: str
    reason: str
    lr: float
    batch_size: float
    num_examples: int
    lambda_max: float  # of the mean Hessian H
    sigma: float
    gd_value: float  # eta * lambda_max(H); GD needs < 2
    coherence_value: float  # (eta/sigma)^2 (n/B - 1) lambda_max(H)^2; > 1 means divergence
    spectral_radius: float | None
    rank: int | None
    exact_skipped: str | None
    negative_curvature: float

    def __str__(self) -> str:
        state = {True: "mean-square stable", False: "mean-square unstable", None: "undetermined"}[self.stable]
        by = "" if self.stable is None else f" by {self.criterion}"
        return (f"SGD(lr={self.lr:g}, B={self.batch_size:g}, n={self.num_examples}, linearized, Bernoulli(B/n) "
                f"sampling): {state}{by}: {self.reason}")


def stability_verdict(hessians: torch.Tensor, lr: float, batch_size: float, exact: bool | str = "auto",
                      max_operator_size: int = MAX_OPERATOR_SIZE, rank_rtol: float = RANK_RTOL) -> StabilityVerdict:
    """Linear stability of SGD from per-example Hessians [n, d, d] (see the module docstring).

    `exact`: "auto" computes the exact radius when it fits max_operator_size and otherwise falls back to the GD
    bound and the coherence condition (the skip reason is kept in `exact_skipped`); True raises OperatorTooLarge
    instead of falling back; False never forms the operator.
    """
    if exact not in (True, False, "auto"):
        raise ValueError(f"exact must be True, False or 'auto', got {exact!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    fam = psd_family(hessians)
    n, lam = fam.n, mean_lambda_max(fam)
    coh = coherence(fam)
    coh_value = _coherence_value(lr, batch_size, n, coh.sigma, lam)
    gd_value = lr * lam
    common = dict(lr=lr, batch_size=batch_size, num_examples=n, lambda_max=lam, sigma=coh.sigma, gd_value=gd_value,
                  coherence_value=coh_value, negative_curvature=fam.negative_curvature)
    skipped = "exact=False" if exact is False else None
    if exact is not False:
        try:
            sr = mean_square_spectral_radius(fam, lr, batch_size, max_operator_size, rank_rtol)
        except OperatorTooLarge as err:
            if exact is True:
                raise
            skipped = str(err)
        else:
            stable = sr.radius < 1
            reason = f"mean-square spectral radius {sr.radius:.6g} {'<' if stable else '>='} 1 on range(H), " \
                     f"rank {sr.rank}"
            return StabilityVerdict(stable, "exact", reason, spectral_radius=sr.radius, rank=sr.rank,
                                    exact_skipped=None, **common)
    if gd_value >= 2 or batch_size == n:
        stable = gd_value < 2
        reason = f"eta * lambda_max(H) = {gd_value:.6g} {'<' if stable else '>='} 2" + (
            " (full batch: the GD bound is exact)" if batch_size == n else " (diverges for every batch size)")
        return StabilityVerdict(stable, "gd_bound", reason, spectral_radius=None, rank=None, exact_skipped=skipped,
                                **common)
    if coh_value > 1:
        reason = f"(eta/sigma)^2 (n/B - 1) lambda_max(H)^2 = {coh_value:.6g} > 1 (sigma = {coh.sigma:.4g})"
        return StabilityVerdict(False, "coherence", reason, spectral_radius=None, rank=None, exact_skipped=skipped,
                                **common)
    reason = f"exact radius skipped ({skipped}); eta * lambda_max(H) = {gd_value:.4g} < 2 and the coherence " \
             f"value {coh_value:.4g} <= 1, which is only sufficient for divergence"
    return StabilityVerdict(None, "undetermined", reason, spectral_radius=None, rank=None, exact_skipped=skipped,
                            **common)


def sgd_linear_stability(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch, lr: float,
                         batch_size: float, exact: bool | str = "auto", max_params: int = MAX_HESSIAN_PARAMS,
                         max_entries: int = MAX_HESSIAN_ENTRIES,
                         max_operator_size: int = MAX_OPERATOR_SIZE) -> StabilityVerdict:
    """Linear stability of SGD (lr, expected batch size B) at the model's current weights, on these n examples.

    Meant for a (near-)minimum of a small model: it computes the exact per-example Hessians (ValueError beyond
    max_params parameters or n * d^2 > max_entries numbers, see per_example_hessians), projects them onto the PSD
    cone (the amount removed is `negative_curvature` in the verdict) and calls stability_verdict.
    """
    hessians = per_example_hessians(model, loss_fn, inputs, targets, max_params, max_entries)
    return stability_verdict(hessians, lr, batch_size, exact, max_operator_size)
