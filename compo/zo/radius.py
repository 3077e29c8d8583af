"""The perturbation radius r: two conventions, and a search for output-level oracles.

Two conventions for a number r:

* ``total`` (the paper's Algorithm 1-2): z is on the unit sphere, so ||r z|| = r;
* ``per_entry`` (the authors' ``compute_gradients.py``): each entry of z is N(0, 1) scaled by r,
  so ||r z|| ~ r sqrt(d) with d the entries a direction spans: r = 5e-4 is a total norm of ~2.66
  over SmolLM2-135M's output layer (28.3M entries) and ~5.7 over Mistral-7B's.

The likelihood oracle reads log-probabilities exactly, so any small radius works. An output-level
judge only sees generated text, and at r = 5e-4 (total) not one greedy response of SmolLM2
changes: every query is a tie and nothing is learnt. ``radius=auto`` therefore searches, before
the first iteration and every ``every`` iterations, the radius at which a target share of the
perturbed responses differ from the current ones, on that iteration's prompts, with ``probes``
directions of their own (drawn for iteration ``-(t + 1)``, so they never coincide with the
iteration's m directions). The search brackets the target by factors of 4, then bisects in log
space; it asks the oracle's ``differ`` (generation only, no judge call).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from compo import settings

log = logging.getLogger(__name__)

RADIUS_SCALES = ("total", "per_entry")
# Where the first search starts (total norm) and how far it may go.
AUTO_START, AUTO_MIN, AUTO_MAX = 1.0, 1e-6, 1e4
# What radius=auto means for oracles that read parameters, not text: the paper's r.
PARAMETER_ORACLE_RADIUS = 5e-4


@dataclass
class SearchResult:
    """The chosen total radius, its measured share of differing responses, every probe tried."""

    radius: float
    share: float
    tried: list[tuple[float, float]] = field(default_factory=list)


class RadiusSearch:
    """Finds the total radius at which ``target`` of the perturbed responses differ.

    Args:
        target: Target share in (0, 1) of perturbed responses that differ from the current ones.
        probes: Probe directions per evaluation of the share.
        bisections: Log-space bisection steps after bracketing.
        tolerance: Stop early when the share is within this of the target.
    """

    def __init__(
        self, target: float = 0.5, probes: int = 8, bisections: int = 3, tolerance: float = 0.1
    ) -> None:
        settings.number("optimizer.target_differ", target, gt=0, lt=1)
        settings.number("optimizer.radius_probes", probes, integer=True, ge=1)
        self.target, self.probes = target, probes
        self.bisections, self.tolerance = bisections, tolerance

    def search(self, share_at: Callable[[float], float], start: float) -> SearchResult:
        """Brackets and bisects ``share_at(r)`` (increasing in r, noisily) around the target."""
        tried: list[tuple[float, float]] = []

        def measure(r: float) -> float:
            s = share_at(r)
            tried.append((r, s))
            log.info("radius search: r = %.4g -> %.0f%% of responses differ", r, 100 * s)
            return s

        r = min(max(start, AUTO_MIN), AUTO_MAX)
        s = measure(r)
        lo = hi = None
        if s >= self.target:
            hi = r
            while r > AUTO_MIN and abs(s - self.target) > self.tolerance:
                r /= 4
                s = measure(r)
                if s < self.target:
                    lo = r
                    break
                hi = r
        else:
            lo = r
            while r < AUTO_MAX:
                r *= 4
                s = measure(r)
                if s >= self.target:
                    hi = r
                    break
                lo = r
        if lo is not None and hi is not None:
            for _ in range(self.bisections):
                if min(abs(x - self.target) for _, x in tried) <= self.tolerance:
                    break
                mid = math.sqrt(lo * hi)
                if measure(mid) >= self.target:
                    hi = mid
                else:
                    lo = mid
        # Closest to the target; among equals, one that reaches it, then the smallest radius.
        best_r, best_s = min(
            tried, key=lambda t: (abs(t[1] - self.target), t[1] < self.target, t[0])
        )
        return SearchResult(best_r, best_s, tried)
