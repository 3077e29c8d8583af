"""The Monte-Carlo estimator against its closed-form limit, in a small dimension."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from compo.zo.directions import GaussianSphere
from compo.zo.estimator import MonteCarlo, cosine
from compo.zo.update import clip, normalise
from oracles.base import Verdict

DIM = 12


def _ab(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(DIM, generator=gen), torch.randn(DIM, generator=gen)
    return a, b


def _votes(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Definition 3.1 at r -> 0: perturbed better iff <a, z> > 0 and <b, z> > 0."""
    better = ((z @ a) > 0) & ((z @ b) > 0)
    return torch.where(better, -1.0, 1.0)


def test_closed_form_matches_many_samples():
    a, b = _ab()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(400_000, DIM, generator=gen)
    z = z / z.norm(dim=1, keepdim=True)
    y = _votes(z, a, b)
    angle = math.acos(float(a @ b / (a.norm() * b.norm())))
    assert float((y == -1).float().mean()) == pytest.approx(
        (math.pi - angle) / (2 * math.pi), abs=3e-3
    )
    # E|P z| for z uniform on the sphere, P a rank-2 projection.
    mean_r = math.gamma(1.5) * math.gamma(DIM / 2) / math.gamma((DIM + 1) / 2)
    expected = -(mean_r / math.pi) * (a / a.norm() + b / b.norm())
    observed = (y[:, None] * z).mean(0)
    assert torch.allclose(observed, expected, atol=4e-3)


class _SignOracle:
    """A parameter-level oracle over a flat vector, answering from fixed gradients a and b."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def compare(self, deltas):
        z = torch.stack([deltas.dense(i)[0].flatten() for i in range(len(deltas))])
        return [Verdict(int(v)) for v in _votes(z, self.a, self.b)]


@pytest.mark.parametrize(
    "options", [{}, {"centred": True}, {"antithetic": True}], ids=["plain", "centred", "antithetic"]
)
def test_monte_carlo_converges_to_limit(options):
    a, b = _ab()
    scope = SimpleNamespace(masters=lambda: [torch.zeros(DIM)], shapes=[torch.Size([DIM])])
    estimator = MonteCarlo(GaussianSphere(), num_directions=2000, radius=1e-3, batch=64, **options)
    est = estimator.estimate(_SignOracle(a, b), scope, seed=0, iteration=0)
    limit = -(a / a.norm() + b / b.norm())
    assert cosine(est.vector, [limit]) > 0.97
    angle = math.acos(float(a @ b / (a.norm() * b.norm())))
    assert est.frac == pytest.approx((math.pi - angle) / (2 * math.pi), abs=0.04)
    assert est.m == 2000


def test_clip_keeps_fraction_and_threshold():
    g, _ = normalise([torch.arange(1.0, 101.0)])
    kept, n = clip(g, None, 0.1)
    assert n == 10 and torch.count_nonzero(kept[0][:90]) == 0
    kept, n = clip(g, float(g[0][49]), None)
    assert n == 51
    kept, n = clip(g, float(g[0][94]), 0.1)
    assert n == 6
