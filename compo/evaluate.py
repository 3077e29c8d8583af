"""Evaluation: preference accuracy and likelihood displacement from sequence scores.

Likelihood displacement (Razin et al. 2024) is what ComPO is meant to avoid on ambiguous pairs:
training on a pair lowers log pi(y+|x) along with log pi(y-|x), and probability mass drifts to
other outputs. It is measured here as the change of both log-probabilities between two models.

Win rates compare held-out responses of a policy with the baseline's (the starting model) under a
scorer; the length-controlled win rate removes the part explained by length differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from compo import settings
from compo.encoding import labels_of
from compo.reference_cache import ReferenceCache
from compo.scoring import SequenceScores, score_pairs
from compo.splitter import Split
from compo.stages import Job, Outcome, ReferenceScores


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
        probability (``frac_chosen_down``), whose both replies lost it (``frac_both_down``) and
        whose chosen reply gained while the rejected one lost (``frac_up_down``: the change a
        preference update intends, pair by pair).
    """
    d_chosen = after[0].sum_logps - before[0].sum_logps
    d_rejected = after[1].sum_logps - before[1].sum_logps
    return {
        "delta_logp_chosen": d_chosen.mean().item(),
        "delta_logp_rejected": d_rejected.mean().item(),
        "frac_chosen_down": (d_chosen < 0).float().mean().item(),
        "frac_both_down": ((d_chosen < 0) & (d_rejected < 0)).float().mean().item(),
        "frac_up_down": ((d_chosen > 0) & (d_rejected < 0)).float().mean().item(),
    }


def pair_rows(job: Job, split: Split, after: tuple[SequenceScores, SequenceScores]) -> list[dict]:
    """One row per pair: its side of the split and log pi(y+|x), log pi(y-|x) before and after."""
    columns = {
        "logp_chosen_before": job.reference.get()[0].sum_logps,
        "logp_rejected_before": job.reference.get()[1].sum_logps,
        "logp_chosen_after": after[0].sum_logps,
        "logp_rejected_after": after[1].sum_logps,
        "n_tokens_chosen": after[0].n_tokens,
        "n_tokens_rejected": after[1].n_tokens,
    }
    values = {key: column.tolist() for key, column in columns.items()}
    ambiguous = set(split.ambiguous)
    return [
        {
            "id": pair.pair_id,
            "side": "ambiguous" if i in ambiguous else "clean",
            **{key: column[i] for key, column in values.items()},
        }
        for i, pair in enumerate(job.encoded)
    ]


def unpaired_metrics(scores: SequenceScores, labels: Sequence[bool]) -> dict[str, Any]:
    """Mean log-probs of the desirable and of the undesirable completions of unpaired examples.

    There is no preference accuracy without pairs; KTO should raise the first and lower the second.
    A label without examples has None means.
    """
    out: dict[str, Any] = {"n_examples": len(labels)}
    mask = torch.tensor(list(labels), dtype=torch.bool, device=scores.sum_logps.device)
    for side, rows in (("desirable", mask), ("undesirable", ~mask)):
        n = int(rows.sum().item())
        out[f"n_{side}"] = n
        out[f"logp_{side}_mean"] = scores.sum_logps[rows].mean().item() if n else None
        out[f"logp_{side}_per_token"] = scores.mean_logps[rows].mean().item() if n else None
    return out


def unpaired_displacement(
    before: SequenceScores, after: SequenceScores, labels: Sequence[bool]
) -> dict[str, Any]:
    """How the log-probs of desirable and undesirable completions moved between two models: mean
    changes, and the fractions of desirable completions that lost probability and of undesirable
    ones that gained it (None for a label without examples)."""
    delta = after.sum_logps - before.sum_logps
    mask = torch.tensor(list(labels), dtype=torch.bool, device=delta.device)
    desirable, undesirable = delta[mask], delta[~mask]
    return {
        "delta_logp_desirable": desirable.mean().item() if desirable.numel() else None,
        "delta_logp_undesirable": undesirable.mean().item() if undesirable.numel() else None,
        "frac_desirable_down": (desirable < 0).float().mean().item() if desirable.numel() else None,
        "frac_undesirable_up": (
            (undesirable > 0).float().mean().item() if undesirable.numel() else None
        ),
    }


def _metrics(scores: tuple[SequenceScores, ...], labels: Sequence[bool] | None) -> dict[str, Any]:
    return preference_metrics(*scores) if labels is None else unpaired_metrics(scores[0], labels)


class PreferenceEval:
    """The ``eval=preference`` option: scores every pair before and after training.

    Args:
        batch_size: Sequences per forward pass.
        reference_cache: A directory where reference passes (the starting scores) are stored and
            reused (:mod:`compo.reference_cache`), or None.
    """

    def __init__(self, batch_size: int = 8, reference_cache: str | None = None) -> None:
        self.batch_size = settings.number("eval.batch_size", batch_size, integer=True, ge=1)
        self.cache = ReferenceCache.at(reference_cache)

    def score(self, model: Any, pairs: Sequence, pad_token_id: int, desc: str = "eval"):
        """Returns (chosen, rejected) scores of ``pairs`` under ``model``."""
        return score_pairs(model, pairs, pad_token_id, batch_size=self.batch_size, desc=desc)

    def reference(
        self, model: Any, encoded: Sequence, pad_token_id: int, trunk: Any = None
    ) -> ReferenceScores:
        """The starting scores double as ``eval.before``: one pass serves every stage."""
        return ReferenceScores(
            model, encoded, pad_token_id, self.batch_size, "eval/before", trunk, self.cache
        )

    def before(self, job: Job) -> Outcome:
        """``eval.before``: accuracy and log-probs of every pair under the starting policy (for
        unpaired examples: the log-probs of the desirable and of the undesirable ones).

        With a held-out set, the same on it (``eval.heldout.before``), computed here once, before
        any stage changes the policy; ``eval.after`` compares against these scores.
        """
        metrics = {"eval.before": _metrics(job.reference.get(), labels_of(job.encoded))}
        if job.heldout is not None:
            metrics.update(_heldout_metrics("before", job.heldout.get()))
        return Outcome(metrics)

    def after(self, job: Job, split: Split) -> Outcome:
        """``eval.after`` and the likelihood displacement on each side of the split (and on the
        held-out pairs).

        Each pair's log-probabilities before and after go to ``eval_pairs.jsonl`` (the pictures
        of :mod:`compo.plots` and anyone's own analysis read them there).
        """
        labels = labels_of(job.encoded)
        after = self.score(job.policy, job.encoded, job.pad_token_id, desc="eval/after")
        if labels is None:  # unpaired examples have no pair to draw
            job.out.write_rows("eval_pairs", pair_rows(job, split, after))
        metrics = {"eval.after": _metrics(after, labels)}
        for side, rows in (("clean", split.clean), ("ambiguous", split.ambiguous)):
            if rows:
                rows_after = tuple(scores.take(rows) for scores in after)
                before = job.reference.rows(rows)
                if labels is None:
                    shift = likelihood_displacement(before, rows_after)
                else:
                    side_labels = [labels[i] for i in rows]
                    shift = unpaired_displacement(before[0], rows_after[0], side_labels)
                metrics[f"eval.displacement.{side}"] = shift
        if job.heldout is not None:
            held = self.score(
                job.policy, job.heldout.encoded, job.pad_token_id, desc="eval/heldout-after"
            )
            metrics.update(_heldout_metrics("after", held))
            metrics["eval.displacement.heldout"] = likelihood_displacement(job.heldout.get(), held)
        return Outcome(metrics)


def _heldout_metrics(when: str, scores: tuple[SequenceScores, SequenceScores]) -> dict:
    """``eval.heldout.<when>.*`` and the headline ``eval.heldout.accuracy`` / ``margin_mean``.

    The headline keys hold the latest model's numbers: ``after`` overwrites ``before``, so they are
    the final model's either way (no ``eval.after`` exists when no stage changed the model). They
    are what a sweep optimises (``objective=auto``).
    """
    found = preference_metrics(*scores)
    headline = {"accuracy": found["accuracy"], "margin_mean": found["margin_mean"]}
    return {f"eval.heldout.{when}": found, "eval.heldout": headline}


# --------------------------------------------------------------------------------------------
# Win rates against a baseline (held-out generation judged by a scorer)
# --------------------------------------------------------------------------------------------


def outcomes(policy: Any, baseline: Any, tie_eps: float = 0.0) -> np.ndarray:
    """Paired outcomes, element-wise: 1 where the policy's score is higher, 0 where lower, 1/2
    for a tie (``|difference| <= tie_eps``).

    Args:
        policy: Scores of the policy's responses (any shape; higher is better).
        baseline: Scores of the baseline's responses to the same prompts, same shape.
        tie_eps: Scores closer than this are a tie.
    """
    policy, baseline = np.asarray(policy, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if policy.shape != baseline.shape or not policy.size:
        raise ValueError("need the same, non-zero number of policy and baseline scores")
    diff = policy - baseline
    return np.where(np.abs(diff) <= tie_eps, 0.5, (diff > 0).astype(np.float64))


def win_rate(policy: Sequence[float], baseline: Sequence[float], tie_eps: float = 0.0) -> float:
    """Fraction of prompts where the policy's response scores higher; a tie counts one half.

    Args:
        policy: Score of the policy's response per prompt (higher is better).
        baseline: Score of the baseline's response to the same prompts.
        tie_eps: Scores closer than this are a tie.
    """
    return float(outcomes(policy, baseline, tie_eps).mean())


def length_controlled_win_rate(
    policy: Sequence[float],
    baseline: Sequence[float],
    policy_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    tie_eps: float = 0.0,
    ridge: float = 1e-2,
    iterations: int = 50,
) -> float:
    """The win rate with the effect of length removed (a length-adjusted win rate).

    The length term of AlpacaEval-LC (Dubois et al. 2024) without its instruction-difficulty term,
    so its numbers are not comparable to AlpacaEval's LC win rates.

    Fits P(win_i) = sigmoid(a + b * tanh(d_i / s)) by ridge-penalised logistic regression (Newton's
    method; ties are soft targets of 1/2), with d_i the policy's minus the baseline's response
    length and s the standard deviation of d (1 if it is 0). The length-controlled win rate is the
    prediction at zero length difference, sigmoid(a). The small ridge keeps a finite answer when
    wins are perfectly separated by length; with no length difference at all it reduces to the
    (slightly shrunk) plain win rate.

    Args:
        policy: Scores of the policy's responses.
        baseline: Scores of the baseline's responses.
        policy_lengths: Lengths of the policy's responses (e.g. words).
        baseline_lengths: Lengths of the baseline's responses.
        tie_eps: Scores closer than this are a tie.
        ridge: L2 penalty on (a, b).
        iterations: Newton steps.
    """
    y = torch.from_numpy(outcomes(policy, baseline, tie_eps))
    d = torch.tensor(policy_lengths, dtype=torch.float64) - torch.tensor(
        baseline_lengths, dtype=torch.float64
    )
    if d.numel() != y.numel():
        raise ValueError("need one length per score")
    scale = d.std(correction=0).item() if d.numel() > 1 else 0.0
    x = torch.stack([torch.ones_like(d), torch.tanh(d / (scale if scale > 0 else 1.0))], dim=1)
    w = torch.zeros(2, dtype=torch.float64)
    penalty = ridge * torch.eye(2, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + penalty @ w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + penalty
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if step.abs().max().item() < 1e-10:
            break
    return torch.sigmoid(w[0]).item()
