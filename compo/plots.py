"""Pictures of a run, drawn into ``plots/`` at its end from what the run dir already holds.

    plots/dpo.png     first-order stage: loss and reward margin per step (trace/dpo.jsonl);
                      plots/sft.png likewise for the SFT step of ``dpo.sft_epochs``
    plots/compo.png   ComPO per iteration: frac (share of decisive perturbations judged
                      better), decisive share, step applied (trace/compo.jsonl)
    plots/logp.png    log pi(y+|x) and log pi(y-|x) of every pair: the change (after - before)
                      against the value before, clean and ambiguous pairs apart
                      (eval_pairs.jsonl, written by eval.after)

A picture whose stage did not run in this run (``optimizer=none``, ``eval=none``, a model that
did not change) or whose data the run lacks (``logp.png`` of unpaired examples) is not drawn,
and a stale one from an earlier run in the same dir is removed; the reason is logged once and
kept in ``plots.skipped.<name>``. Which stages ran is read from this
run's metrics, not from the files, since a run dir may hold traces of an earlier run.

Only matplotlib's object API is used (``Figure``, no pyplot): nothing global, such as the
backend of a notebook that imported compo, is changed.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compo.rundir import atomic_write_bytes

log = logging.getLogger("compo")

PHASES = ("sft", "dpo")  # first-order traces, in the order they run
CHOSEN, REJECTED = "tab:green", "tab:red"


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed run; the trace's readers all skip it
    return rows


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


def _smoothed(values: list[float]) -> list[float]:
    """A trailing moving average over about a twentieth of the series (at least 1 point)."""
    window = max(1, len(values) // 20)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _first_order(fig: Any, phase: str, rows: list[dict], metrics: Mapping[str, Any]) -> None:
    steps = [row["step"] for row in rows]
    loss_name = metrics.get(f"{phase}.loss", phase)
    fig.suptitle(
        f"{phase}: {loss_name} loss on {metrics.get(f'{phase}.n_pairs', '?')} clean pairs, "
        f"{len(rows)} steps"
    )
    panels = fig.subplots(1, 2)
    for ax, key, label in (
        (panels[0], "loss", "loss"),
        (panels[1], "reward_margin", "reward margin (chosen - rejected)"),
    ):
        values = [_number(row.get(key)) for row in rows]
        ax.plot(steps, values, color="tab:blue", alpha=0.35, lw=1, label="per step")
        if len(values) >= 20:
            ax.plot(steps, _smoothed(values), color="tab:blue", lw=2, label="moving average")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    panels[1].axhline(0.0, color="grey", lw=0.8)


def _compo(fig: Any, rows: list[dict], metrics: Mapping[str, Any]) -> None:
    t = [row["iteration"] for row in rows]
    applied = [bool(row.get("applied")) for row in rows]
    n_applied = sum(applied)
    from matplotlib.ticker import MaxNLocator

    fig.suptitle(f"ComPO: {len(rows)} iterations, step applied in {n_applied}")
    frac_ax, decisive_ax, step_ax = fig.subplots(3, 1, sharex=True)

    frac = [_number(row.get("frac")) for row in rows]
    frac_ax.plot(t, frac, color="tab:blue", lw=1, label="frac (measured)")
    frac_ax.scatter(
        [x for x, a in zip(t, applied, strict=True) if a],
        [f for f, a in zip(frac, applied, strict=True) if a],
        color="tab:blue", s=14, zorder=3, label="step applied",
    )  # fmt: skip
    predicted = [_number(row.get("frac_predicted")) for row in rows]
    if any(p == p for p in predicted):  # NaN != NaN: the limit was not traced
        frac_ax.plot(
            t, predicted, color="tab:orange", ls="--", lw=1, label="likelihood oracle, r -> 0"
        )
    frac_ax.set_ylabel("frac")
    frac_ax.set_title("share of decisive perturbations judged better")
    frac_ax.set_ylim(-0.02, 1.02)

    def share(row: dict) -> float:
        m = row.get("m") or 0
        return (row.get("n_better", 0) + row.get("n_worse", 0)) / m if m else float("nan")

    decisive_ax.plot(t, [share(row) for row in rows], color="tab:purple", lw=1, marker=".")
    decisive_ax.set_ylabel("decisive share")
    decisive_ax.set_title(
        f"share of verdicts that were not ties (run: {_shown(metrics.get('compo.decisive_share'))})"
    )
    decisive_ax.set_ylim(-0.02, 1.02)

    step_ax.bar(t, [_number(row.get("step")) for row in rows], color="tab:green", width=0.8)
    step_ax.set_ylabel("step applied")
    step_ax.set_title("step size applied (0: skipped)")
    step_ax.set_xlabel("iteration")
    step_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (frac_ax, decisive_ax, step_ax):
        ax.grid(alpha=0.3)
    frac_ax.legend(loc="best", fontsize="small")


def _logp(fig: Any, rows: list[dict]) -> None:
    # The change against the starting value, not after against before: shifts of a few nats
    # vanish on axes spanning the log-probs of short and long replies (hundreds of nats).
    sides = [s for s in ("clean", "ambiguous") if any(r["side"] == s for r in rows)]
    fig.suptitle("log pi(y|x) of each pair: after - before training (below 0: probability lost)")
    axes = fig.subplots(1, len(sides), squeeze=False)[0]
    for ax, side in zip(axes, sides, strict=True):
        mine = [r for r in rows if r["side"] == side]
        shifts = {}
        for key, color, label in (
            ("chosen", CHOSEN, "y+ chosen"),
            ("rejected", REJECTED, "y- rejected"),
        ):
            before = [r[f"logp_{key}_before"] for r in mine]
            shift = [r[f"logp_{key}_after"] - b for r, b in zip(mine, before, strict=True)]
            shifts[key] = shift
            ax.scatter(
                before, shift, s=10, alpha=0.6, color=color,
                label=f"{label}: mean {sum(shift) / len(shift):+.3g}",
                rasterized=len(mine) > 2000,
            )  # fmt: skip
        both = sum(
            c < 0 and r < 0 for c, r in zip(shifts["chosen"], shifts["rejected"], strict=True)
        )
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{side} pairs (n={len(mine)}; both replies lost: {both / len(mine):.0%})")
        ax.set_xlabel("log pi(y|x) before")
        ax.set_ylabel("log pi(y|x) after - before")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")


def _shown(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _plans(run_dir: Path, metrics: Mapping[str, Any]) -> dict[str, tuple[Any, str | None]]:
    """``name -> (draw function or None, why not)`` for every picture this module knows."""
    plans: dict[str, tuple[Any, str | None]] = {}
    for phase in PHASES:
        rows = _rows(run_dir / "trace" / f"{phase}.jsonl")
        if f"{phase}.total_steps" in metrics and rows:
            # (bound now: the loop rebinds phase and rows)
            plans[phase] = (lambda fig, p=phase, r=rows: _first_order(fig, p, r, metrics), None)
        elif phase == "dpo":  # (the SFT step is optional: its absence needs no note)
            plans[phase] = (None, metrics.get("dpo.skipped_reason", "dpo=none"))
    steps = _rows(run_dir / "trace" / "compo.jsonl")
    if "compo.n_iterations" in metrics and steps:
        plans["compo"] = (lambda fig: _compo(fig, steps, metrics), None)
    elif "compo.n_iterations" in metrics:  # ran, but its trace was deleted before a resume
        plans["compo"] = (None, "trace/compo.jsonl holds no rows")
    else:
        plans["compo"] = (None, metrics.get("compo.skipped_reason", "optimizer=none"))
    pairs = _rows(run_dir / "eval_pairs.jsonl")
    if "eval.after.n_pairs" in metrics and pairs:
        plans["logp"] = (lambda fig: _logp(fig, pairs), None)
    elif "eval.before.n_examples" in metrics:  # KTO's data: no pair's two replies to draw
        plans["logp"] = (None, "unpaired examples: the picture needs pairs")
    elif "eval.before.n_pairs" not in metrics:
        plans["logp"] = (None, "eval=none")
    else:
        plans["logp"] = (None, "the model did not change: no eval.after")
    return plans


SIZES = {"sft": (11, 4), "dpo": (11, 4), "compo": (9, 9), "logp": (11, 5)}


def draw(run_dir: str | Path, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Draws this run's pictures into ``<run_dir>/plots/`` and logs their paths.

    Args:
        run_dir: The run dir (traces and ``eval_pairs.jsonl`` are read from it).
        metrics: This run's metrics so far (which stages ran).

    Returns:
        ``written`` (paths relative to the run dir) and ``skipped.<name>`` (why not) metrics.
    """
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    plans = _plans(run_dir, metrics)
    result: dict[str, Any] = {"written": []}
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("plots: matplotlib is not installed, no plots/ (pip install matplotlib)")
        plans = {name: (None, "matplotlib is not installed") for name in plans}
    for name, (plot, reason) in plans.items():
        path = out / f"{name}.png"
        if plot is not None:
            try:
                fig = Figure(figsize=SIZES[name], layout="constrained")
                plot(fig)
                png = io.BytesIO()
                fig.savefig(png, format="png", dpi=100)
                atomic_write_bytes(path, png.getvalue())
                result["written"].append(str(path.relative_to(run_dir)))
                continue
            except Exception as exc:  # a picture must not cost the run its metrics.json
                reason = f"failed: {type(exc).__name__}: {exc}"
                log.warning("plots: %s.png %s", name, reason)
        path.unlink(missing_ok=True)  # an earlier run's picture would pass for this run's
        if not reason.startswith(("failed", "matplotlib")):
            log.info("plots: no %s.png (%s)", name, reason)
        result[f"skipped.{name}"] = reason
    if result["written"]:
        log.info("plots: %s", ", ".join(str(run_dir / p) for p in result["written"]))
    return result
