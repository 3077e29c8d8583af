"""The starting policy's scores of every pair: one owner, computed once, on first use.

Whichever stage asks first (``eval.before``, the likelihood-margin splitter, the first-order
stage) triggers the one forward pass; the others reuse it. Given the first-order stage's empty
frozen-trunk cache (:meth:`compo.dpo.DPOTrainer.frozen_trunk`), the pass fills it on the way, so
that stage's reference and training steps skip the frozen blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compo.scoring import SequenceScores, score_pairs

Scores = tuple[SequenceScores, ...]  # (chosen, rejected) of pairs; (completion,) of examples


class ReferenceScores:
    """(chosen, rejected) scores of every pair (or (completion,) of every unpaired example) under
    the starting policy, computed once.

    Args:
        model: The policy before any update.
        encoded: Every encoded pair.
        pad_token_id: Padding id.
        batch_size: Sequences per forward pass.
        desc: Progress-bar label (``eval/before`` when it doubles as the evaluation).
        trunk: An empty :class:`compo.trunk.FrozenTrunkCache` to fill on the way, or None.
    """

    def __init__(
        self,
        model: Any,
        encoded: Sequence,
        pad_token_id: int,
        batch_size: int,
        desc: str,
        trunk: Any = None,
    ) -> None:
        self.model, self.encoded, self.pad_token_id = model, encoded, pad_token_id
        self.batch_size, self.desc, self.trunk = batch_size, desc, trunk
        self._scores: Scores | None = None

    @classmethod
    def given(cls, scores: Scores) -> ReferenceScores:
        """Scores computed elsewhere (tests, notebooks)."""
        reference = cls(None, [], 0, 1, "")
        reference._scores = scores
        return reference

    @property
    def ready(self) -> bool:
        """Whether the scores exist already (asking for them now costs nothing)."""
        return self._scores is not None

    def get(self) -> Scores:
        """Every pair's scores, computing them on the first call."""
        if self._scores is None:
            scorer = self.model if self.trunk is None else self.trunk.filling()
            self._scores = score_pairs(
                scorer,
                self.encoded,
                self.pad_token_id,
                batch_size=self.batch_size,
                desc=self.desc,
            )
        return self._scores

    def rows(self, rows: Sequence[int]) -> Scores:
        """The scores of the pairs (or unpaired examples) at ``rows``."""
        return tuple(scores.take(rows) for scores in self.get())
