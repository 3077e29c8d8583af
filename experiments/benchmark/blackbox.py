"""Black-box oracles on SmolLM2: does ComPO learn from a judge that only sees text?

The benchmark's hidden utility U (``utility.py``) serves strictly as a black-box scorer: the
oracles see its scores or comparisons of generated text, never its parts. Training uses the 106
training prompts of ``responses.jsonl``; evaluation uses all 40 held-out prompts.

Steps (repository root)::

    python experiments/benchmark/blackbox.py data          # data/train_prompts.jsonl (committed)
    OMP_NUM_THREADS=1 compo -m +experiment=bb_sample_scored seed=0,1,2 ...
    OMP_NUM_THREADS=1 python experiments/benchmark/blackbox.py eval multirun/bb-*   # per run dir
    python experiments/benchmark/blackbox.py report multirun/bb-* --out experiments/results/blackbox

``data`` writes one pair per training prompt: its best and worst sampled response by U (gap at
least 0.02), in a fixed shuffled order. The black-box arms use only its prompts; the first-order
reference (DPO on pairs labelled by the same scorer) trains on it: 4 scorer calls per prompt.
A run that applied no step has no checkpoint; its answers are the starting model's.

``eval`` answers every held-out prompt greedily and with ``--samples`` sampled answers (the same
seeded sampling streams for every model, ``experiments/generation.py``) and scores them with U.
A comparison is a (prompt, slot) pair: the policy's greedy answer against the starting model's,
sample k against sample k. ``report`` gives per arm: scorer calls, wall minutes, decisive share,
win rate against the starting model (ties one half), the length-adjusted win rate
(:func:`compo.evaluate.length_controlled_win_rate`: logistic regression on the tanh-scaled word
difference evaluated at zero difference; this is *not* AlpacaEval's LC, which also models
instruction difficulty), mean words and mean change of U, each with a 95% bootstrap interval
over held-out prompts (the same resampled prompts for every seed of an arm, so the interval is for
the mean over the arm's seeds), and every seed's own value.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compo.evaluate import length_controlled_win_rate, outcomes
from compo.rundir import atomic_write_json, atomic_write_text, write_jsonl
from experiments.benchmark.simulate import DATA, read_jsonl
from experiments.benchmark.utility import words

log = logging.getLogger("benchmark.blackbox")
TIE_EPS = 1e-4  # as heldout.py: the encoder's padding moves identical answers by ~1e-6
MIN_GAP = 0.02
RESULTS = Path("experiments/results/blackbox")


# ---------------------------------------------------------------------- data
def make_train_prompts(out: Path) -> int:
    """One pair per training prompt: best vs worst response by U (gap >= MIN_GAP)."""
    rows = []
    for r in read_jsonl(DATA / "responses.jsonl"):
        if r["split"] != "train":
            continue
        u = r["utility"]
        best, worst = max(range(len(u)), key=u.__getitem__), min(range(len(u)), key=u.__getitem__)
        if u[best] - u[worst] < MIN_GAP or r["responses"][best] == r["responses"][worst]:
            continue
        rows.append(
            {
                "id": f"{r['prompt_id']}-bw",
                "prompt": r["prompt"],
                "chosen": r["responses"][best],
                "rejected": r["responses"][worst],
                "prompt_id": r["prompt_id"],
                "true_margin": round(u[best] - u[worst], 6),
                "scorer_calls": len(u),
            }
        )
    # A fixed shuffle: any prefix (an arm's first iterations) mixes the prompt categories.
    random.Random(0).shuffle(rows)
    write_jsonl(out, rows)
    return len(rows)


# ---------------------------------------------------------------------- eval
def answers(model, tokenizer, prompts, samples: int, max_new_tokens: int) -> list[list[str]]:
    """Per prompt: [greedy, sample 1..samples] (the seeded streams of experiments/generation)."""
    from experiments.generation import generate

    greedy = generate(model, tokenizer, prompts, 1, max_new_tokens, False, 0)
    sampled = generate(model, tokenizer, prompts, samples, max_new_tokens, True, 0, batch_rows=16)
    return [[g[0][0]] + [a for a, _ in s] for g, s in zip(greedy, sampled, strict=True)]


def score_answers(utility, prompts, texts: list[list[str]]) -> list[list[float]]:
    flat_p = [p for p, row in zip(prompts, texts, strict=True) for _ in row]
    flat = utility(flat_p, [t for row in texts for t in row])
    out, i = [], 0
    for row in texts:
        out.append(flat[i : i + len(row)])
        i += len(row)
    return out


def evaluate_dirs(paths: list[Path], samples: int, max_new_tokens: int, force: bool) -> None:
    from compo.models import EmbeddedSmolLM2, PretrainedModel
    from experiments.benchmark.heldout import run_dirs
    from experiments.benchmark.utility import HiddenUtility

    rows = [r for r in read_jsonl(DATA / "responses.jsonl") if r["split"] == "heldout"]
    prompts = [r["prompt"] for r in rows]
    utility = HiddenUtility()
    base_file = RESULTS / f"base_answers_s{samples}_t{max_new_tokens}.json"
    if not base_file.exists():
        model, tokenizer = EmbeddedSmolLM2().load()
        texts = answers(model, tokenizer, prompts, samples, max_new_tokens)
        atomic_write_json(
            base_file,
            {"prompt_ids": [r["prompt_id"] for r in rows], "answers": texts,
             "utility": score_answers(utility, prompts, texts)},
        )  # fmt: skip
        log.info("starting model's answers: %s", base_file)
    for run in run_dirs(paths) if paths else []:
        done = run / "blackbox_eval.json"
        if done.exists() and not force:
            log.info("%s: already evaluated", run)
            continue
        model, tokenizer = PretrainedModel(str(run / "checkpoint")).load()
        texts = answers(model, tokenizer, prompts, samples, max_new_tokens)
        atomic_write_json(
            done,
            {"base": str(base_file), "answers": texts,
             "utility": score_answers(utility, prompts, texts)},
        )  # fmt: skip
        log.info("%s: evaluated", run)


# ---------------------------------------------------------------------- report
def comparisons(run_eval: dict, base: dict, prompts: list[int]):
    """(policy U, base U, policy words, base words) over the (prompt, slot) pairs of ``prompts``."""
    pu, bu, pw, bw = [], [], [], []
    for j in prompts:
        for k, (a, b) in enumerate(zip(run_eval["answers"][j], base["answers"][j], strict=True)):
            pu.append(run_eval["utility"][j][k])
            bu.append(base["utility"][j][k])
            pw.append(len(words(a)))
            bw.append(len(words(b)))
    return pu, bu, pw, bw


def metrics_of(run_eval: dict, base: dict, prompts: list[int]) -> dict[str, float]:
    pu, bu, pw, bw = comparisons(run_eval, base, prompts)
    wins = outcomes(np.asarray(pu), np.asarray(bu), TIE_EPS)
    return {
        "win_rate": float(wins.mean()),
        "len_adj_win_rate": length_controlled_win_rate(pu, bu, pw, bw, tie_eps=TIE_EPS),
        "mean_words": sum(pw) / len(pw),
        "delta_utility": (sum(pu) - sum(bu)) / len(pu),
    }


def bootstrap(evals: list[dict], base: dict, reps: int, seed: int = 0) -> dict[str, tuple]:
    """Mean over seeds and its 95% interval, resampling held-out prompts (same draw per seed)."""
    n = len(base["answers"])
    rng = random.Random(seed)
    point = [metrics_of(e, base, list(range(n))) for e in evals]
    keys = list(point[0])
    draws = {k: [] for k in keys}
    for _ in range(reps):
        sample = [rng.randrange(n) for _ in range(n)]
        per_seed = [metrics_of(e, base, sample) for e in evals]
        for k in keys:
            draws[k].append(sum(m[k] for m in per_seed) / len(per_seed))
    out = {}
    for k in keys:
        values = sorted(draws[k])
        lo, hi = values[int(0.025 * reps)], values[int(0.975 * reps) - 1]
        out[k] = (sum(m[k] for m in point) / len(point), lo, hi, [m[k] for m in point])
    return out


def report(paths: list[Path], out: Path, reps: int) -> str:
    from omegaconf import OmegaConf

    arms: dict[str, list[tuple[Path, dict, dict]]] = {}
    runs = sorted({m.parent for path in paths for m in path.rglob("metrics.json")})
    base_files = sorted(RESULTS.glob("base_answers_*.json"))
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        if "run.seconds" not in metrics:
            log.warning("%s: unfinished run: left out", run)
            continue
        if (run / "checkpoint").is_dir() and not (run / "blackbox_eval.json").exists():
            log.warning("%s: not evaluated (run the eval step): left out", run)
            continue
        if not (run / "checkpoint").is_dir():
            # Nothing was applied: the model is the starting model, its answers are the base's.
            base_file = base_files[0]
            evaluated = json.loads(base_file.read_text()) | {"base": str(base_file)}
        else:
            evaluated = json.loads((run / "blackbox_eval.json").read_text())
        cfg = OmegaConf.load(run / "config.yaml")
        arm = run.parent.name  # multirun/bb/<arm>/seed<s>: the runner's layout names the arm
        if cfg.bench.get("scorer_calls") is not None:  # spent before the run (labelled data)
            metrics["oracle.judge.texts_scored"] = cfg.bench.scorer_calls
        arms.setdefault(arm, []).append((run, metrics, evaluated))
    lines = [
        "| arm | seeds | scorer calls | minutes | decisive share | steps applied "
        "| win rate [95% CI] "
        "| length-adj. win rate [95% CI] | mean words | Δ utility [95% CI] | win rate per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for arm, runs in sorted(arms.items()):
        base = json.loads(Path(runs[0][2]["base"]).read_text())
        stats = bootstrap([e for _, _, e in runs], base, reps)

        def avg(key: str, runs=runs):
            values = [m.get(key) for _, m, _ in runs if m.get(key) is not None]
            return sum(values) / len(values) if values else None

        calls = avg("oracle.judge.texts_scored")
        decisive = avg("compo.decisive_share")
        applied = avg("compo.n_applied")
        minutes = avg("run.seconds")

        def cell(key: str, digits: int = 3, stats=stats) -> str:
            mean, lo, hi, _ = stats[key]
            return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

        per_seed = " ".join(f"{v:.3f}" for v in stats["win_rate"][3])

        def num(value, fmt: str) -> str:
            return "n/a" if value is None else format(value, fmt)

        lines.append(
            f"| {arm} | {len(runs)} | {num(calls, '.0f')} | {num(minutes and minutes / 60, '.1f')} "
            f"| {num(decisive, '.2f')} | {num(applied, '.1f')} | {cell('win_rate')} | "
            f"{cell('len_adj_win_rate')} | {stats['mean_words'][0]:.1f} | "
            f"{cell('delta_utility')} | {per_seed} |"
        )
        summary[arm] = {
            "runs": [str(r) for r, _, _ in runs],
            "scorer_calls": calls,
            "minutes": None if minutes is None else minutes / 60,
            "decisive_share": decisive,
            "n_applied": applied,
            **{k: {"mean": v[0], "ci95": [v[1], v[2]], "per_seed": v[3]} for k, v in stats.items()},
        }
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    training_curves(arms, out)
    atomic_write_text(out / "results.md", table)
    atomic_write_json(out / "results.json", summary)
    return table


def training_curves(arms: dict, out: Path, window: int = 10) -> Path | None:
    """Mean U of the policy's own samples per iteration (sample-scored arms) against scorer calls
    and minutes: the training-time signal, measured on each iteration's training prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn = 0
    for arm, runs in sorted(arms.items()):
        for run, _, _ in runs:
            oracle_rows = run / "trace" / "oracle.jsonl"
            if not oracle_rows.exists():
                continue
            rows = [json.loads(x) for x in oracle_rows.read_text().splitlines()]
            rows = [r for r in rows if "scores" in r]
            steps = [
                json.loads(x) for x in (run / "trace" / "compo.jsonl").read_text().splitlines()
            ]
            if not rows:
                continue
            means = [sum(map(sum, r["scores"])) / sum(map(len, r["scores"])) for r in rows]
            calls, total = [], 0
            for r in rows:
                total += sum(map(len, r["scores"]))
                calls.append(total)
            minutes, elapsed = [], 0.0
            for r in steps[: len(rows)]:
                elapsed += r["seconds"] / 60
                minutes.append(elapsed)
            smooth = [
                sum(means[max(0, i - window + 1) : i + 1])
                / len(means[max(0, i - window + 1) : i + 1])
                for i in range(len(means))
            ]
            label = f"{arm} ({run.name})"
            axes[0].plot(calls, smooth, label=label)
            axes[1].plot(minutes[: len(smooth)], smooth[: len(minutes)], label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_xlabel("scorer calls")
    axes[1].set_xlabel("minutes (training)")
    axes[0].set_ylabel(f"mean U of own samples (moving avg. {window})")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write data/train_prompts.jsonl")
    d.add_argument("--out", type=Path, default=DATA / "train_prompts.jsonl")
    e = sub.add_parser("eval", help="held-out answers and U of run dirs")
    e.add_argument("paths", type=Path, nargs="*")
    e.add_argument("--base-only", action="store_true", help="only the starting model's answers")
    e.add_argument("--samples", type=int, default=3, help="sampled answers per prompt")
    e.add_argument("--max-new-tokens", type=int, default=48)
    e.add_argument("--force", action="store_true")
    r = sub.add_parser("report", help="the results table")
    r.add_argument("paths", type=Path, nargs="+")
    r.add_argument("--out", type=Path, default=RESULTS)
    r.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    args = p.parse_args(argv)
    if args.command == "data":
        print(f"{make_train_prompts(args.out)} pairs -> {args.out}")
    elif args.command == "eval":
        evaluate_dirs(args.paths, args.samples, args.max_new_tokens, args.force)
    else:
        print(report(args.paths, args.out, args.reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
