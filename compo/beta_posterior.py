"""The Beta posterior of a preference: how sure the evidence for it makes us.

With w the (weighted) wins of one side and l those of the other, and a Beta(a, a) prior on the
probability theta that the side wins::

    confidence = P(theta > 1/2 | w, l),  theta ~ Beta(a + w, a + l)
               = 1 - I_{1/2}(a + w, a + l)

(:func:`beta_confidence`). One unopposed win gives 0.75 under a = 1, three give 0.9375, a 3-to-1
split 0.8125. :mod:`compo.clicks` gives each pair (or unpaired row) it derives from a click log this
confidence. I_x(a, b) is evaluated by Lentz's continued fraction (:func:`regularized_beta`):
compo does not depend on scipy.
"""

from __future__ import annotations

import math

# Beyond this the prior swamps any click log (every confidence rounds to 0.5) and the incomplete
# beta function loses accuracy; at 1e6 it still matches scipy to 1e-8.
MAX_PRIOR = 1e6


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for the incomplete beta function (Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 3e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the Beta(a, b) distribution function at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_confidence(wins: float, losses: float, prior: float = 1.0) -> float:
    """P(theta > 1/2) for theta ~ Beta(prior + wins, prior + losses)."""
    # Written so that NaN fails too: it would come out as a null confidence.
    if not (0 < prior <= MAX_PRIOR and 0 <= wins < math.inf and 0 <= losses < math.inf):
        raise ValueError(
            f"need prior in (0, {MAX_PRIOR:g}] and finite non-negative wins and losses, "
            f"got prior={prior}, wins={wins}, losses={losses}"
        )
    return 1.0 - regularized_beta(prior + wins, prior + losses, 0.5)
