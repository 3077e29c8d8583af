"""The first-order stage's metrics: each batch's statistics and the end-of-run summary.

A batch's statistics are sums over its rows (:func:`pair_stats`, :func:`unpaired_stats`), so
:class:`compo.dpo_loop.StepLoop` can add up micro-batches and divide once per step when it writes
the step's trace row. At the end, :func:`summary` reads the phase's trace back and reports the
first and last value of each statistic (:data:`SUMMARY_KEYS`) with the run's counts and speed;
:class:`compo.dpo.DPOTrainer` adds the rest of ``dpo.*`` (wall time, label balance, cache hit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compo import distributed
from compo.dpo_loop import LABEL_SIDES
from compo.scoring import SequenceScores

# The trace values whose first and last step are in the metrics (pairs: loss, accuracy,
# reward_margin, logp_*; unpaired examples: loss, accuracy, and the per-label means).
SUMMARY_KEYS = (
    "loss",
    "accuracy",
    "reward_margin",
    "logp_chosen",
    "logp_rejected",
    "reward_desirable",
    "reward_undesirable",
    "logp_desirable",
    "logp_undesirable",
)


def pair_stats(
    policy: tuple[SequenceScores, ...], chosen_rewards: Tensor, rejected_rewards: Tensor
) -> dict[str, float]:
    """Summed step statistics of pairs: the implicit reward margin, how many pairs it ranks right,
    and the policy's log-probs of each side (likelihood displacement shows in them).

    Args:
        policy: The policy's (chosen, rejected) scores of the batch.
        chosen_rewards: The loss's implicit reward of each chosen reply.
        rejected_rewards: The same of each rejected reply.
    """
    margin = chosen_rewards - rejected_rewards
    return {
        "reward_margin": margin.sum().item(),
        "accuracy": (margin > 0).float().sum().item(),
        "logp_chosen": policy[0].sum_logps.detach().sum().item(),
        "logp_rejected": policy[1].sum_logps.detach().sum().item(),
    }


def unpaired_stats(scores: SequenceScores, rewards: Tensor, labels: Tensor) -> dict[str, float]:
    """Summed step statistics of unpaired examples: ``accuracy`` counts those whose implicit
    reward has their label's sign (desirable above the reference, undesirable below); rewards and
    log-probs are summed per label, with the count of each label (the step's mean divides by it,
    :mod:`compo.dpo_loop`)."""
    sign = torch.where(labels, 1.0, -1.0).to(rewards.dtype)
    stats = {"accuracy": ((rewards * sign) > 0).float().sum().item()}
    for side, mask in zip(LABEL_SIDES, (labels, ~labels), strict=True):
        stats[f"n_{side}"] = float(mask.sum().item())
        stats[f"reward_{side}"] = rewards[mask].sum().item()
        stats[f"logp_{side}"] = scores.sum_logps.detach()[mask].sum().item()
    return stats


def summary(
    trace_path: Path,
    identity: dict[str, Any],
    start_step: int,
    n_trainable: int,
    tokens: int,
    seconds: float,
) -> dict[str, Any]:
    """A phase's metrics at the end of its run.

    Args:
        trace_path: The phase's trace (``trace/dpo.jsonl``), one row per step.
        identity: What was trained: ``n_pairs``, ``total_steps``, ``loss``.
        start_step: The step the run resumed from (0 on a fresh start).
        n_trainable: Trained parameters.
        tokens: Tokens trained on by this run (not by the one it resumed).
        seconds: Time spent in the step loop.

    Returns:
        ``identity``, the counts, the throughput and each of :data:`SUMMARY_KEYS` the trace
        holds at its first and last step (``loss_first``, ``loss_last``, ...).
    """
    # From the whole trace, so a resumed run reports its first loss too.
    rows = []
    if distributed.is_main():  # other ranks write no trace (and rank 0 may be writing it)
        lines = trace_path.read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    metrics: dict[str, Any] = {
        **identity,
        "steps_run": identity["total_steps"] - start_step,
        "resumed_from_step": start_step,
        "n_trainable_params": n_trainable,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }
    if rows:
        for key in SUMMARY_KEYS:
            if key in rows[0]:
                metrics[f"{key}_first"] = rows[0][key]
                metrics[f"{key}_last"] = rows[-1][key]
    return metrics
