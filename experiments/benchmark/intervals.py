"""The benchmark's tables with 95% intervals, from every job's per-prompt answers.

``heldout.py`` writes each job's answers (greedy + sampled, per held-out prompt) with their hidden
utility U and length to ``heldout_generations.jsonl``, and the starting model's to the base dir.
Here they become (seed, prompt, answer) cells per arm and noise model, and every number gets a
two-way bootstrap interval over seeds and prompts (:mod:`experiments.benchmark.stats`):

* win rate against the starting model (every answer; greedy alone), ties one half;
* the length-adjusted win rate (:func:`compo.evaluate.length_controlled_win_rate` over every
  answer: the win rate at zero length difference; not AlpacaEval's LC, which also fits an
  instruction-difficulty term over many models);
* mean utility gained over the starting model, and mean words;
* on the ambiguous training pairs (one number per job, so the interval resamples seeds only): the
  share of pairs whose log pi(y+) rose while log pi(y-) fell, and the mean changes.

Paired contrasts (arm minus baseline arm) are taken cell by cell on the same noise model, seed,
prompt and answer index before resampling. A contrast whose interval excludes 0 is marked ``*``.
"""

from __future__ import annotations

import json
from collections.abc import Container, Sequence
from pathlib import Path

import numpy as np

from compo.evaluate import length_controlled_win_rate, outcomes
from experiments.benchmark.stats import Interval, mean_of, two_way_bootstrap

TIE_EPS = 1e-4  # as heldout.py: utilities closer than this are a tie
# The length-adjusted win rate refits a logistic regression per resample: fewer resamples.
LA_RESAMPLES = 500


def read_rows(path: Path) -> list[dict] | None:
    """The per-prompt answer rows of a job (None when it was not evaluated by heldout.py v2)."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return rows if rows and "answers" in rows[0] else None


def matrix(rows: list[dict], key: str) -> np.ndarray:
    """(prompts, answers) array of ``key`` (utility or words)."""
    return np.asarray([r[key] for r in rows], dtype=np.float64)


def arm_cells(records: list[dict], base: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{(label, noise): {seed: {"u", "w"} (prompts, answers) arrays}} of the evaluated jobs."""
    prompts = [r["prompt_id"] for r in base]
    out: dict[tuple, dict[int, dict]] = {}
    for record in records:
        rows = read_rows(Path(record["job"]) / "heldout_generations.jsonl")
        if rows is None:
            continue
        if [r["prompt_id"] for r in rows] != prompts:
            raise SystemExit(f"{record['job']}: evaluated on other prompts than the base")
        cells = {"u": matrix(rows, "utility"), "w": matrix(rows, "words")}
        out.setdefault((record["label"], record["noise"]), {})[record["seed"]] = cells
    return out


def stacked(by_seed: dict[int, dict], base: list[dict], seeds: Sequence[int]) -> dict:
    """(seeds, prompts, answers) arrays of a group, with the base's broadcast alongside."""
    u = np.stack([by_seed[s]["u"] for s in seeds])
    shape = u.shape
    return {
        "u": u,
        "w": np.stack([by_seed[s]["w"] for s in seeds]),
        "bu": np.broadcast_to(matrix(base, "utility"), shape).copy(),
        "bw": np.broadcast_to(matrix(base, "words"), shape).copy(),
    }


def win_rate(cells: dict) -> float:
    return float(np.mean(outcomes(cells["u"], cells["bu"], TIE_EPS)))


def greedy_win_rate(cells: dict) -> float:
    return float(np.mean(outcomes(cells["u"][:, :, 0], cells["bu"][:, :, 0], TIE_EPS)))


def length_adjusted(cells: dict) -> float:
    flat = [cells[k].ravel().tolist() for k in ("u", "bu", "w", "bw")]
    return length_controlled_win_rate(*flat, tie_eps=TIE_EPS)


def delta_utility(cells: dict) -> float:
    return float(np.mean(cells["u"] - cells["bu"]))


def per_seed(records: list[dict], key: str, seeds: Sequence[int]) -> Interval:
    """A per-job metric's mean over seeds with a bootstrap interval over seeds."""
    by_seed = {r["seed"]: r.get(key) for r in records}
    values = [by_seed.get(s) for s in seeds]
    if any(v is None or not np.isfinite(v) for v in values) or not values:
        return Interval(float("nan"), float("nan"), float("nan"))
    return two_way_bootstrap({"v": np.asarray(values, dtype=np.float64)[:, None]}, mean_of("v"))


ARM_COLUMNS = [
    ("win rate", win_rate, False),
    ("greedy win rate", greedy_win_rate, False),
    ("length-adj. win rate", length_adjusted, False),
    ("Δ utility", delta_utility, True),
    ("mean words", mean_of("w"), False),
]
SEED_COLUMNS = [
    ("amb. y+ up & y- down", "ambiguous.frac_up_down"),
    ("amb. better up & worse down", "ambiguous.frac_better_up_worse_down"),
    ("amb. Δlogπ(y+)", "ambiguous.delta_logp_chosen"),
    ("amb. Δlogπ(y-)", "ambiguous.delta_logp_rejected"),
]


def tables(
    records: list[dict],
    base: list[dict],
    order: Sequence[str],
    contrasts: Sequence[tuple[str, str]],
) -> str | None:
    """Both tables in markdown (the answer files read once), or None when no job has answers."""
    groups = arm_cells(records, base)
    if not groups:
        return None
    return (
        "\nWith 95% intervals (two-way bootstrap over seeds and held-out prompts):\n\n"
        + arm_table(groups, records, base, order)
        + "\nPaired contrasts, cell by cell (* : the interval excludes 0):\n\n"
        + contrast_table(groups, base, contrasts)
    )


def arm_table(
    groups: dict[tuple, dict[int, dict]],
    records: list[dict],
    base: list[dict],
    order: Sequence[str],
) -> str:
    """One row per arm x noise model (``groups`` from :func:`arm_cells`) with intervals."""
    head = ["arm", "noise", "seeds", *(c[0] for c in ARM_COLUMNS), *(c[0] for c in SEED_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = {arm: i for i, arm in enumerate(order)}
    for (label, noise), by_seed in sorted(
        groups.items(), key=lambda kv: (rank.get(kv[0][0].split(" ")[0], len(rank)), kv[0])
    ):
        seeds = sorted(by_seed)
        cells = stacked(by_seed, base, seeds)
        row = [label, str(noise), str(len(seeds))]
        for _, statistic, signed in ARM_COLUMNS:
            resamples = LA_RESAMPLES if statistic is length_adjusted else 2000
            row.append(two_way_bootstrap(cells, statistic, resamples).format(signed))
        jobs = [r for r in records if (r["label"], r["noise"]) == (label, noise)]
        for _, key in SEED_COLUMNS:
            row.append(per_seed(jobs, key, seeds).format(signed=key != SEED_COLUMNS[0][1]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def baseline_label(label: str, arm: str, baseline: str, present: Container[str]) -> str:
    """The baseline a run labelled ``label`` (``arm`` or "<arm> [<variant>]") is compared with.

    The same variant of ``baseline`` when one was run (is in ``present``), e.g. both on all pairs;
    else the plain ``baseline``, e.g. a step-size variant of ComPO against its first-order arm.
    """
    same = baseline + label.removeprefix(arm)
    return same if same in present else baseline


def contrast_table(
    groups: dict[tuple, dict[int, dict]], base: list[dict], contrasts: Sequence[tuple[str, str]]
) -> str:
    """Arm minus baseline, cell by cell on shared (noise, seed, prompt, answer), with intervals.

    A variant of ``arm`` ("<arm> [<variant>]") is compared as :func:`baseline_label` says.
    """
    head = ["arm - baseline", "noise", "seeds", "Δ win rate", "Δ greedy win rate", "Δ utility"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, baseline in contrasts:
        for (label, noise), by_seed in groups.items():
            if label != arm and not label.startswith(f"{arm} ["):
                continue
            present = {name for name, n in groups if n == noise}
            base_label = baseline_label(label, arm, baseline, present)
            if base_label not in present:
                continue
            other = groups[(base_label, noise)]
            seeds = sorted(set(by_seed) & set(other))
            if not seeds:
                continue
            a, b = stacked(by_seed, base, seeds), stacked(other, base, seeds)
            cells = {
                "win": outcomes(a["u"], a["bu"], TIE_EPS) - outcomes(b["u"], b["bu"], TIE_EPS),
                "du": a["u"] - b["u"],
            }
            columns = [
                two_way_bootstrap(cells, mean_of("win")),
                two_way_bootstrap(cells, lambda c: float(np.mean(c["win"][:, :, 0]))),
                two_way_bootstrap(cells, mean_of("du")),
            ]
            row = [f"{label} - {base_label}", str(noise), str(len(seeds))]
            row += [c.format(signed=True) + (" *" if c.excludes_zero() else "") for c in columns]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
