"""Win rate and length-controlled win rate on hand-made numbers."""

from __future__ import annotations

import math

import pytest

from compo.evaluate import length_controlled_win_rate, win_rate


def test_win_rate_counts_ties_as_half():
    assert win_rate([2, 1, 3, 0], [1, 1, 4, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate([1.0, 1.05], [1.0, 1.0], tie_eps=0.1) == 0.5
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


def test_lc_win_rate_equals_win_rate_without_length_differences():
    policy, baseline = [1, 1, 1, 0], [0, 0, 0, 1]
    lengths = [10, 10, 10, 10]
    lc = length_controlled_win_rate(policy, baseline, lengths, lengths, ridge=1e-8)
    assert lc == pytest.approx(0.75, abs=1e-4)


def test_lc_win_rate_removes_a_length_driven_advantage():
    # Longer than the baseline 8 times (6 wins), shorter twice (1 win). Two length groups make the
    # logistic fit saturated: a + b c = logit(6/8), a - b c = logit(1/2), so the length-controlled
    # win rate is sigmoid((logit(0.75) + logit(0.5)) / 2) = sigmoid(ln(3) / 2), below the raw 0.7.
    outcome = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0]  # 8 longer answers, then 2 shorter
    d = [20] * 8 + [-20] * 2
    baseline = [0.5] * 10
    assert win_rate(outcome, baseline) == pytest.approx(0.7)
    lc = length_controlled_win_rate(outcome, baseline, d, [0] * 10, ridge=1e-9)
    assert lc == pytest.approx(1 / (1 + math.exp(-math.log(3) / 2)), abs=1e-6)


def test_lc_win_rate_finite_when_separable():
    lc = length_controlled_win_rate([1, 1, 0, 0], [0, 0, 1, 1], [30, 30, 5, 5], [10] * 4)
    assert 0.0 < lc < 1.0 and math.isfinite(lc)


def test_likelihood_displacement_counts_each_pattern_of_change():
    """Four pairs, one per sign pattern of (delta log pi(y+), delta log pi(y-))."""
    import torch

    from compo.evaluate import likelihood_displacement
    from compo.scoring import SequenceScores

    def scores(values):
        sums = torch.tensor(values, dtype=torch.float32)
        return SequenceScores(sums, sums / 4, torch.full_like(sums, 4))

    before = (scores([-10.0, -10.0, -10.0, -10.0]), scores([-10.0, -10.0, -10.0, -10.0]))
    # pair 0: y+ up, y- down (the intended change); 1: both down (displacement); 2: both up;
    # 3: y+ down, y- up (the wrong way)
    after = (scores([-9.0, -11.0, -9.0, -11.0]), scores([-11.0, -12.0, -9.5, -9.0]))
    shift = likelihood_displacement(before, after)
    assert shift["frac_up_down"] == 0.25
    assert shift["frac_both_down"] == 0.25
    assert shift["frac_chosen_down"] == 0.5
    assert shift["delta_logp_chosen"] == 0.0
    assert shift["delta_logp_rejected"] == pytest.approx(-0.375)
