"""Noise splitters: which preference pairs are clean (for DPO) and which are ambiguous (for ComPO).

Every splitter gives each pair a score under the reference model (the policy as loaded) and calls
a pair ambiguous by a rule on that score. They share :class:`compo.stages.Splitter`::

    splitter.split(model, pairs, encoded, pad_token_id, reference=None) -> Split

where ``reference`` is the run's :class:`compo.reference.ReferenceScores` (computed once and shared
with ``eval.before`` and the first-order stage, so the likelihood-margin rule costs nothing).

* :class:`LikelihoodMarginSplitter` - the ComPO paper's rule: ambiguous when
  ``|log pi_ref(y+|x) - log pi_ref(y-|x)| < delta``.
* :class:`ChesSplitter` - centred hidden-embedding similarity (CHES, Razin et al. 2024); the most
  similar pairs are ambiguous.
* :class:`ConfidenceSplitter` - ambiguous when the pair's ``confidence`` is below a threshold.

``splitter=none`` switches the stage off: every pair is clean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from compo import settings
from compo.errors import CompoError
from compo.reference import ReferenceScores
from compo.rundir import RunDir
from compo.scoring import SequenceScores, score_pairs

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Which pairs are clean and which ambiguous.

    Attributes:
        rule: Name of the splitter that produced it.
        scores: One score per pair (input order), or None when nothing was scored.
        ambiguous_mask: True for ambiguous pairs, shape (n,).
        threshold: The score boundary that was applied (for fractions, the score reached).
    """

    rule: str
    scores: Tensor | None
    ambiguous_mask: Tensor
    threshold: float | None = None

    @property
    def clean(self) -> list[int]:
        """Indices of the clean pairs, in input order."""
        return torch.nonzero(~self.ambiguous_mask).flatten().tolist()

    @property
    def ambiguous(self) -> list[int]:
        """Indices of the ambiguous pairs, in input order."""
        return torch.nonzero(self.ambiguous_mask).flatten().tolist()

    @classmethod
    def all_clean(cls, n: int) -> Split:
        """The split of ``splitter=none``: every pair is clean."""
        return AllClean("none", None, torch.zeros(n, dtype=torch.bool))

    def record(self, out: RunDir, pairs: Sequence) -> dict[str, Any]:
        """Writes ``split/`` and returns the ``split.*`` metrics (see :func:`record_split`)."""
        return record_split(out, pairs, self)


class AllClean(Split):
    """The split of ``splitter=none``: nothing was split, so nothing is recorded."""

    def record(self, out: RunDir, pairs: Sequence) -> dict[str, Any]:
        return {}


class LikelihoodMarginSplitter:
    """Ambiguous when the reference model barely separates the two replies (ComPO paper).

    The score is the margin ``log pi_ref(y+|x) - log pi_ref(y-|x)``; a pair is ambiguous when
    ``|margin| < delta``. Summed log-probs grow with reply length, so ``per_token=True`` uses the
    length-normalised margin instead (its scale is roughly the reply length times smaller, so
    ``delta`` must shrink with it, e.g. 0.1).

    Args:
        delta: Ambiguity radius (3.0 in the paper, summed log-probs).
        per_token: Use mean instead of summed log-probs.
        batch_size: Sequences per forward pass.
    """

    name = "likelihood_margin"
    unpaired_fix = "splitter=none"  # its rule compares the two replies of a pair
    uses_reference = True  # split() takes the reference scores instead of computing them

    def __init__(self, delta: float = 3.0, per_token: bool = False, batch_size: int = 8) -> None:
        self.delta = settings.number("splitter.delta", delta, ge=0)
        self.per_token = settings.flag("splitter.per_token", per_token)
        self.batch_size = settings.number("splitter.batch_size", batch_size, integer=True, ge=1)

    def split(
        self,
        model: Any,
        pairs: Sequence,
        encoded: Sequence,
        pad_token_id: int,
        reference: ReferenceScores | None = None,
    ) -> Split:
        """Margins from ``reference`` (or a pass of its own); ambiguous if ``|margin| < delta``."""
        if reference is None:
            reference = ReferenceScores(
                model, encoded, pad_token_id, self.batch_size, "split/margin"
            )
        chosen, rejected = reference.get()
        if chosen.sum_logps.numel() != len(encoded):
            raise ValueError("reference scores do not match the pairs")
        if self.per_token:
            margin = chosen.mean_logps - rejected.mean_logps
        else:
            margin = chosen.sum_logps - rejected.sum_logps
        margin = margin.detach().float().cpu()
        return Split(self.name, margin, margin.abs() < self.delta, self.delta)


def ches_scores(chosen: SequenceScores, rejected: SequenceScores, normalize: bool) -> Tensor:
    """CHES (Razin et al. 2024, Def. 2) from the hidden states at response positions.

    ``CHES = <h+, h-> - ||h+||^2`` with ``h`` the sum of the final hidden states that predict each
    reply token (``x, y_<k`` for k = 1..|y|, exactly what the output layer sees); ``normalize``
    uses the means instead (their length-normalised CHES), so long replies do not dominate.

    Args:
        chosen: Scores with ``hidden``/``seq_index`` of the chosen replies.
        rejected: The same for the rejected replies.
        normalize: Mean instead of sum over reply positions.

    Returns:
        (n,) fp32 scores; larger means more similar (more likelihood displacement expected).
    """
    n = chosen.sum_logps.numel()

    def pooled(s: SequenceScores) -> Tensor:
        index = s.seq_index[:, None].expand_as(s.hidden)
        total = torch.zeros(n, s.hidden.shape[1], dtype=s.hidden.dtype, device=s.hidden.device)
        total.scatter_add_(0, index, s.hidden)
        if normalize:
            total = total / s.n_tokens[:, None].to(total.dtype)
        return total

    h_pos, h_neg = pooled(chosen), pooled(rejected)
    return ((h_pos * h_neg).sum(-1) - (h_pos * h_pos).sum(-1)).float().cpu()


class ChesSplitter:
    """Ambiguous when the two replies look alike to the model (CHES, Razin et al. 2024).

    Razin et al. pool over all reply positions (not only the last token): displacement comes from
    every token's gradient, so the pooled embedding is what predicts it in their analysis. Exactly
    one of ``threshold`` and ``fraction`` is set.

    Args:
        fraction: The most similar ``fraction`` of pairs (highest CHES) are ambiguous.
        threshold: Pairs with CHES above this are ambiguous (scale depends on the model).
        normalize: Length-normalised CHES (means over reply positions) instead of sums.
        batch_size: Sequences per forward pass.
    """

    name = "ches"
    unpaired_fix = "splitter=none"  # its rule compares the two replies of a pair

    def __init__(
        self,
        fraction: float | None = 0.25,
        threshold: float | None = None,
        normalize: bool = True,
        batch_size: int = 8,
    ) -> None:
        if (fraction is None) == (threshold is None):
            raise CompoError("splitter: set exactly one of splitter.fraction, splitter.threshold")
        self.fraction = settings.number("splitter.fraction", fraction, ge=0, le=1, optional=True)
        self.threshold = settings.number("splitter.threshold", threshold, optional=True)
        self.normalize = settings.flag("splitter.normalize", normalize)
        self.batch_size = settings.number("splitter.batch_size", batch_size, integer=True, ge=1)

    def split(
        self,
        model: Any,
        pairs: Sequence,
        encoded: Sequence,
        pad_token_id: int,
        reference: ReferenceScores | None = None,
    ) -> Split:
        """Computes CHES of every pair (hidden states are needed, so ``reference`` is unused)."""
        chosen, rejected = score_pairs(
            model,
            encoded,
            pad_token_id,
            batch_size=self.batch_size,
            return_hidden=True,
            desc="split/ches",
        )
        scores = ches_scores(chosen, rejected, self.normalize)
        if self.threshold is not None:
            return Split(self.name, scores, scores > self.threshold, self.threshold)
        k = math.ceil(self.fraction * len(scores))
        mask = torch.zeros(len(scores), dtype=torch.bool)
        if k == 0:
            return Split(self.name, scores, mask, None)
        # Stable sort: among equal scores the earlier pair is the ambiguous one, on every machine.
        order = torch.sort(-scores, stable=True).indices
        mask[order[:k]] = True
        return Split(self.name, scores, mask, scores[order[k - 1]].item())


class ConfidenceSplitter:
    """Ambiguous when the label's own ``confidence`` (e.g. from click counts) is low.

    Args:
        threshold: Pairs with ``confidence < threshold`` are ambiguous. The default suits
            ``compo-clicks`` output (confidence = P(theta > 1/2) under a Beta(1, 1) prior): one
            unopposed click gives 0.75 and a 3-to-1 majority 0.81 (clean), clicks split 2 to 1
            give 0.69 (ambiguous). Every aggregated pair has a confidence above 0.5, so 0.5
            would send none to ComPO.
    """

    name = "confidence"
    unpaired_fix = "splitter=none"  # the ambiguous side goes to ComPO, which needs pairs

    def __init__(self, threshold: float = 0.7) -> None:
        # Confidences are in [0, 1]: a threshold above 1 marks every pair ambiguous, <= 0 none.
        self.threshold = settings.number("splitter.threshold", threshold, gt=0, le=1)

    def split(
        self,
        model: Any,
        pairs: Sequence,
        encoded: Sequence,
        pad_token_id: int,
        reference: ReferenceScores | None = None,
    ) -> Split:
        """Splits by each pair's ``confidence``; no model is run."""
        scores = torch.tensor([p.confidence for p in pairs], dtype=torch.float32)
        return Split(self.name, scores, scores < self.threshold, self.threshold)


def histogram(scores: Tensor, bins: int = 20) -> dict[str, list[float] | list[int]]:
    """Equal-width histogram of ``scores`` as JSON-ready ``edges`` and ``counts``."""
    lo, hi = scores.min().item(), scores.max().item()
    if lo == hi:  # torch.histogram needs a non-empty range
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = torch.histogram(scores.double(), bins=bins, range=(lo, hi))
    return {"edges": [round(e, 6) for e in edges.tolist()], "counts": counts.long().tolist()}


def record_split(out: RunDir, pairs: Sequence, split: Split) -> dict[str, Any]:
    """Writes ``split/clean.jsonl`` and ``split/ambiguous.jsonl``; returns ``split.*`` metrics.

    Each row is the pair's source row plus ``score``, this split's score (it replaces a field of
    that name, e.g. when a split file is split again), so a side file is a valid data file.
    """
    scores = split.scores.tolist() if split.scores is not None else [None] * len(pairs)
    for side, indices in (("clean", split.clean), ("ambiguous", split.ambiguous)):
        rows = [{**pairs[i].to_dict(), "score": scores[i]} for i in indices]
        out.write_rows(f"split/{side}", rows)
    n, n_amb = len(pairs), len(split.ambiguous)
    metrics: dict[str, Any] = {
        "rule": split.rule,
        "n_clean": n - n_amb,
        "n_ambiguous": n_amb,
        "frac_ambiguous": n_amb / n if n else 0.0,
        "threshold": split.threshold,
    }
    if split.scores is not None and split.scores.numel():
        s = split.scores
        metrics.update(score_min=s.min().item(), score_mean=s.mean().item())
        metrics.update(score_max=s.max().item(), score_histogram=histogram(s))
    log.info("split (%s): %d clean, %d ambiguous", split.rule, n - n_amb, n_amb)
    for side, count in (("clean", n - n_amb), ("ambiguous", n_amb)):
        if count == 0:
            stage = "first-order (dpo)" if side == "clean" else "zeroth-order (optimizer)"
            log.warning("split: no %s pairs; the %s stage will be skipped", side, stage)
    return metrics
