"""The starting policy's scores of every pair: one owner, computed once, on first use.

Whichever stage asks first (``eval.before``, the likelihood-margin splitter, the first-order
stage) triggers the one forward pass; the others reuse it. Given the first-order stage's empty
frozen-trunk cache (:meth:`compo.dpo.DPOTrainer.frozen_trunk`), the pass fills it on the way, so
that stage's reference and training steps skip the frozen blocks. Given a
:class:`compo.reference_cache.ReferenceCache` (``reference_cache=<dir>``), the pass is looked up
on disk first and stored after: the jobs of a sweep share one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compo.reference_cache import ReferenceCache
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
        cache: Where the pass is looked up and stored, or None (computed every time).
    """

    def __init__(
        self,
        model: Any,
        encoded: Sequence,
        pad_token_id: int,
        batch_size: int,
        desc: str | None,
        trunk: Any = None,
        cache: ReferenceCache | None = None,
    ) -> None:
        self.model, self.encoded, self.pad_token_id = model, encoded, pad_token_id
        self.batch_size, self.desc, self.trunk = batch_size, desc, trunk
        self.cache = cache
        #: Whether the cache served the scores (None: no cache, or not computed yet).
        self.cache_hit: bool | None = None
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
            if self.cache is None:
                self._scores = self._score()
            else:
                self._scores, self.cache_hit = self.cache.fetch(
                    self.model, self.encoded, self.pad_token_id, self.batch_size, self.trunk,
                    self._score,
                )  # fmt: skip
        return self._scores

    def _score(self) -> Scores:
        scorer = self.model if self.trunk is None else self.trunk.filling()
        return score_pairs(
            scorer, self.encoded, self.pad_token_id, batch_size=self.batch_size, desc=self.desc
        )

    def cache_metrics(self) -> dict[str, int]:
        """``{"cache_hit": 1}`` (or 0) once the scores were looked up in the cache, else empty."""
        return {} if self.cache_hit is None else {"cache_hit": int(self.cache_hit)}

    def rows(self, rows: Sequence[int]) -> Scores:
        """The scores of the pairs (or unpaired examples) at ``rows``."""
        return tuple(scores.take(rows) for scores in self.get())


def cached_scores(
    model: Any,
    encoded: Sequence,
    pad_token_id: int,
    batch_size: int,
    cache_dir: str | None,
    desc: str | None = "reference",
) -> Scores:
    """The scores of ``encoded`` under ``model``, through the cache at ``cache_dir`` (for scripts).

    The same numbers and entries as a run's reference pass with this batch size and no frozen
    trunk to fill. A run that fills one (``dpo.scope=last_k``) keys its entry with the split point
    as well, so a script's first call on its pairs computes (and stores) an entry of its own.

    Args:
        model: The model (e.g. the starting policy).
        encoded: Encoded pairs or unpaired examples.
        pad_token_id: Padding id.
        batch_size: Sequences per forward pass.
        cache_dir: The cache directory, or None to compute without one.
        desc: Progress-bar label (None: no bar).

    Returns:
        ``(chosen, rejected)`` scores of pairs; ``(completion,)`` of unpaired examples.
    """
    cache = ReferenceCache.at(cache_dir, key="cache_dir")
    return ReferenceScores(model, encoded, pad_token_id, batch_size, desc, cache=cache).get()
