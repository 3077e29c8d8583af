"""The likelihood oracle and the fast head evaluation against full forward passes."""

from __future__ import annotations

import pytest
import torch

from compo.interfaces import CompoError, Verdict, aggregate
from compo.scoring import score_pairs
from compo.zo.directions import GaussianSphere, LowRank, Rademacher, SupportRestricted
from compo.zo.estimator import limit_direction
from compo.zo.head import HeadEvaluator
from compo.zo.scope import Scope
from oracles.likelihood import LikelihoodOracle, pair_verdicts

FAMILIES = [GaussianSphere(), Rademacher(), LowRank(rank=2), SupportRestricted(top_k=8)]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls are far slower with two OpenMP threads on a shared, busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _full_forward(model, scope, pairs, pad, dense):
    """Sequence log-probs with theta + dense (a full forward pass), weights restored after."""
    saved = [b.param.detach().clone() for b in scope.blocks]
    with torch.no_grad():
        for block, z in zip(scope.blocks, dense, strict=True):
            block.param.add_(z)
    chosen, rejected = score_pairs(model, pairs, pad)
    with torch.no_grad():
        for block, value in zip(scope.blocks, saved, strict=True):
            block.param.copy_(value)
    return torch.cat([chosen.sum_logps, rejected.sum_logps])


@pytest.mark.parametrize("modules", [(), ("model.layers.1.mlp",)], ids=["head", "head+mlp"])
@pytest.mark.parametrize("sampler", FAMILIES, ids=lambda s: type(s).__name__)
def test_fast_deltas_match_full_forward(tiny, easy_encoded, sampler, modules):
    model, tokenizer = tiny
    pairs, pad = easy_encoded[:2], tokenizer.pad_token_id
    scope = Scope(model, modules)
    head = HeadEvaluator()
    base = head.begin(model, scope, pairs, pad)
    assert torch.allclose(base, _full_forward(model, scope, pairs, pad, [0] * len(scope.blocks)))
    batch = sampler.sample(0, 0, [0, 1, 2], scope.shapes, head.support(8)).scaled(0.3)
    fast = head.deltas(batch)
    for i in range(len(batch)):
        full = _full_forward(model, scope, pairs, pad, batch.dense(i)) - base
        assert torch.allclose(fast[i], full, atol=1e-4), (fast[i], full)


def test_gradients_match_directional_derivative(tiny, easy_encoded):
    model, tokenizer = tiny
    scope = Scope(model)
    head = HeadEvaluator()
    head.begin(model, scope, easy_encoded[:1], tokenizer.pad_token_id)
    grad_chosen, grad_rejected = head.gradients()
    batch = GaussianSphere().sample(0, 0, [0], scope.shapes)
    r = 1e-3
    delta = head.deltas(batch.scaled(r))[0] / r
    z = batch.dense(0)[0]
    assert delta[0].item() == pytest.approx((grad_chosen[0] * z).sum().item(), rel=1e-2)
    assert delta[1].item() == pytest.approx((grad_rejected[0] * z).sum().item(), rel=1e-2)
    limit = limit_direction(head)
    assert 0.0 < limit.frac < 0.5


def test_verdicts_and_aggregation():
    deltas = torch.tensor([[1.0, -1.0, -1.0, -1.0], [0.0, 1.0, 0.0, -1.0]])
    assert pair_verdicts(deltas) == [
        [Verdict.PERTURBED_BETTER, Verdict.CURRENT_BETTER],
        [Verdict.TIE, Verdict.PERTURBED_BETTER],
    ]
    better, worse, tie = Verdict.PERTURBED_BETTER, Verdict.CURRENT_BETTER, Verdict.TIE
    assert aggregate([better, worse, worse], "any") == better
    assert aggregate([better, worse, worse], "majority") == worse
    assert aggregate([better, tie], "all") == better
    assert aggregate([better, worse], "all") == worse
    assert aggregate([tie, tie], "any") == tie
    assert aggregate([better, worse], "majority") == tie  # a split vote is no evidence
    with pytest.raises(CompoError):
        aggregate([better], "most")


def test_oracle_protocol_and_compare(tiny, easy_encoded):
    model, tokenizer = tiny
    oracle = LikelihoodOracle(aggregation="any")
    scope, head = Scope(model), HeadEvaluator()
    base = head.begin(model, scope, easy_encoded[:2], tokenizer.pad_token_id)
    oracle.begin(model, scope, easy_encoded[:2], tokenizer.pad_token_id, iteration=0, head=head)
    chosen, rejected = score_pairs(model, easy_encoded[:2], tokenizer.pad_token_id)
    assert torch.allclose(base, torch.cat([chosen.sum_logps, rejected.sum_logps]))
    batch = GaussianSphere().sample(0, 0, list(range(8)), scope.shapes).scaled(5e-4)
    verdicts = oracle.compare(batch)
    assert len(verdicts) == 8
    assert set(verdicts) <= {Verdict.PERTURBED_BETTER, Verdict.CURRENT_BETTER}
    expected = [aggregate(v, "any") for v in pair_verdicts(oracle.last_deltas)]
    assert verdicts == expected


@pytest.mark.slow
def test_fast_deltas_match_full_forward_on_smollm2():
    from compo.encoding import encode_pairs
    from compo.models import EmbeddedSmolLM2
    from compo.types import PreferencePair

    model, tokenizer = EmbeddedSmolLM2().load()
    pair = PreferencePair("p", "Name three primary colors.", "Red, blue and yellow.", "Colors.")
    pairs, _ = encode_pairs([pair], tokenizer)
    scope, head = Scope(model), HeadEvaluator()
    base = head.begin(model, scope, pairs, tokenizer.pad_token_id)
    for sampler in (GaussianSphere(), LowRank(rank=1)):
        batch = sampler.sample(0, 0, [0], scope.shapes).scaled(0.05)
        full = _full_forward(model, scope, pairs, tokenizer.pad_token_id, batch.dense(0)) - base
        assert torch.allclose(head.deltas(batch)[0], full, atol=1e-4)


def test_an_aggregation_outside_its_options_is_one_line_in_the_settings_format():
    expected = "oracle.aggregation: 'bogus' is not one of ['any', 'majority', 'all']"
    with pytest.raises(CompoError) as info:
        LikelihoodOracle(aggregation="bogus")
    assert str(info.value) == expected
    with pytest.raises(CompoError) as info:
        aggregate([Verdict.PERTURBED_BETTER], "bogus")
    assert str(info.value) == expected
