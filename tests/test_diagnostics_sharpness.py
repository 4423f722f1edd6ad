"""m-sharpness against closed forms (linear losses) and a brute-force search over the sphere (a 2-D quadratic)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sam_fused import diagnostics

F64 = torch.float64


def linear_model(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d, 1, bias=False).double()


def mean_output(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Example i's loss is w . a_i (its input a_i): linear in w."""
    return out.mean()


@pytest.mark.parametrize("micro_batch_size", [1, 3, 4, 12])
def test_linear_losses_have_closed_form_m_sharpness(micro_batch_size: int) -> None:
    """L_B(w) = w . mean_{i in B} a_i, so max over ||e|| <= rho of L_B(w + e) - L_B(w) = rho ||mean_{i in B} a_i||,
    reached by the first (normalized) step."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(12, 5, generator=gen, dtype=F64)
    rho = 0.3
    expected = rho * a.reshape(12 // micro_batch_size, micro_batch_size, 5).mean(1).norm(dim=1)
    got = diagnostics.m_sharpness(linear_model(5), mean_output, a, torch.zeros(12), rho=rho,
                                  micro_batch_size=micro_batch_size, ascent_steps=1)
    assert got.num_micro_batches == 12 // micro_batch_size and got.micro_batch_size == micro_batch_size
    torch.testing.assert_close(got.per_micro_batch, expected, rtol=1e-12, atol=1e-14)
    assert got.value == pytest.approx(float(expected.mean()), rel=1e-12)


def test_smaller_micro_batches_are_sharper_for_linear_losses() -> None:
    """The mean of norms of sub-means exceeds the norm of the mean (triangle inequality), strictly for generic data."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(16, 4, generator=gen, dtype=F64)
    values = [diagnostics.m_sharpness(linear_model(4), mean_output, a, torch.zeros(16), rho=0.1, micro_batch_size=m,
                                      ascent_steps=1).value for m in (1, 4, 16)]
    assert values[0] > values[1] > values[2]


class ShiftedQuadratic(nn.Module):
    """forward() returns 0.5 (w - c)^T A (w - c)."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("c", c)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.w - self.c
        return 0.5 * z @ self.a @ z + 0 * x.sum()


def test_ascent_approaches_the_true_maximum_from_below() -> None:
    """A convex quadratic attains its maximum over the ball on the sphere: search 200k angles for the reference."""
    a = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
    c = torch.zeros(2, dtype=F64)
    w = torch.tensor([-0.02, 0.05], dtype=F64)  # near the centre, gradient off the top eigenvector
    rho = 0.4
    model = ShiftedQuadratic(a, c, w)
    angles = torch.linspace(0, 2 * math.pi, 200_001, dtype=F64)
    e = rho * torch.stack([angles.cos(), angles.sin()], 1)
    z = w - c
    true_max = float((0.5 * ((z + e) @ a * (z + e)).sum(1) - 0.5 * z @ a @ z).max())
    dummy = torch.zeros(1, 1, dtype=F64)
    identity = lambda out, y: out  # noqa: E731
    estimates = [diagnostics.m_sharpness(model, identity, dummy, dummy, rho=rho, micro_batch_size=1,
                                         ascent_steps=steps).value for steps in (1, 2, 5, 20)]
    assert all(x <= true_max + 1e-9 for x in estimates)  # a lower bound: every point tried is in the ball
    assert estimates == sorted(estimates)  # more steps never lower the estimate
    assert estimates[-1] == pytest.approx(true_max, rel=1e-4)
    assert estimates[0] < true_max * 0.5  # one step is SAM's first-order guess, far short here


def test_invalid_micro_batch_size() -> None:
    x = torch.randn(10, 3, dtype=F64)
    for bad in (0, 3, 11):
        with pytest.raises(ValueError, match="micro_batch_size"):
            diagnostics.m_sharpness(linear_model(3), mean_output, x, torch.zeros(10), rho=0.1, micro_batch_size=bad)
