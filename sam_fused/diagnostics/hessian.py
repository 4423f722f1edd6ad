"""Curvature of the training loss: largest Hessian eigenvalues, Hessian trace, exact (per-example) Hessians.

Large models never form the Hessian: the estimators only need Hessian-vector products (double backward through the
gradient graph, built once per call). Each estimator returns its estimate together with what tells how far to trust
it (iterations, residuals, standard error), because a sharpness number without its error is easy to over-read.

* `lanczos` / `power_iteration`: largest eigenvalues of any symmetric operator given as a matvec.
  `hessian_eigenvalues` applies them to the Hessian of loss_fn(model(x), y).
* `hutchinson_trace` / `hessian_trace`: tr(H) = E[v^T H v] for Rademacher probes v, with its standard error.
* `exact_hessian` / `per_example_hessians`: dense [d, d] and [n, d, d] matrices for small models (torch.func).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._objective import Batch, LossFn, Objective, batch_size_of

Matvec = Callable[[torch.Tensor], torch.Tensor]

# Dense per-example Hessians: n * d * d numbers. Defaults keep them around 256 MB in fp32.
MAX_HESSIAN_PARAMS = 2048
MAX_HESSIAN_ENTRIES = 2**26


@dataclass
class EigenEstimate:
    """The k largest (algebraic) eigenvalues of a symmetric operator, with convergence information.

    residuals[i] = ||A v_i - lambda_i v_i|| / |lambda_i| for the returned unit vector v_i (relative residual; A has
    an eigenvalue within residuals[i] * |lambda_i| of lambda_i, and the error is usually of the order of its square).
    relative_changes[i]: power iteration: |lambda_t - lambda_{t-1}| / |lambda_t| at its last step; Lanczos: the
    change of the i-th Ritz value over the last step.
    converged: every residual is below the solver's `tol` (power iteration: and its deflation found the values in
    descending order). Eigenvalues are in descending order.
    """

    eigenvalues: list[float]
    residuals: list[float]
    relative_changes: list[float]
    iterations: int  # operator products used
    converged: bool
    method: str
    eigenvectors: torch.Tensor | None = field(default=None, repr=False)  # [k, d], unit rows


@dataclass
class TraceEstimate:
    """Hutchinson's tr(A) = E[v^T A v], v Rademacher: the mean over `samples` probes and its standard error."""

    trace: float
    std_error: float  # sample std of v^T A v over probes / sqrt(samples): an estimate from the probes themselves
    samples: int
    converged: bool  # 2 * std_error <= rtol * |trace|: |trace - tr(A)| <= rtol |trace| at ~95% confidence
    rtol: float


# -- random vectors --------------------------------------------------------------------------------------------------


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _random_unit(dim: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    v = torch.randn(dim, generator=gen, dtype=dtype, device=device)
    return v / v.norm()


def _rademacher(dim: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, (dim,), generator=gen, device=device).to(dtype) * 2 - 1


def _project_out(v: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """v minus its components on the orthonormal rows of `basis` [m, d] (twice: one pass loses orthogonality)."""
    if basis is None or basis.shape[0] == 0:
        return v
    for _ in range(2):
        v = v - basis.T @ (basis @ v)
    return v


def _check_k(k: int, dim: int) -> None:
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}] (the operator's size), got {k}")


# -- power iteration -------------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    value: float
    vector: torch.Tensor
    residual: float
    change: float
    iterations: int
    converged: bool


def _power_stage(matvec: Matvec, v: torch.Tensor, shift: float, found: torch.Tensor | None, max_iter: int,
                 tol: float) -> _Stage:
    """Dominant eigenpair of A - shift*I on the orthogonal complement of `found`; the value is returned unshifted."""
    v = _project_out(v, found)
    v = v / v.norm()
    value, change, residual, it = 0.0, math.inf, math.inf, 0
    while it < max_iter:
        it += 1
        full = matvec(v)
        av = _project_out(full, found)  # A v, restricted to the complement of `found`
        new = float(v @ av)  # Rayleigh quotient of A (unshifted)
        scale = max(abs(new), 1e-30)
        # Reported: the residual of A itself, so that A has an eigenvalue within residual * |new| of new. The stage
        # iterates until the deflated operator's residual is 10x below tol, which leaves room for what the earlier
        # stages' vectors leak into A's residual.
        residual = float((full - new * v).norm()) / scale
        change = abs(new - value) / scale
        value = new
        if float((av - new * v).norm()) / scale < tol / 10:
            break
        shifted = av - shift * v  # (A - shift I) v on the complement of `found`
        norm = shifted.norm()
        if norm == 0:  # v is an exact eigenvector of A - shift*I with eigenvalue 0
            break
        v = shifted / norm
    return _Stage(value, v, residual, change, it, residual < tol)


def power_iteration(matvec: Matvec, dim: int, k: int = 1, max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> EigenEstimate:
    """The k largest eigenvalues of the symmetric operator `matvec` by power iteration with deflation.

    Plain power iteration finds the eigenvalue of largest MAGNITUDE. When that one is negative (a saddle whose
    negative curvature dominates), the stage is rerun on A - lambda*I, which is positive semi-definite on the
    remaining subspace, so the result is always the largest ALGEBRAIC eigenvalue. Each further eigenvalue is found
    on the orthogonal complement of the previous eigenvectors. A stage stops when its pair's relative residual
    ||A v - lambda v|| / |lambda| is below `tol` (then A has an eigenvalue within tol * |lambda| of lambda), or after
    `max_iter` products; slow when the top two eigenvalues are close (prefer `lanczos`). The eigenvalues are
    returned in descending order. `converged` means: every stage reached its residual, and the stages found their
    values in descending order (a later stage finding a larger value shows an earlier one missed it).
    """
    _check_k(k, dim)
    device = torch.device(device)
    gen = _generator(seed, device)
    found = torch.zeros(0, dim, dtype=dtype, device=device)
    stages: list[_Stage] = []
    for _ in range(k):
        stage = _power_stage(matvec, _random_unit(dim, gen, dtype, device), 0.0, found, max_iter, tol)
        if stage.value < 0:  # dominant eigenvalue is negative: every eigenvalue here is >= it, so shift by it
            again = _power_stage(matvec, _random_unit(dim, gen, dtype, device), stage.value, found, max_iter, tol)
            again.iterations += stage.iterations
            stage = again
        stages.append(stage)
        found = torch.cat([found, stage.vector[None]])
    in_order = all(b.value <= a.value + tol * abs(a.value) for a, b in zip(stages, stages[1:]))
    order = sorted(range(k), key=lambda i: -stages[i].value)
    return EigenEstimate(
        eigenvalues=[stages[i].value for i in order],
        residuals=[stages[i].residual for i in order],
        relative_changes=[stages[i].change for i in order],
        iterations=sum(s.iterations for s in stages),
        converged=in_order and all(s.converged for s in stages),
        method="power",
        eigenvectors=found[order],
    )


# -- Lanczos ---------------------------------------------------------------------------------------------------------


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def lanczos(matvec: Matvec, dim: int, k: int = 1, max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> EigenEstimate:
    """The k largest eigenvalues of the symmetric operator `matvec` by Lanczos with full reorthogonalization.

    Stops when every one of the k top Ritz pairs has relative residual |beta_j s_j| / |theta| below `tol` (the
    residual of a Ritz pair is known without another product), or after `max_iter` products. Keeps the Lanczos
    basis: max_iter * d numbers. A single Krylov space holds one eigenvector per distinct eigenvalue, so an exactly
    repeated eigenvalue shows up once until the space is exhausted (beta = 0, which happens for small or low-rank
    operators); then the iteration restarts with a random vector orthogonal to the basis and finds the other
    copies. For large operators, exact multiplicities need a block method (rare for Hessians away from zero).
    """
    _check_k(k, dim)
    device = torch.device(device)
    gen = _generator(seed, device)
    steps = min(max_iter, dim)
    basis = torch.zeros(steps, dim, dtype=dtype, device=device)  # rows q_0 .. q_{j}
    alphas: list[float] = []
    betas: list[float] = []
    q, beta, prev_top = _random_unit(dim, gen, dtype, device), 0.0, None
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        alpha = float(q @ w)
        w = _project_out(w, basis[: j + 1])  # full reorthogonalization (includes the alpha and beta terms)
        beta = float(w.norm())
        alphas.append(alpha)
        theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
        top = torch.arange(len(alphas) - 1, max(len(alphas) - 1 - k, -1), -1)  # indices of the largest, descending
        values = theta[top]
        scale = values.abs().clamp_min(1e-8 * float(theta.abs().max()) + 1e-30)  # |theta|, floored for theta ~ 0
        residuals = (beta * s[-1, top].abs() / scale).tolist()
        changes = [math.inf] * len(top) if prev_top is None or len(prev_top) != len(top) else (
            ((values - prev_top).abs() / scale).tolist())
        prev_top = values
        # beta ~ 0: the Krylov space is invariant. Its Ritz values are exact, but the rest of the space may hold
        # more copies of them (a Krylov space sees each distinct eigenvalue once), so restart rather than stop.
        invariant = beta <= 100 * torch.finfo(dtype).eps * max(float(theta.abs().max()), 1e-30)
        converged = len(alphas) >= k and max(residuals) < tol and (not invariant or j + 1 == dim)
        if converged or j + 1 == steps:
            break
        if invariant:  # restart with a random vector orthogonal to the basis
            w, beta = _project_out(_random_unit(dim, gen, dtype, device), basis[: j + 1]), 0.0
            q = w / w.norm()
        else:
            q = w / beta
        betas.append(beta)
    n = len(alphas)
    vectors = (s[:, top].T.to(dtype) @ basis[:n]) if n else None
    return EigenEstimate(
        eigenvalues=values.tolist(),
        residuals=residuals,
        relative_changes=changes,
        iterations=n,
        converged=converged,
        method="lanczos",
        eigenvectors=vectors,
    )


# -- Hutchinson ------------------------------------------------------------------------------------------------------


def hutchinson_trace(matvec: Matvec, dim: int, max_samples: int = 200, min_samples: int = 10, rtol: float = 1e-2,
                     seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> TraceEstimate:
    """tr(A) ~ mean of v^T A v over Rademacher probes v (unbiased), until 2 * std_error <= rtol * |mean|.

    The standard error is estimated from the probes, so stopping on it is a statistical statement: `converged` means
    the ~95% confidence interval (two standard errors) is within rtol of the estimate, i.e. the relative error
    exceeds rtol about once in 20 runs (less often with more min_samples, whose estimate of the spread is steadier).
    The variance of one probe is 2 * sum_{i != j} A_ij^2: zero for a diagonal A, so the estimate is exact there.
    """
    if min_samples < 2 or max_samples < min_samples:
        raise ValueError(f"need 2 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    device = torch.device(device)
    gen = _generator(seed, device)
    values: list[float] = []
    mean, std_error = 0.0, math.inf
    while len(values) < max_samples:
        v = _rademacher(dim, gen, dtype, device)
        values.append(float(v @ matvec(v)))
        if len(values) >= min_samples:
            samples = torch.tensor(values, dtype=torch.float64)
            mean, std_error = float(samples.mean()), float(samples.std() / math.sqrt(len(values)))
            if 2 * std_error <= rtol * abs(mean):
                break
    return TraceEstimate(mean, std_error, len(values), 2 * std_error <= rtol * abs(mean), rtol)


# -- model-level wrappers --------------------------------------------------------------------------------------------


def hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch, k: int = 1,
                        method: str = "lanczos", max_iter: int = 100, tol: float = 1e-4,
                        seed: int = 0) -> EigenEstimate:
    """The k largest eigenvalues of the Hessian of loss_fn(model(*inputs), *targets) at the current weights.

    `method`: "lanczos" (default; fewer products, several eigenvalues at once) or "power". Cost: one forward and
    backward with a retained graph, then one Hessian-vector product (one backward) per iteration. The whole batch
    is evaluated at once: pass a subset of the data for large data sets.
    """
    solvers = {"lanczos": lanczos, "power": power_iteration}
    if method not in solvers:
        raise ValueError(f"method must be one of {sorted(solvers)}, got {method!r}")
    objective = Objective(model, loss_fn)
    hvp = objective.hvp_operator(inputs, targets)
    return solvers[method](hvp, objective.dim, k=k, max_iter=max_iter, tol=tol, seed=seed, dtype=objective.dtype,
                           device=objective.device)


def hessian_trace(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch, max_samples: int = 200,
                  min_samples: int = 10, rtol: float = 1e-2, seed: int = 0) -> TraceEstimate:
    """Hutchinson estimate of tr(H) for the Hessian of loss_fn(model(*inputs), *targets) at the current weights."""
    objective = Objective(model, loss_fn)
    hvp = objective.hvp_operator(inputs, targets)
    return hutchinson_trace(hvp, objective.dim, max_samples=max_samples, min_samples=min_samples, rtol=rtol,
                            seed=seed, dtype=objective.dtype, device=objective.device)


def _check_dense_size(d: int, n: int, max_params: int, max_entries: int) -> None:
    if d > max_params:
        raise ValueError(f"exact Hessians need d <= max_params={max_params} parameters, the model has d={d}; use "
                         "hessian_eigenvalues / hessian_trace, or raise max_params if memory allows")
    if n * d * d > max_entries:
        raise ValueError(f"{n} dense [{d}, {d}] Hessians are {n * d * d} numbers > max_entries={max_entries}; "
                         "pass fewer examples or raise max_entries if memory allows")


def _dense_hessian(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Reverse-over-reverse: torch.func.hessian's forward-over-reverse loads torch's TorchScript decompositions for
    forward-mode AD, which warn as deprecated on every first use; the two give the same matrix."""
    return torch.func.jacrev(torch.func.jacrev(fn))(w).detach()


def exact_hessian(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch,
                  max_params: int = MAX_HESSIAN_PARAMS) -> torch.Tensor:
    """The dense Hessian [d, d] of loss_fn(model(*inputs), *targets), flattened in named_parameters order.

    Small models only: d <= max_params (default 2048, i.e. 16 MB in fp32), else ValueError.
    """
    objective = Objective(model, loss_fn)
    _check_dense_size(objective.dim, 1, max_params, math.inf)
    w = objective.flat_params()
    return _dense_hessian(lambda flat: objective.loss(flat, inputs, targets), w)


def per_example_hessians(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch,
                         max_params: int = MAX_HESSIAN_PARAMS, max_entries: int = MAX_HESSIAN_ENTRIES) -> torch.Tensor:
    """H_i, the Hessian of example i's loss (loss_fn on a batch of one), for every example: [n, d, d].

    Exact (a dense Hessian per example), so for small models only: d <= max_params (default 2048) and
    n * d^2 <= max_entries (default 2^26 numbers, 256 MB in fp32); beyond either a ValueError says which limit
    was hit. With a mean loss, the Hessian of the batch loss is the mean of the H_i. The model must accept a batch
    of one example (BatchNorm in training mode does not: call model.eval()).
    """
    objective = Objective(model, loss_fn)
    n = batch_size_of(inputs, targets)
    _check_dense_size(objective.dim, n, max_params, max_entries)
    w = objective.flat_params()
    out = torch.empty(n, objective.dim, objective.dim, dtype=objective.dtype, device=objective.device)
    for i in range(n):
        out[i] = _dense_hessian(objective.example_loss_fn(inputs, targets, i), w)
    return out
