"""Intervals for the benchmark table: a two-way bootstrap over seeds and held-out prompts.

An arm's number mixes two sources of chance: which click-noise draw and training seed it got (the
seed) and which prompts happen to be held out. Three seeds' mean +- std captures only the first,
and one prompt of 24 moved a win rate by 0.042 in the first benchmark. So every cell is a mean over
(seed, prompt, answer) cells, and its interval resamples seeds and prompts with replacement,
independently (the two-way random-effects bootstrap; prompts are shared across seeds, so a resampled
prompt is taken from every resampled seed). Answers of one prompt stay together.

Paired contrasts (an arm minus its baseline arm) are differences taken cell by cell on the same
seed (the same click-noise draw), prompt and answer index (the same sampling stream, see
``heldout.py``), then bootstrapped the same way: the shared variance cancels before resampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        """True when the whole interval is on one side of 0."""
        return self.low > 0 or self.high < 0

    def format(self, signed: bool = False, digits: int = 3) -> str:
        """``0.512 [0.471, 0.553]`` (``+`` signs for contrasts; ``n/a`` if undefined)."""
        if not np.isfinite(self.value):
            return "n/a"
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.value)} [{f.format(self.low)}, {f.format(self.high)}]"


def two_way_bootstrap(
    cells: dict[str, np.ndarray],
    statistic: Callable[[dict[str, np.ndarray]], float],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """``statistic`` of (seed, prompt, ...) arrays and its two-way bootstrap interval.

    Args:
        cells: Arrays that share their first two axes (seeds, prompts); later axes (answers) are
            kept together.
        statistic: Maps arrays of that layout to a number.
        resamples: Bootstrap resamples.
        seed: Seeds the resampling (a local generator; the same call gives the same interval).
        level: Coverage of the percentile interval.

    Returns:
        The statistic on the data, with the interval's ends (nan when undefined).
    """
    shapes = {v.shape[:2] for v in cells.values()}
    if len(shapes) != 1:
        raise ValueError(f"cells disagree on (seeds, prompts): {sorted(shapes)}")
    (n_seeds, n_prompts) = shapes.pop()
    value = float(statistic(cells))
    if n_seeds == 0 or n_prompts == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        s = rng.integers(0, n_seeds, n_seeds)
        p = rng.integers(0, n_prompts, n_prompts)
        draws.append(statistic({k: v[s][:, p] for k, v in cells.items()}))
    return _percentile_interval(value, draws, level)


def cluster_bootstrap(
    groups: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """``statistic`` of row indices and its percentile interval resampling whole groups.

    For rows that are not independent (pairs on one prompt, pairs of one seed's file): a resample
    draws groups with replacement and keeps each drawn group's rows together.

    Args:
        groups: One label per row (any hashable values).
        statistic: Maps an array of row indices (with repeats) to a number.
        resamples: Bootstrap resamples.
        seed: Seeds the resampling (a local generator).
        level: Coverage of the percentile interval.

    Returns:
        The statistic on every row, with the interval's ends (nan when no resample is finite).
    """
    groups = np.asarray(groups)
    value = float(statistic(np.arange(len(groups))))
    rng = np.random.default_rng(seed)
    names, members = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(members == g) for g in range(len(names))]
    draws = []
    for _ in range(resamples):
        picked = rng.integers(0, len(names), len(names))
        draws.append(statistic(np.concatenate([rows_of[g] for g in picked])))
    return _percentile_interval(value, draws, level)


def _percentile_interval(value: float, draws, level: float) -> Interval:
    """``value`` with the percentile interval of the finite ``draws`` (nan ends if none is)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return Interval(value, float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    return Interval(
        value, float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))
    )


def mean_of(key: str) -> Callable[[dict[str, np.ndarray]], float]:
    """The statistic "mean of ``cells[key]`` over every cell"."""
    return lambda cells: float(np.mean(cells[key]))
