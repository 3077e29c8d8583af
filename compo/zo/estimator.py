"""Direction estimators: Monte-Carlo over oracle votes, and its infinite-sample limit.

Monte-Carlo (Algorithm 2, step 2-3): sum_i y_i z_i over m directions, accumulated in fp32 while
each batch of directions is alive (they are never stored; y_i is known as soon as the oracle has
answered). Opt-in variance reduction: centred votes (y_i - mean y; the mean is only known at the
end, so sum_i z_i is accumulated alongside) and antithetic pairs (z, -z).

The limit (likelihood oracle, r -> 0, one pair): with a = grad log pi(y+|x) and b = -grad log
pi(y-|x), y = -1 iff <a, z> > 0 and <b, z> > 0, so

    E[y z] = -(E|P z| / pi) (a/||a|| + b/||b||),   P(y = -1) = (pi - angle(a, b)) / (2 pi),

where P projects on span(a, b). :class:`Expected` uses that direction directly (two backward
passes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from compo import distributed, settings
from compo.errors import CompoError
from compo.zo.directions import DirectionSampler, GaussianSphere
from compo.zo.head import HeadEvaluator
from compo.zo.scope import Scope


@dataclass
class Estimate:
    """An iteration's raw direction (not normalised) and vote counts."""

    vector: list[Tensor]
    n_better: int
    n_worse: int
    n_tie: int
    m: int
    seconds: float
    implied_frac: float | None = None

    @property
    def frac(self) -> float:
        """|{i: y_i = -1}| / m, or the predicted fraction for the expected estimator."""
        if self.implied_frac is not None:
            return self.implied_frac
        return self.n_better / self.m if self.m else 0.0


@dataclass
class Limit:
    """The infinite-sample direction -(a/||a|| + b/||b||) (unit norm) and what it predicts."""

    direction: list[Tensor]
    angle: float
    frac: float
    norm_chosen: float
    norm_rejected: float


def _flat64(t: Tensor) -> Tensor:
    # Products of float32 numbers are exact in float64, so only the sums round. One conversion
    # and one BLAS dot per block: an output layer is ~10^7-10^8 entries, and a float64 product
    # tensor per reduction (``(a * b).sum()``) made these reductions most of an iteration's time.
    return t.detach().reshape(-1).double()


def norm(x: Sequence[Tensor]) -> float:
    """||x|| over a list of blocks, in float64."""
    return math.sqrt(sum(float(f @ f) for f in map(_flat64, x)))


def gram(x: Sequence[Tensor], y: Sequence[Tensor]) -> tuple[float, float, float]:
    """(<x, x>, <y, y>, <x, y>) over lists of blocks in float64, each block converted once."""
    xx = yy = xy = 0.0
    for a, b in zip(x, y, strict=True):
        a, b = _flat64(a), _flat64(b)
        xx, yy, xy = xx + float(a @ a), yy + float(b @ b), xy + float(a @ b)
    return xx, yy, xy


def cosine(x: Sequence[Tensor], y: Sequence[Tensor]) -> float:
    xx, yy, xy = gram(x, y)
    return xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else 0.0


def limit_direction(head: HeadEvaluator) -> Limit:
    """The limit E[y z] direction for the pairs cached in ``head`` (summed over the pairs)."""
    grad_chosen, grad_rejected = head.gradients()
    a, b = grad_chosen, [-g for g in grad_rejected]
    aa, bb, ab = gram(a, b)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na == 0 or nb == 0:
        zero = [torch.zeros_like(t) for t in a]
        return Limit(zero, float("nan"), float("nan"), na, nb)
    angle = math.acos(max(-1.0, min(1.0, ab / (na * nb))))
    d = [-(x / na + y / nb) for x, y in zip(a, b, strict=True)]
    nd = norm(d)
    d = [t / nd for t in d] if nd > 0 else d
    return Limit(d, angle, (math.pi - angle) / (2 * math.pi), na, nb)


TIE_RULES = ("ignore", "current")


class MonteCarlo:
    """sum_i y_i z_i over ``num_directions`` oracle queries (the paper's estimator).

    Ties and abstentions (y_i = 0) carry no vote by default (``ties=ignore``): they add nothing
    to the direction, frac = n_better / n_decisive counts decisive verdicts only, and centring
    uses the decisive votes' mean. ``ties=current`` is the authors' code's rule (a tie counts as
    +1, "current better", in the sum and in m), kept for faithful reproduction.

    Args:
        sampler: Direction family (default Gaussian on the sphere).
        num_directions: m, perturbations per iteration.
        radius: r, the perturbation's total norm (the call may pass another).
        batch: Directions alive at once (memory: batch x the perturbed parameters in fp32).
        centred: Use y_i - mean(y) as votes (decisive votes only).
        antithetic: Query z and -z for each drawn z (m counts both).
        ties: ``ignore`` or ``current`` (see above).
    """

    def __init__(
        self,
        sampler: DirectionSampler | None = None,
        num_directions: int = 1600,
        radius: float = 5e-4,
        batch: int = 4,
        centred: bool = False,
        antithetic: bool = False,
        ties: str = "ignore",
    ) -> None:
        settings.number("optimizer.num_directions", num_directions, integer=True, ge=1)
        settings.number("optimizer.perturbation_batch", batch, integer=True, ge=1)
        settings.number("optimizer.radius", radius, gt=0)
        if antithetic and num_directions % 2:
            raise settings.SettingError(
                f"optimizer.num_directions must be even with optimizer.antithetic=true, "
                f"got {num_directions}"
            )
        settings.choice("optimizer.ties", ties, TIE_RULES)
        self.sampler = sampler or GaussianSphere()
        self.m, self.radius, self.batch = num_directions, radius, batch
        self.centred, self.antithetic, self.ties = centred, antithetic, ties

    def estimate(
        self,
        oracle,
        scope: Scope,
        seed: int,
        iteration: int,
        support: Tensor | None = None,
        progress: bool = False,
        radius: float | None = None,
    ) -> Estimate:
        started = time.perf_counter()
        radius = self.radius if radius is None else radius
        sum_yz = [torch.zeros_like(m, dtype=torch.float32) for m in scope.masters()]
        sum_z = [torch.zeros_like(t) for t in sum_yz] if self.centred else None
        draws = self.m // 2 if self.antithetic else self.m
        per_batch = max(1, self.batch // 2) if self.antithetic else self.batch
        # Under torchrun each rank draws a contiguous share of the indices; direction i is the
        # same tensor on any rank (seeded by (seed, iteration, i)), so the reduced sums equal a
        # single process's up to the order of fp32 additions, and the vote counts exactly.
        share = distributed.partition(draws, distributed.rank(), distributed.world_size())
        counts = torch.zeros(4, dtype=torch.float64)  # better, worse, tie, sum of decisive votes
        total = len(share) * (2 if self.antithetic else 1)
        # A context manager: an oracle failing mid-iteration must not leave a half-drawn bar
        # behind, printed after the run's one-line error.
        with tqdm(
            total=total, desc=f"compo it {iteration}", disable=not progress, leave=False
        ) as bar:
            for start in range(share.start, share.stop, per_batch):
                indices = list(range(start, min(share.stop, start + per_batch)))
                dirs = self.sampler.sample(seed, iteration, indices, scope.shapes, support)
                if self.antithetic:
                    dirs = dirs.antithetic()
                y = torch.tensor([float(v) for v in oracle.compare(dirs.scaled(radius))])
                tie = y == 0
                decided = torch.stack([(y < 0).sum(), (y > 0).sum(), tie.sum()])
                counted = ~tie  # the votes that enter the direction
                if self.ties == "current":
                    y, counted = torch.where(tie, torch.ones_like(y), y), torch.ones_like(tie)
                counts += torch.cat([decided.double(), y.sum().double()[None]])
                dirs.accumulate(sum_yz, y.to(sum_yz[0].device))
                if sum_z is not None:
                    dirs.accumulate(sum_z, counted.float().to(sum_yz[0].device))
                bar.update(len(y))
                del dirs  # free this batch before the next one is drawn (peak memory)
        n_better, n_worse, n_tie, vote_sum = distributed.all_reduce_sum(counts).tolist()
        for acc in [*sum_yz, *(sum_z or [])]:
            distributed.all_reduce_sum(acc)
        n_better, n_worse, n_tie = int(n_better), int(n_worse), int(n_tie)
        m = n_better + n_worse + n_tie
        n_counted = m if self.ties == "current" else n_better + n_worse
        if sum_z is not None and n_counted:
            mean_y = vote_sum / n_counted
            for acc, z in zip(sum_yz, sum_z, strict=True):
                acc.sub_(z, alpha=mean_y)
        return Estimate(
            sum_yz,
            n_better=n_better,
            n_worse=n_worse,
            n_tie=n_tie,
            m=m,
            seconds=time.perf_counter() - started,
            implied_frac=n_better / n_counted if n_counted else 0.0,
        )


class Expected:
    """The infinite-sample direction an oracle computes exactly (no oracle queries).

    ``limit`` is what :meth:`compo.interfaces.ComparisonOracle.limit` returns: a unit
    ``direction`` and the predicted ``frac`` ((pi - angle) / (2 pi) for the likelihood oracle,
    1/2 for the sample-scored one).
    """

    m = 0

    def estimate(self, oracle, limit=None) -> Estimate:
        """The oracle's r -> 0 limit direction (no queries).

        Args:
            oracle: The comparison oracle.
            limit: ``oracle.limit()`` when the caller holds it already (it may cost a backward
                pass); asked of the oracle when None.

        Raises:
            CompoError: The oracle has no exact limit (an output-level judge, say).
        """
        limit = oracle.limit() if limit is None else limit
        if limit is None:
            raise CompoError(
                f"optimizer.estimator=expected: oracle {type(oracle).__name__} has no exact "
                "r -> 0 limit; use estimator=monte_carlo"
            )
        return self.estimate_from_limit(limit)

    def estimate_from_limit(self, limit) -> Estimate:
        frac = 0.0 if math.isnan(limit.frac) else limit.frac
        return Estimate(limit.direction, 0, 0, 0, 0, 0.0, implied_frac=frac)
