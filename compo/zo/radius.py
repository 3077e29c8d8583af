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

:class:`RadiusSchedule` gives each iteration of a run its total radius under either convention
and runs the search when it is due; :class:`compo.zo.optimizer.ComPO` builds one per run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from compo import settings
from compo.interfaces import ComparisonOracle
from compo.zo.directions import DirectionSampler
from compo.zo.scope import Scope

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


def spanned_entries(scope: Scope, support: Tensor | None) -> int:
    """Entries one direction spans: d of the ``per_entry`` convention (||r z|| ~ r sqrt(d)).

    A support-restricted direction spans only the ``support`` rows of the output layer (the
    first block), and every entry of the other blocks.
    """
    if support is None:
        return scope.numel
    rest = sum(b.master.numel() for b in scope.blocks[1:])
    return int(support.numel()) * scope.shapes[0][1] + rest


class RadiusSchedule:
    """The total radius of each iteration of one run.

    A number r serves every iteration: as the total norm, or under ``per_entry`` as
    r sqrt(d) for the d entries that iteration's directions span. Under ``radius=auto`` the
    radius is searched at the first iteration and every ``every`` iterations after, and kept in
    between; an oracle that reads log-probabilities, not text, gets the paper's r for the run.

    Args:
        radius: r, or None for ``radius=auto``.
        scale: One of :data:`RADIUS_SCALES`.
        every: ``radius=auto``: search again every this many iterations.
        search: ``radius=auto``: the search (its target share and probe count).
        sampler: Draws the probe directions (the run's direction sampler).
        seed: The run's seed; iteration t's probes are drawn for iteration ``-(t + 1)``.
        batch: Probe directions alive at once (the estimator's perturbation batch).
        in_force: The radius in force at a resumed run's commit (None: none yet).
    """

    def __init__(
        self,
        radius: float | None,
        scale: str,
        every: int,
        search: RadiusSearch,
        sampler: DirectionSampler,
        seed: int,
        batch: int,
        in_force: float | None = None,
    ) -> None:
        self.radius, self.scale, self.every, self.search = radius, scale, every, search
        self.sampler, self.seed, self.batch = sampler, seed, batch
        # Under radius=auto: the radius searched last (what a commit stores), and whether it is
        # the parameter oracles' r, which is never searched again.
        self.in_force, self.fixed = in_force, False

    def at(
        self, t: int, oracle: ComparisonOracle, scope: Scope, support: Tensor | None
    ) -> tuple[float, dict[str, Any]]:
        """The total radius of iteration t and its trace fields (the search's, when it ran)."""
        if self.radius is not None:
            scale = math.sqrt(spanned_entries(scope, support)) if self.scale == "per_entry" else 1
            return self.radius * scale, {}
        if self.in_force is not None and (self.fixed or t % self.every):
            return self.in_force, {}
        probes = list(range(self.search.probes))
        measured: dict[float, float] = {}  # the search may ask again for the starting radius

        def share_at(r: float) -> float:
            if r in measured:
                return measured[r]
            shares: list[float] = []
            for lo in range(0, len(probes), self.batch):
                dirs = self.sampler.sample(
                    self.seed, -(t + 1), probes[lo : lo + self.batch], scope.shapes, support
                )
                got = oracle.differ(dirs.scaled(r))
                if got is None:
                    return float("nan")
                shares.extend(got)
            measured[r] = sum(shares) / len(shares)
            return measured[r]

        start = self.in_force or AUTO_START
        if oracle.kind != "output" or math.isnan(share_at(start)):
            # The oracle reads log-probabilities (exactly, at any radius): the paper's r serves.
            self.in_force, self.fixed = PARAMETER_ORACLE_RADIUS, True
            return self.in_force, {"radius_search": "not needed: the oracle reads log-probs"}
        found = self.search.search(share_at, start)
        self.in_force = found.radius
        log.info(
            "compo: radius %.4g (%.0f%% of responses differ, target %.0f%%)",
            found.radius,
            100 * found.share,
            100 * self.search.target,
        )
        return found.radius, {
            "radius_differ": found.share,
            "radius_tried": [[r, s] for r, s in found.tried],
        }
