"""The first-order stage's reference: log-probs of its pairs before any update, and its scorer.

:class:`PhaseReference` gives a phase (``dpo``, ``sft``) the reference log-probs its loss compares
with and the module its steps score with. The scores are taken from the run's shared pass
(:class:`compo.reference.ReferenceScores`) when it was made under this model, else computed by a
pass of the phase's own, which goes through the run's ``reference_cache`` like the shared one. So
no reference model stays in memory while training.

Under ``dpo.scope=last_k`` with ``dpo.cache_trunk``, the frozen blocks run once: their output is
recorded while the reference is scored (:meth:`PhaseReference.frozen_trunk` gives the shared pass
its empty cache) and the steps run the top blocks alone on it, after a probe has checked that the
cached view reproduces the full model. :class:`compo.dpo.DPOTrainer` prepares it at the start of
:meth:`~compo.dpo.DPOTrainer.train`, after choosing the trainable parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from compo.losses import PairwiseLoss
from compo.reference import ReferenceScores, Scores
from compo.reference_cache import ReferenceCache
from compo.scoring import score_pairs
from compo.trunk import FrozenTrunkCache, transformer_blocks

log = logging.getLogger(__name__)


class Prepared(NamedTuple):
    """What :meth:`PhaseReference.prepare` hands the phase's steps."""

    #: The loss's reference log-probs (``loss.logps``), one tensor per reply, on the model's
    #: device; zeros for a reference-free loss.
    logps: tuple[Tensor, ...]
    #: The model, or its frozen-trunk view (the top blocks on the recorded states).
    scorer: Any
    #: Whether ``reference_cache`` served the phase's own pass (None: no such pass, or no cache).
    cache_hit: bool | None


class PhaseReference:
    """Reference log-probs and the scorer of one phase of the first-order stage.

    Args:
        loss: The phase's loss: whether it needs reference log-probs, and which (``loss.logps``).
        scope: ``all`` or ``last_k`` trainable parameters (``dpo.scope``).
        last_k: Transformer blocks trained under ``scope=last_k``.
        cache_trunk: Under ``scope=last_k``, run the frozen blocks once (see
            :class:`compo.trunk.FrozenTrunkCache`) instead of at every step.
        batch_size: Sequences per forward pass of a reference pass of its own.
    """

    def __init__(
        self, loss: PairwiseLoss, scope: str, last_k: int, cache_trunk: bool, batch_size: int
    ) -> None:
        self.loss, self.scope, self.last_k = loss, scope, last_k
        self.cache_trunk, self.batch_size = cache_trunk, batch_size

    def uses_cache(self, model: nn.Module) -> bool:
        """Whether the steps run on a frozen-trunk view: some blocks of ``model`` are frozen."""
        blocks = len(transformer_blocks(model)) if self.scope == "last_k" else 0
        return self.cache_trunk and 0 < self.last_k < blocks

    def frozen_trunk(self, model: nn.Module) -> FrozenTrunkCache | None:
        """An empty cache of the blocks this phase freezes, or None when it trains them all.

        Filled while the reference scores are computed (see :class:`compo.reference`), it saves
        :meth:`prepare` a full forward pass and every training step the frozen blocks.
        """
        return FrozenTrunkCache(model, self.last_k) if self.uses_cache(model) else None

    def prepare(
        self,
        model: nn.Module,
        pairs: Sequence,
        pad_token_id: int,
        reference: Scores | None = None,
        trunk: FrozenTrunkCache | None = None,
        reference_cache: ReferenceCache | None = None,
    ) -> Prepared:
        """The reference log-probs of ``pairs`` and the module to train with.

        Args:
            model: The policy before any update (it is the reference).
            pairs: Encoded pairs (or unpaired examples).
            pad_token_id: Padding id.
            reference: (chosen, rejected) scores already computed under ``model``, if any.
            trunk: A frozen-trunk cache filled while those scores were computed, if any.
            reference_cache: Where a reference pass of its own is looked up and stored, if any.
        """
        hit = None
        cache = trunk if trunk is not None and trunk.model is model else None
        if cache is not None and cache.covers(pairs):
            # Recorded with the reference scores: the reference costs only the top blocks.
            reference = score_pairs(cache.cached(), pairs, pad_token_id, desc="dpo/reference")
        elif self.uses_cache(model):
            cache = FrozenTrunkCache(model, self.last_k)
            reference, hit = self._own_pass(model, pairs, pad_token_id, cache, reference_cache)
        elif reference is None and self.loss.needs_reference:
            reference, hit = self._own_pass(model, pairs, pad_token_id, None, reference_cache)
        device = next(model.parameters()).device
        if self.loss.needs_reference:
            ref = tuple(self.loss.logps(s).detach().to(device) for s in reference)
        else:
            ref = tuple(torch.zeros(len(pairs), device=device) for _ in pairs[0].replies)
        if cache is None:
            return Prepared(ref, model, hit)
        if _reproduces(cache, pairs, pad_token_id, reference, device):
            return Prepared(ref, cache.cached(), hit)
        log.warning("dpo: the frozen-trunk cache does not reproduce %s; running the full model",
                    type(model).__name__)  # fmt: skip
        return Prepared(ref, model, hit)

    def _own_pass(self, model, pairs, pad_token_id, trunk, reference_cache):
        """The reference pass the phase runs itself (no earlier stage ran it, or the SFT step
        changed the model), through the run's cache like the shared one; (scores, cache hit)."""
        own = ReferenceScores(
            model, pairs, pad_token_id, self.batch_size, "dpo/reference", trunk, reference_cache
        )
        return own.get(), own.cache_hit


def _reproduces(cache: FrozenTrunkCache, pairs, pad_token_id, reference, device) -> bool:
    """Whether the cached view scores the first two pairs as the full model did (``reference``).

    The cached path assumes a Llama-like decoder, whose blocks take ``inputs_embeds`` as they are
    (:class:`compo.trunk.FrozenTrunkCache`); one that scales or adds to them scores otherwise.
    """
    probe = list(range(min(2, len(pairs))))
    got = score_pairs(cache.cached(), [pairs[i] for i in probe], pad_token_id)
    want = [s.sum_logps[probe].to(device) for s in reference]
    return all(
        torch.allclose(g.sum_logps, w, rtol=1e-4, atol=1e-3) for g, w in zip(got, want, strict=True)
    )
