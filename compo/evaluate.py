"""Evaluation: preference accuracy and likelihood displacement from sequence scores.

Likelihood displacement (Razin et al. 2024) is what ComPO is meant to avoid on ambiguous pairs:
training on a pair lowers log pi(y+|x) along with log pi(y-|x), and probability mass drifts to
other outputs. It is measured here as the change of both log-probabilities between two models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compo.scoring import SequenceScores, score_pairs


def preference_metrics(chosen: SequenceScores, rejected: SequenceScores) -> dict[str, float]:
    """Preference accuracy and mean log-probabilities of a model on a set of pairs.

    Args:
        chosen: Scores of the chosen replies.
        rejected: Scores of the rejected replies (same pairs, same order).

    Returns:
        ``accuracy`` (summed log-probs rank chosen first), ``accuracy_per_token`` (the same with
        length-normalised scores), the mean margin and the mean log-probs, summed and per token.
    """
    margin = chosen.sum_logps - rejected.sum_logps
    margin_per_token = chosen.mean_logps - rejected.mean_logps
    return {
        "n_pairs": int(margin.numel()),
        "accuracy": (margin > 0).float().mean().item(),
        "accuracy_per_token": (margin_per_token > 0).float().mean().item(),
        "margin_mean": margin.mean().item(),
        "logp_chosen_mean": chosen.sum_logps.mean().item(),
        "logp_rejected_mean": rejected.sum_logps.mean().item(),
        "logp_chosen_per_token": chosen.mean_logps.mean().item(),
        "logp_rejected_per_token": rejected.mean_logps.mean().item(),
    }


def likelihood_displacement(
    before: tuple[SequenceScores, SequenceScores], after: tuple[SequenceScores, SequenceScores]
) -> dict[str, float]:
    """How the log-probabilities of chosen and rejected replies moved between two models.

    Args:
        before: (chosen, rejected) scores under the starting model.
        after: The same pairs under the trained model.

    Returns:
        Mean change of log pi(y+) and log pi(y-), and the fraction of pairs whose chosen reply lost
        probability (``frac_chosen_down``) and whose both replies lost it (``frac_both_down``).
    """
    d_chosen = after[0].sum_logps - before[0].sum_logps
    d_rejected = after[1].sum_logps - before[1].sum_logps
    return {
        "delta_logp_chosen": d_chosen.mean().item(),
        "delta_logp_rejected": d_rejected.mean().item(),
        "frac_chosen_down": (d_chosen < 0).float().mean().item(),
        "frac_both_down": ((d_chosen < 0) & (d_rejected < 0)).float().mean().item(),
    }


class PreferenceEval:
    """The ``eval=preference`` option: scores every pair before and after training.

    Args:
        batch_size: Sequences per forward pass.
    """

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size

    def score(self, model: Any, pairs: Sequence, pad_token_id: int, desc: str = "eval"):
        """Returns (chosen, rejected) scores of ``pairs`` under ``model``."""
        return score_pairs(model, pairs, pad_token_id, batch_size=self.batch_size, desc=desc)
