"""Sharpness diagnostics for any nn.Module + loss + data (docs/DESIGN.md section 9).

* hessian: largest Hessian eigenvalues (Lanczos, power iteration) and the Hessian trace (Hutchinson) from
  Hessian-vector products, each with its convergence/error information; exact dense and per-example Hessians for
  small models.
* sharpness: m-sharpness, the worst loss increase in a rho-ball averaged over micro-batches of a given SIZE.
* stability: linear stability of SGD at a minimum (Dexter et al., ICLR 2024): coherence sigma, the exact
  mean-square spectral radius, the coherence divergence condition and the GD bound, with a verdict that says which
  criterion decided.

Nothing here modifies the model: parameters are swapped in with torch.func.functional_call, and BatchNorm running
statistics are not updated.
"""

from .hessian import (
    EigenEstimate,
    TraceEstimate,
    exact_hessian,
    hessian_eigenvalues,
    hessian_trace,
    hutchinson_trace,
    lanczos,
    per_example_hessians,
    power_iteration,
)
from .sharpness import MSharpness, m_sharpness
from .stability import (
    Coherence,
    OperatorTooLarge,
    SpectralRadius,
    StabilityVerdict,
    coherence,
    coherence_condition,
    mean_lambda_max,
    mean_square_spectral_radius,
    sgd_linear_stability,
    stability_verdict,
)

__all__ = [
    "Coherence",
    "EigenEstimate",
    "MSharpness",
    "OperatorTooLarge",
    "SpectralRadius",
    "StabilityVerdict",
    "TraceEstimate",
    "coherence",
    "coherence_condition",
    "exact_hessian",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson_trace",
    "lanczos",
    "m_sharpness",
    "mean_lambda_max",
    "mean_square_spectral_radius",
    "per_example_hessians",
    "power_iteration",
    "sgd_linear_stability",
    "stability_verdict",
]
