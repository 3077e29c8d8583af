"""The likelihood oracle (ComPO, Definition 3.1): the model's own log-probabilities decide.

theta + delta is better than theta on a pair iff log pi(y+|x) rises and log pi(y-|x) falls. With
several pairs per query the per-pair verdicts are aggregated (``any`` as in the authors' code,
``majority`` or ``all``). A pair whose two log-probs do not move at all abstains (TIE).

Exact and fast: the hidden states feeding the output layer are computed once per iteration and
each perturbation costs the output-layer product and a log-softmax at response positions only
(:class:`compo.zo.head.HeadEvaluator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from compo.zo.directions import DirectionBatch
from compo.zo.head import HeadEvaluator
from compo.zo.scope import Scope
from oracles.base import Verdict, aggregate

AGGREGATIONS = ("any", "majority", "all")


def pair_verdicts(deltas: Tensor) -> list[list[Verdict]]:
    """Per-pair verdicts from log-prob changes.

    Args:
        deltas: (k, 2n) changes of log pi(y+) for the n pairs, then of log pi(y-).

    Returns:
        k lists of n verdicts.
    """
    n = deltas.shape[1] // 2
    up, down = deltas[:, :n], deltas[:, n:]
    better = (up > 0) & (down < 0)
    still = (up == 0) & (down == 0)
    out = torch.where(better, Verdict.PERTURBED_BETTER, Verdict.CURRENT_BETTER)
    out = torch.where(still, Verdict.TIE, out)
    return [[Verdict(int(v)) for v in row] for row in out.tolist()]


class LikelihoodOracle:
    """Definition 3.1 of the paper, evaluated exactly on the cached hidden states.

    Args:
        aggregation: ``any``, ``majority`` or ``all`` over the pairs of one query.
        batch_size: Sequences per forward pass when caching the hidden states.
        chunk: Rows per output-layer matmul when caching.
    """

    kind = "parameter"

    def __init__(self, aggregation: str = "any", batch_size: int = 8, chunk: int = 1024) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"oracle.aggregation {aggregation!r} is not one of {AGGREGATIONS}")
        self.aggregation = aggregation
        self.head = HeadEvaluator(batch_size=batch_size, chunk=chunk)
        self.last_deltas: Tensor | None = None

    def begin(self, model: Any, params: Scope, pairs: Sequence, pad_token_id: int) -> Tensor:
        """Caches the current state; returns the (2n,) current log-probs (chosen, rejected)."""
        return self.head.begin(model, params, pairs, pad_token_id)

    def compare(self, deltas: DirectionBatch) -> list[Verdict]:
        """One aggregated verdict per perturbation (already scaled by the radius)."""
        changes = self.head.deltas(deltas)
        self.last_deltas = changes
        return [aggregate(v, self.aggregation) for v in pair_verdicts(changes)]
