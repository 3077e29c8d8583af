"""Direction samplers: regenerated from (seed, iteration, index), unit norm, never global RNG."""

from __future__ import annotations

import pytest
import torch

from compo.zo.directions import (
    DirectionBatch,
    GaussianSphere,
    LowRank,
    Rademacher,
    SupportRestricted,
)

SHAPES = [torch.Size([30, 8]), torch.Size([5, 8])]
SUPPORT = torch.tensor([1, 4, 7, 20])
FAMILIES = [GaussianSphere(), Rademacher(), LowRank(rank=2), SupportRestricted(top_k=2)]


def _dense(batch: DirectionBatch, i: int) -> torch.Tensor:
    return torch.cat([t.flatten() for t in batch.dense(i)])


@pytest.mark.parametrize("sampler", FAMILIES, ids=lambda s: type(s).__name__)
def test_unit_norm_and_regenerated_independently_of_batch(sampler):
    state = torch.random.get_rng_state()
    together = sampler.sample(7, 3, [0, 1, 2], SHAPES, SUPPORT)
    alone = sampler.sample(7, 3, [2], SHAPES, SUPPORT)
    assert torch.equal(torch.random.get_rng_state(), state), "global RNG was used"
    for i in range(3):
        assert _dense(together, i).norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(_dense(together, 2), _dense(alone, 0))
    assert not torch.equal(_dense(together, 0), _dense(together, 1))
    other_iteration = sampler.sample(7, 4, [2], SHAPES, SUPPORT)
    other_seed = sampler.sample(8, 3, [2], SHAPES, SUPPORT)
    assert not torch.equal(_dense(alone, 0), _dense(other_iteration, 0))
    assert not torch.equal(_dense(alone, 0), _dense(other_seed, 0))


@pytest.mark.parametrize("sampler", FAMILIES, ids=lambda s: type(s).__name__)
def test_products_and_accumulation_match_dense(sampler):
    batch = sampler.sample(0, 0, [0, 1, 2], SHAPES, SUPPORT).scaled(0.5)
    hidden = torch.randn(6, 8)
    for i in range(3):
        z = batch.dense(i)[0]
        product = batch.pieces[0].hidden_product(hidden, i) * batch.coef[i]
        if hasattr(batch.pieces[0], "rows"):
            assert torch.allclose(product, (hidden @ z.T)[:, SUPPORT], atol=1e-6)
            outside = torch.ones(30, dtype=torch.bool)
            outside[SUPPORT] = False
            assert torch.count_nonzero(z[outside]) == 0
        else:
            assert torch.allclose(product, hidden @ z.T, atol=1e-6)
    weights = torch.tensor([1.0, -1.0, 0.0])
    buffers = [torch.zeros(s) for s in SHAPES]
    batch.accumulate(buffers, weights)
    expected = [batch.dense(0)[b] - batch.dense(1)[b] for b in range(2)]
    for got, want in zip(buffers, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_antithetic_pairs_are_negations():
    batch = GaussianSphere().sample(0, 0, [0, 1], SHAPES).antithetic()
    assert len(batch) == 4
    assert torch.equal(_dense(batch, 0), -_dense(batch, 2))
    assert torch.equal(_dense(batch, 1), -_dense(batch, 3))
