"""Step 5 of the benchmark: multirun dirs -> a markdown table and PNG plots.

    python experiments/benchmark/aggregate.py multirun/<date>/<time> --out experiments/results/

Every job dir below the given paths with a ``metrics.json`` and a ``config.yaml`` counts; its arm,
noise rate and seed come from the resolved config (``bench.arm``, ``bench.noise``, ``seed``; a
run with ``bench.variant`` set, e.g. by a step-size sweep, is the arm "<arm> [<variant>]"), its
numbers from ``metrics.json`` and, when present, ``heldout_metrics.json``. Per arm x noise rate the
table gives mean ± std (sample std; the mean alone for one seed; "n/a" when a metric is missing)
over seeds; the number of seeds is in the table. A second table gives paired differences
(``CONTRASTS``: e.g. dpo_compo - dpo_clean on the same noise rate and seed). Jobs evaluated with
per-prompt answers (``heldout.py``'s ``heldout_generations.jsonl``, next to the starting model's in
``--base``) also get the tables with 95% intervals over seeds and prompts
(:mod:`experiments.benchmark.intervals`). Writes ``results.md``, ``runs.csv`` (one row per job)
and ``*.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.benchmark import intervals

# (column title, metric key); the order of the table.
COLUMNS = [
    ("greedy win rate", "heldout.win_rate"),
    ("length-adj. win rate", "heldout.length_adjusted_win_rate"),
    ("mean words", "heldout.mean_words"),
    ("Δ utility", "heldout.delta_utility"),
    ("held-out acc", "heldout.accuracy"),
    ("held-out margin", "heldout.margin_mean"),
    ("amb. Δlogπ(y+)", "ambiguous.delta_logp_chosen"),
    ("amb. Δlogπ(y-)", "ambiguous.delta_logp_rejected"),
    ("n clean", "split.n_clean"),
    ("n amb.", "split.n_ambiguous"),
    ("minutes", "run.minutes"),
]
# The paper's Table 3: log-probabilities on the ambiguous pairs before and after training.
DISPLACEMENT_COLUMNS = [
    ("n pairs", "ambiguous.n_pairs"),
    ("logπ(y+) before", "ambiguous.before.logp_chosen"),
    ("logπ(y+) after", "ambiguous.after.logp_chosen"),
    ("logπ(y-) before", "ambiguous.before.logp_rejected"),
    ("logπ(y-) after", "ambiguous.after.logp_rejected"),
    ("frac y+ down", "ambiguous.frac_chosen_down"),
    ("frac both down", "ambiguous.frac_both_down"),
]
# The split/ComPO arms, then the rest of the first-order family on the same pairs
# (configs/experiment/bench_<arm>.yaml).
FAMILY = [
    "dpo_rpo_all",
    "dpo_ld_all",
    "kto_all",
    "cpo_all",
    "orpo_all",
    "sft_all",
    "contrast_sft_all",
]
ARM_ORDER = [
    "dpo_all",
    "dpo_clean",
    "dpo_compo",
    "dpo_compo_judge",
    "simpo_clean",
    "simpo_compo",
    *FAMILY,
]
# Paired contrasts (arm, baseline): differences taken within one (noise, seed), i.e. on the same
# click-noise draw, so the draw's own variance cancels. Each answers one question of the study.
CONTRASTS = [
    ("dpo_clean", "dpo_all"),  # does dropping the ambiguous pairs help DPO?
    ("dpo_compo", "dpo_clean"),  # does ComPO on the ambiguous pairs add anything?
    ("dpo_compo", "dpo_all"),  # does the whole recipe beat DPO on every pair? (the goal)
    ("dpo_compo_judge", "dpo_compo"),  # what is a judge's label worth over the click's?
    ("dpo_compo_judge", "dpo_all"),  # the recipe with a black-box judge on the ambiguous pairs
    ("simpo_clean", "dpo_clean"),  # is SimPO the better first-order stage on the clean pairs?
    ("simpo_compo", "simpo_clean"),  # does ComPO add anything on top of SimPO?
    ("simpo_compo", "dpo_all"),  # the recipe with SimPO first against DPO on every pair
    # does another first-order loss do better than DPO on the same noisy pairs?
    *((arm, "dpo_all") for arm in FAMILY),
]
CONTRAST_COLUMNS = [
    ("greedy win rate", "heldout.win_rate"),
    ("length-adj. win rate", "heldout.length_adjusted_win_rate"),
    ("Δ utility", "heldout.delta_utility"),
    ("mean words", "heldout.mean_words"),
    ("held-out margin", "heldout.margin_mean"),
    ("amb. Δlogπ(y+)", "ambiguous.delta_logp_chosen"),
    ("amb. Δlogπ(y-)", "ambiguous.delta_logp_rejected"),
]


def _config_value(text: str, dotted: str):
    """A value of the resolved ``config.yaml`` (read with OmegaConf when available)."""
    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.create(text), dotted)


def _label(arm: str, variant: str | None) -> str:
    return arm if variant is None else f"{arm} [{variant}]"


def collect(paths: list[Path]) -> list[dict]:
    """One record per job dir: arm, noise, seed and every metric."""
    records = []
    for root in paths:
        for metrics_path in sorted(root.rglob("metrics.json")):
            job = metrics_path.parent
            config = job / "config.yaml"
            if not config.is_file():
                continue
            text = config.read_text(encoding="utf-8")
            arm = _config_value(text, "bench.arm")
            if arm is None:
                continue
            variant = _config_value(text, "bench.variant")
            record = {
                "job": str(job),
                "arm": arm,
                "variant": variant,
                "label": _label(arm, variant),
                "noise": _config_value(text, "bench.noise"),
                "seed": _config_value(text, "seed"),
            }
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            heldout = job / "heldout_metrics.json"
            if heldout.is_file():
                metrics |= json.loads(heldout.read_text(encoding="utf-8"))
            if "heldout.lc_win_rate" in metrics:  # the first benchmark's name for it
                metrics.setdefault(
                    "heldout.length_adjusted_win_rate", metrics["heldout.lc_win_rate"]
                )
            if "run.seconds" in metrics:
                metrics["run.minutes"] = metrics["run.seconds"] / 60
            if "heldout.mean_utility" in metrics and "heldout.base_mean_utility" in metrics:
                # utility gained over the starting model's greedy answers (same prompts)
                base = metrics["heldout.base_mean_utility"]
                metrics["heldout.delta_utility"] = metrics["heldout.mean_utility"] - base
            record |= {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            records.append(record)
    return records


def summarise(values: list[float]) -> tuple[float, float] | None:
    """(mean, sample std; 0 for one value), or None without values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float | None], signed: bool = False) -> str:
    """A table cell: "mean ± std", the mean alone for one value (no spread), "n/a" for none.

    When some runs lack the metric (e.g. not evaluated yet), "(n=k)" says how many it covers.
    ``signed`` cells (differences) also count the positive and negative ones, "[2+ 1-]" (the rest
    are exact ties): with three seeds the sign agreement says more than the spread.
    """
    valid = [v for v in values if v is not None and math.isfinite(v)]
    stat = summarise(valid)
    if stat is None:
        return "n/a"
    n = len(valid)
    text = f"{stat[0]:+.3f}" if signed else f"{stat[0]:.3f}"
    if n > 1:
        text += f" ± {stat[1]:.3f}"
        if signed:
            text += f" [{sum(v > 0 for v in valid)}+ {sum(v < 0 for v in valid)}-]"
    return text if n == len(values) else f"{text} (n={n})"


def groups(records: list[dict]) -> dict[tuple[str, float], list[dict]]:
    """Records by (label, noise): arms in the benchmark's order, variants after, noise ascending."""
    out: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        out.setdefault((r["label"], r["noise"]), []).append(r)
    rank = {a: i for i, a in enumerate(ARM_ORDER)}

    def order(item):
        (label, noise), rows = item
        return rank.get(rows[0]["arm"], len(rank)), label, noise

    return dict(sorted(out.items(), key=order))


def table(records: list[dict], columns=COLUMNS, signed: bool = False) -> str:
    """A markdown table of ``columns``: mean ± std over seeds per arm x noise rate.

    ``signed`` is for records of differences (:func:`paired`): signs shown, positives counted.
    """
    head = ["arm - baseline" if signed else "arm", "ε", "seeds"]
    head += [title for title, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, noise), rows in groups(records).items():
        cells = [label, f"{noise}", str(len(rows))]
        for _, key in columns:
            cells.append(cell([r.get(key) for r in rows], signed=signed))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired(records: list[dict], contrasts=CONTRASTS, keys=None) -> list[dict]:
    """Per-seed differences arm - baseline, as records ``table`` and ``plot`` take.

    Runs are matched on (noise, seed); a variant of ``arm`` is compared with the baseline
    :func:`intervals.baseline_label` names. A seed without a matching baseline run is left out; a
    metric missing on either side is None.
    """
    keys = keys or [key for _, key in CONTRAST_COLUMNS]
    by_key = {(r["label"], r["noise"], r["seed"]): r for r in records}
    out = []
    for arm, baseline in contrasts:
        for (label, noise), rows in groups(records).items():
            if rows[0]["arm"] != arm:
                continue
            present = {name for name, n, _ in by_key if n == noise}
            base = intervals.baseline_label(label, arm, baseline, present)
            for r in rows:
                b = by_key.get((base, noise, r["seed"]))
                if b is None:
                    continue
                name = f"{label} - {base}"
                diff = {"arm": name, "label": name, "noise": noise, "seed": r["seed"]}
                for key in keys:
                    missing = r.get(key) is None or b.get(key) is None
                    diff[key] = None if missing else r[key] - b[key]
                out.append(diff)
    return out


def paired_table(records: list[dict], contrasts=CONTRASTS, columns=CONTRAST_COLUMNS) -> str:
    """A markdown table of per-seed differences arm - baseline (see :func:`paired`)."""
    return table(paired(records, contrasts, [key for _, key in columns]), columns, signed=True)


# PNG name -> panels (title, metric key[, dashed reference level]); bars: mean and sample std.
FIGURES = {
    "win_rates.png": [
        ("greedy win rate", "heldout.win_rate", 0.5),
        ("length-adj. win rate", "heldout.length_adjusted_win_rate", 0.5),
    ],
    "displacement.png": [
        ("Δ log π(y+)", "ambiguous.delta_logp_chosen"),
        ("Δ log π(y-)", "ambiguous.delta_logp_rejected"),
    ],
    "accuracy_length.png": [
        ("held-out accuracy", "heldout.accuracy"),
        ("held-out margin log π(y+) - log π(y-)", "heldout.margin_mean"),
        ("mean words", "heldout.mean_words"),
    ],
}
# The same for the paired differences (arm - baseline, same noise rate and seed).
CONTRAST_FIGURES = {
    "contrasts.png": [
        ("win rate difference", "heldout.win_rate"),
        ("held-out margin difference", "heldout.margin_mean"),
        ("amb. Δ log π(y+) difference", "ambiguous.delta_logp_chosen"),
        ("amb. Δ log π(y-) difference", "ambiguous.delta_logp_rejected"),
    ],
}


def plot(records: list[dict], out: Path, figures=FIGURES) -> list[Path]:
    """Bar charts (mean, std error bars) per arm and noise rate, one PNG per ``figures`` entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(records)
    arms = list(dict.fromkeys(label for label, _ in grouped))
    noises = sorted({noise for _, noise in grouped})
    written = []
    for name, panels in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8))
        for ax, (title, key, *reference) in zip(axes, panels, strict=True):
            width = 0.8 / max(1, len(noises))
            for j, noise in enumerate(noises):
                stats = [summarise([r.get(key) for r in grouped.get((a, noise), [])]) for a in arms]
                xs = [i + j * width for i in range(len(arms))]
                ys = [s[0] if s else float("nan") for s in stats]
                es = [s[1] if s else 0.0 for s in stats]
                ax.bar(xs, ys, width, yerr=es, capsize=3, label=f"noise {noise}")
            ax.set_xticks([i + width * (len(noises) - 1) / 2 for i in range(len(arms))])
            ax.set_xticklabels(arms, rotation=25, ha="right", fontsize=8)
            ax.set_title(title)
            for level in reference:
                ax.axhline(level, color="grey", lw=0.8, ls="--")
            ax.axhline(0.0, color="black", lw=0.5)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", type=Path, nargs="+", help="multirun dirs (or run dirs)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--base", type=Path, default=Path("experiments/results/base"), help="heldout.py --base dir"
    )
    args = p.parse_args(argv)
    records = collect(args.paths)
    if not records:
        print("aggregate: error: no job dir with metrics.json and bench.arm found", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    md = table(records) + "\nLikelihood displacement on the ambiguous training pairs:\n\n"
    md += table(records, DISPLACEMENT_COLUMNS)
    md += "\nPaired differences (same noise rate and seed, i.e. the same click-noise draw):\n\n"
    md += paired_table(records)
    base = intervals.read_rows(args.base / "heldout_generations.jsonl")
    if base is not None:
        md += intervals.tables(records, base, ARM_ORDER, CONTRASTS) or ""
    (args.out / "results.md").write_text(md, encoding="utf-8")
    keys = sorted({k for r in records for k in r})
    with open(args.out / "runs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
    if not args.no_plots:
        plot(records, args.out)
        differences = paired(records)
        if differences:
            plot(differences, args.out, CONTRAST_FIGURES)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
