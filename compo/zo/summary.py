"""A ComPO run's summary: the ``compo.*`` metrics, read from its trace rows.

:func:`summarise` reads every row of ``trace/compo.jsonl``, those of a resumed run's earlier
iterations included, so a rerun's metrics describe the whole run, not only its last part.
:func:`low_decisive` and :func:`noisy_direction` are the lines a run ends with when its oracle
barely decided anything, or its votes barely pointed the oracle's way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# Below this share of decisive verdicts over a run, the oracle barely spoke: say so.
LOW_DECISIVE = 0.05
# Below this mean cosine between the vote direction and the oracle's exact one, under 1% of a
# step's squared length points where the oracle wants: the rest is noise, and a random change of
# a trained output layer lowers the likelihood of every reply it was trained on (the v2
# benchmark measured 0.008 at m = 64 on SmolLM2; experiments/README.md, "What limits ComPO").
NOISY_COSINE = 0.1


def _mean(values: Iterable[Any]) -> float | None:
    # Rows without a value (None: no limit traced, no radius) or with NaN leave the mean alone.
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The summary metrics of a run with these trace rows (one per iteration).

    Args:
        rows: The run's trace rows, in iteration order.
        seconds: Wall-clock time of the run (this process's part of it).

    Returns:
        Counts of iterations, steps and verdicts, means over the rows and the total log-prob
        changes of the pairs; ``changed`` is whether any step was applied.
    """
    applied = [r for r in rows if r["applied"]]

    def changes(key: str) -> list[float]:
        after, before = f"logp_{key}_after", f"logp_{key}_before"
        return [a - b for r in rows for a, b in zip(r[after], r[before], strict=True)]

    d_chosen, d_rejected = changes("chosen"), changes("rejected")
    n_verdicts = sum(r["m"] for r in rows)
    n_decisive = sum(r["n_better"] + r["n_worse"] for r in rows)
    radii = [r["radius"] for r in rows if r.get("radius") is not None]
    return {
        "changed": bool(applied),
        "n_iterations": len(rows),
        "n_applied": len(applied),
        "n_skipped": len(rows) - len(applied),
        "n_verdicts": n_verdicts,
        "n_decisive": n_decisive,
        "decisive_share": n_decisive / n_verdicts if n_verdicts else None,
        "frac_mean": _mean(r["frac"] for r in rows),
        "frac_predicted_mean": _mean(r["frac_predicted"] for r in rows),
        "cos_limit_mean": _mean(r["cos_limit"] for r in rows),
        "radius_mean": _mean(radii),
        "radius_last": radii[-1] if radii else None,
        "radius_differ_mean": _mean(r.get("radius_differ") for r in rows),
        "delta_norm_sum": sum(r["delta_norm"] for r in rows),
        "delta_logp_chosen_mean": _mean(d_chosen),
        "delta_logp_rejected_mean": _mean(d_rejected),
        "seconds": round(seconds, 3),
    }


def low_decisive(summary: dict[str, Any], auto_radius: bool) -> str | None:
    """The warning for a run whose oracle decided < :data:`LOW_DECISIVE` of its comparisons.

    Args:
        summary: From :func:`summarise`.
        auto_radius: Whether the run used ``optimizer.radius=auto`` (then it is not advised).

    Returns:
        One line saying how few comparisons were decided and what to try, or None (enough were,
        or there were no verdicts).
    """
    share = summary["decisive_share"]
    if not summary["n_verdicts"] or share >= LOW_DECISIVE:
        return None
    if not auto_radius:
        tries = "optimizer.radius=auto, a larger radius"
    elif summary["radius_differ_mean"] is not None:
        # auto searched the radius (an output-level oracle): the responses changed, yet tied.
        tries = "a larger optimizer.target_differ"
    else:  # auto keeps the fixed radius of an oracle reading log-probs
        tries = "a larger optimizer.radius"
    return (
        f"the oracle decided only {summary['n_decisive']} of {summary['n_verdicts']} "
        f"comparisons ({100 * share:.1f}%); ties teach nothing: try {tries}, or an oracle with "
        "finer verdicts"
    )


def noisy_direction(summary: dict[str, Any]) -> str | None:
    """The warning for a vote run whose steps were mostly noise.

    Args:
        summary: From :func:`summarise`; ``cos_limit_mean`` is the mean cosine of the vote
            direction with the oracle's exact one (None: not traced, no exact direction, or no
            step had a vote direction, e.g. all ties: :func:`low_decisive` covers that).

    Returns:
        One line with the measured cosine and what to change, or None (not measured, or at
        least :data:`NOISY_COSINE`).
    """
    cos = summary["cos_limit_mean"]
    if cos is None or cos >= NOISY_COSINE:
        return None
    return (
        f"the vote direction's mean cosine with the oracle's exact direction was {cos:.3f}: "
        "each step was mostly noise; raise optimizer.num_directions (the cosine grows like "
        "sqrt(m)) or use optimizer.estimator=expected"
    )
