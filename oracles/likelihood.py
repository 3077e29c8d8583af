"""The likelihood oracle (ComPO, Definition 3.1): the model's own log-probabilities decide.

theta + delta is better than theta on a pair iff log pi(y+|x) rises and log pi(y-|x) falls. With
several pairs per query the per-pair verdicts are aggregated (``any`` as in the authors' code,
``majority`` or ``all``). A pair whose two log-probs do not move at all abstains (TIE).

Exact and fast: the optimizer hands over its head evaluator, whose cache holds the hidden states
feeding the output layer for this iteration's pairs; each perturbation costs the output-layer
product and a log-softmax at response positions only (:class:`compo.zo.head.HeadEvaluator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from compo.interfaces import AGGREGATIONS, ComparisonOracle, Verdict, aggregate, settings


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


class LikelihoodOracle(ComparisonOracle):
    """Definition 3.1 of the paper, evaluated exactly on the optimizer's cached hidden states.

    Args:
        aggregation: ``any``, ``majority`` or ``all`` over the pairs of one query.
    """

    kind = "parameter"

    def __init__(self, aggregation: str = "any") -> None:
        settings.choice("oracle.aggregation", aggregation, AGGREGATIONS)
        self.aggregation = aggregation
        self.head: Any = None
        self.last_deltas: Tensor | None = None

    def begin(
        self, model: Any, scope: Any, pairs: Sequence, pad_token_id: int, *, iteration: int, head
    ) -> None:
        """Keeps the optimizer's head evaluator (cached on ``pairs`` at the current weights)."""
        self.head = head

    def compare(self, deltas: Any) -> list[Verdict]:
        """One aggregated verdict per perturbation (already scaled by the radius)."""
        changes = self.head.deltas(deltas)
        self.last_deltas = changes
        return [aggregate(v, self.aggregation) for v in pair_verdicts(changes)]

    def limit(self):
        """The exact r -> 0 direction: -(a/||a|| + b/||b||) from two backward passes."""
        return self.head.limit()
