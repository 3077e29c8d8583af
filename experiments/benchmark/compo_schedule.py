"""What limits ComPO on the benchmark's ambiguous pairs: votes, one pair at a time, or one pass?

In the v2 benchmark (bt0.1, 5 seeds) DPO-clean + ComPO (likelihood oracle, m = 64
support-restricted directions, one iteration per ambiguous pair, one epoch) raised log pi(y+) and
lowered log pi(y-) in only ~half of the ambiguous pairs, although each update moved its own pair
the right way. This study reruns only ComPO's stage, from each seed's DPO-clean checkpoint on that
seed's ambiguous pairs (the benchmark's own files, so nothing else changes), with one setting
changed at a time (``VARIANTS``):

* estimation noise: ``estimator=expected``, the likelihood oracle's exact r -> 0 direction
  (what infinitely many votes converge to), instead of 64 votes;
* one pair at a time: ``batch_size`` pairs per iteration (per oracle query);
* one pass: ``epochs`` passes over the pairs.

Per pair it measures, against the starting model (as ``heldout.py``'s ``ambiguous.*``): y+ up
and y- down (the paper's goal, oriented by the click label) and the truly better reply up and the
worse down (oriented by the simulation's true label; 15-30% of the click labels are wrong), and the
mean changes of log pi(y+), log pi(y-). Intervals: 95% cluster bootstrap over (seed, prompt)
(``stats.cluster_bootstrap``); contrasts are per pair, against DPO-clean and against the
benchmark's ComPO setting. Command (repository root; the v2 run dirs under ``OUT``)::

    OMP_NUM_THREADS=1 python experiments/benchmark/compo_schedule.py multirun/bench2 \
        --seeds 0 1 2 3 4 --variants expected_g0.1 --heldout expected_g0.1 \
        --base-dir experiments/results/v2/base --reference-cache multirun/bench2/reference_cache \
        --out multirun/schedule

Runs land in ``<out>/runs/<variant>/seed<k>`` (a finished one is reused; results of earlier
calls with other seeds or variants join the table); the table in ``<out>/schedule.md`` and
``schedule.json``. ``dpo_clean`` and ``compo`` read the benchmark's own checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compo.data import load_pairs
from compo.encoding import encode_pairs
from compo.models import EmbeddedSmolLM2, PretrainedModel, TinyModel
from compo.reference import cached_scores
from compo.rundir import atomic_write_json
from compo.scoring import score_pairs
from experiments.benchmark.simulate import DATA
from experiments.benchmark.stats import Interval, cluster_bootstrap

log = logging.getLogger("benchmark.compo_schedule")
ROOT = Path(__file__).resolve().parents[2]
# Name -> Hydra overrides on top of the benchmark's ComPO arm (bench_dpo_compo); None: no ComPO
# stage (the DPO-clean checkpoint itself).
_EXPECTED, _B8, _E3 = "optimizer.estimator=expected", "optimizer.batch_size=8", "optimizer.epochs=3"
VARIANTS: dict[str, list[str] | None] = {
    "dpo_clean": None,
    "compo": [],
    "compo_e3": [_E3],
    "compo_b8": [_B8],
    "expected": [_EXPECTED],
    "expected_g0.1": [_EXPECTED, "optimizer.step_size=0.1"],
    "expected_g0.01": [_EXPECTED, "optimizer.step_size=0.01"],
    "expected_e3": [_EXPECTED, _E3],
    "expected_b8": [_EXPECTED, _B8],
    "expected_b8_e3": [_EXPECTED, _B8, _E3],
    # The same with a black-box judge's labels on the ambiguous pairs (bench_dpo_compo_judge: the
    # benchmark's utility U relabels each pair once, then the likelihood oracle runs on its labels).
    "judge_compo": [],
    "judge_expected_g0.1": [_EXPECTED, "optimizer.step_size=0.1"],
}
# A judge_<v> variant runs the judge arm's experiment and is labelled <v> (bench.variant), so
# aggregate.py pairs "dpo_compo_judge [<v>]" with "dpo_compo [<v>]".
JUDGE = "judge_"
BASELINES = ("dpo_clean", "compo")
# Settings that change no number of the study: no trace of the cosine to the limit direction (with
# estimator=expected it computed the limit a second time) and resume state only at the end.
FASTER = ["optimizer.trace_limit=false", "optimizer.save_every=0"]
# Variants whose checkpoints the benchmark already has: its DPO-clean arm and its ComPO arm (the
# benchmark's setting, which a rerun from the DPO-clean checkpoint reproduces bit for bit: checked
# on seed 0 with ``--rerun compo``).
REUSED = {"dpo_clean": "dpo_clean", "compo": "dpo_compo", "judge_compo": "dpo_compo_judge"}
# Per pair, against the starting model: y+ up and y- down (by the click label; the paper's goal),
# the truly better reply up and the worse down, and the mean changes (nats).
# ``own_*``: what its own ComPO updates moved each pair (the trace; the rest of its change against
# DPO-clean is what the other pairs' updates did to it).
METRICS = (
    "frac_up_down", "frac_better_up_worse_down", "delta_logp_chosen", "delta_logp_rejected",
    "own_delta_logp_chosen", "own_delta_logp_rejected",
)  # fmt: skip


def train(bench: Path, noise: str, seed: int, variant: str, run_dir: Path) -> None:
    """Runs ComPO's stage alone from the seed's DPO-clean checkpoint on its ambiguous pairs."""
    pairs = bench / "dpo_compo" / noise / f"seed{seed}" / "split" / "ambiguous.jsonl"
    start = bench / "dpo_clean" / noise / f"seed{seed}" / "checkpoint"
    for need in (pairs, start):
        if not need.exists():
            raise SystemExit(f"{need}: missing (run the benchmark's dpo_compo / dpo_clean arms)")
    judged = variant.startswith(JUDGE)
    overrides = [
        f"+experiment=bench_dpo_compo{'_judge' if judged else ''}", f"bench.noise={noise}",
        f"seed={seed}",
        "model=pretrained", f"model.name_or_path={start}",
        f"data.path={pairs}", "data.limit=null", "splitter=none", "dpo=none",
        f"optimizer.pairs_path={pairs}", f"hydra.run.dir={run_dir}",
        f"bench.variant={variant.removeprefix(JUDGE)}", *FASTER, *VARIANTS[variant],
    ]  # fmt: skip
    _run(["-m", "compo.cli", *overrides], f"{run_dir}: compo failed (see its cli.log)")


def _run(arguments: list[str], failure: str) -> None:
    """``python <arguments>`` from the repository root, one thread; ``failure`` if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, check=False).returncode:
        raise SystemExit(failure)


# heldout.py's settings on the tiny model (tests): the smoke benchmark's.
TINY_HELDOUT = [
    "--tiny", "--prompts", "4", "--samples", "1", "--max-new-tokens", "8", "--max-pairs", "8",
]  # fmt: skip


def heldout(run_dir: Path, base_dir: Path, cache_dir, tiny: bool = False) -> None:
    """The benchmark's held-out evaluation of a trained variant (``heldout.py``, ~4 min).

    The run's config names its arm (``dpo_compo``, ``dpo_compo_judge``) and its variant, so
    ``aggregate.py`` over the benchmark's OUT and these run dirs gives the variant's paired
    contrasts with DPO-clean and DPO on all pairs ("dpo_compo [<variant>] - dpo_all").
    """
    if (run_dir / "heldout_metrics.json").exists():
        return
    command = [str(ROOT / "experiments" / "benchmark" / "heldout.py"), str(run_dir)]
    command += ["--base-dir", str(base_dir)]
    command += ["--reference-cache", str(cache_dir)] if cache_dir else []
    command += TINY_HELDOUT if tiny else []
    _run(command, f"{run_dir}: heldout.py failed")


class SeedPairs:
    """One seed's ambiguous pairs, encoded, with their scores under the starting model.

    The pairs are the split file's, their metadata (true label, prompt) the source file's: split
    files written before ``PreferencePair.to_dict`` wrote metadata flat nest it one level down.
    Built once per seed: every variant of the seed is measured against the same scores.
    """

    def __init__(self, split_path: Path, model, tokenizer, cache_dir, batch_rows: int) -> None:
        from omegaconf import OmegaConf

        config = OmegaConf.load(split_path.parents[1] / "config.yaml")
        source = DATA / Path(config.data.path).name
        if not source.exists():
            raise SystemExit(f"{source}: missing; write it with experiments/benchmark/simulate.py")
        by_id = {p.id: p for p in load_pairs(source).pairs}
        self.pairs = [by_id[p.id] for p in load_pairs(split_path).pairs]
        # The benchmark's encoding (bench_base: max_length 160, max_prompt_length 96).
        self.encoded, _ = encode_pairs(self.pairs, tokenizer, 160, 96)
        self.pad, self.batch_rows = tokenizer.pad_token_id, batch_rows
        self.before = cached_scores(model, self.encoded, self.pad, batch_rows, cache_dir, None)

    def measure(self, checkpoint: Path) -> dict:
        """Per-pair changes of log pi(y+), log pi(y-) from the starting model to ``checkpoint``."""
        trained, _ = PretrainedModel(str(checkpoint)).load()
        after = score_pairs(trained, self.encoded, self.pad, batch_size=self.batch_rows)
        return {
            "pair_ids": [p.id for p in self.pairs],
            "prompt_ids": [str(p.metadata["prompt_id"]) for p in self.pairs],
            "label_correct": [bool(p.metadata["label_correct"]) for p in self.pairs],
            "d_chosen": (after[0].sum_logps - self.before[0].sum_logps).tolist(),
            "d_rejected": (after[1].sum_logps - self.before[1].sum_logps).tolist(),
        }


def trained_dir(bench: Path, out: Path, noise: str, variant: str, seed: int) -> Path:
    """Where a variant's trained run is: its own run dir once trained there (``--rerun`` or not
    reused), else the benchmark arm's it reuses (``REUSED``)."""
    run_dir = out / "runs" / variant / f"seed{seed}"
    if variant in REUSED and not (run_dir / "metrics.json").exists():
        return bench / REUSED[variant] / noise / f"seed{seed}"
    return run_dir


def own_moves(trained: Path, pair_ids: list[str]) -> dict[str, list[float]]:
    """Each pair's change in its own ComPO updates, from the run's trace (0 without a trace).

    The trace logs log pi(y+), log pi(y-) of an iteration's pairs before and after its step; what
    a pair moved in the rest of the pass (the other pairs' updates) is its net change minus this.
    A judged pair the judge flipped is traced the other way round: swapped back here.
    """
    own = {pid: [0.0, 0.0] for pid in pair_ids}
    trace = trained / "trace" / "compo.jsonl"
    if not trace.exists():
        return {"own_chosen": [0.0] * len(pair_ids), "own_rejected": [0.0] * len(pair_ids)}
    judged = trained / "judged_pairs.jsonl"
    flipped = set()
    if judged.exists():
        rows = [json.loads(line) for line in judged.read_text().splitlines()]
        flipped = {r["pair_id"] for r in rows if r["label"] == "flipped"}
    for line in trace.read_text().splitlines():
        row = json.loads(line)
        for i, pid in enumerate(row["pair_ids"]):
            moved = [
                row[f"logp_{side}_after"][i] - row[f"logp_{side}_before"][i]
                for side in ("chosen", "rejected")
            ]
            moved = moved[::-1] if pid in flipped else moved
            own[pid] = [a + b for a, b in zip(own[pid], moved, strict=True)]
    return {
        "own_chosen": [own[pid][0] for pid in pair_ids],
        "own_rejected": [own[pid][1] for pid in pair_ids],
    }


def outcomes(rows: dict) -> dict[str, np.ndarray]:
    """Per-pair indicators and changes (the study's metrics before averaging)."""
    up, down = np.array(rows["d_chosen"]) > 0, np.array(rows["d_rejected"]) < 0
    correct = np.array(rows["label_correct"])
    return {  # the keys of METRICS
        "frac_up_down": (up & down).astype(float),
        "frac_better_up_worse_down": np.where(correct, up & down, ~up & ~down).astype(float),
        "delta_logp_chosen": np.array(rows["d_chosen"]),
        "delta_logp_rejected": np.array(rows["d_rejected"]),
        "own_delta_logp_chosen": np.array(rows["own_chosen"]),
        "own_delta_logp_rejected": np.array(rows["own_rejected"]),
    }


def _pooled(runs: dict[int, dict], seeds: list[int]) -> dict[str, np.ndarray]:
    """Per-pair outcomes of ``seeds``, concatenated, with their (seed, prompt) groups."""
    parts = []
    for seed in seeds:
        groups = [f"{seed}/{prompt}" for prompt in runs[seed]["prompt_ids"]]
        parts.append(outcomes(runs[seed]) | {"group": np.array(groups)})
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def summarise(per_run: dict[str, dict[int, dict]], resamples: int) -> dict[str, dict]:
    """Per variant (on the seeds it has): each metric with its interval, and its per-pair
    contrasts to the baselines (on the seeds both have; the pairs of a seed are the same)."""
    out = {}
    for name, runs in per_run.items():
        seeds = sorted(runs)
        values = _pooled(runs, seeds)
        row: dict = {"seeds": seeds, "n_pairs": len(values["group"])}
        for key in METRICS:
            row[key] = cluster_bootstrap(
                values["group"], lambda r, v=values[key]: v[r].mean(), resamples
            )
        for base in BASELINES:
            common = sorted(set(seeds) & set(per_run.get(base, {})))
            if base == name or not common:
                continue
            mine, theirs = _pooled(runs, common), _pooled(per_run[base], common)
            for key in METRICS:
                diff = mine[key] - theirs[key]
                row[f"{key} - {base}"] = cluster_bootstrap(
                    mine["group"], lambda r, d=diff: d[r].mean(), resamples
                )
        seconds = [runs[s].get("compo_seconds") for s in seeds]
        row["compo_seconds"] = None if None in seconds else float(np.mean(seconds))
        out[name] = row
    return out


def markdown(summary: dict[str, dict]) -> str:
    """The study's tables: each variant's numbers, then its contrasts."""
    names = " | ".join(METRICS)
    lines = [
        f"| variant | seeds | pairs | {names} | ComPO s/run |",
        "|---" * (len(METRICS) + 4) + "|",
    ]
    for name, row in summary.items():
        cells = " | ".join(row[k].format() for k in METRICS)
        secs = "" if row["compo_seconds"] is None else f"{row['compo_seconds']:.0f}"
        seeds = " ".join(map(str, row["seeds"]))
        lines.append(f"| {name} | {seeds} | {row['n_pairs']} | {cells} | {secs} |")
    for base in BASELINES:
        lines += ["", f"Per-pair contrasts: variant - {base}", ""]
        lines += [f"| variant | {names} |", "|---" * (len(METRICS) + 1) + "|"]
        for name, row in summary.items():
            if f"{METRICS[0]} - {base}" in row:
                cells = " | ".join(row[f"{k} - {base}"].format(signed=True) for k in METRICS)
                lines.append(f"| {name} | {cells} |")
    lines += ["", "95% cluster bootstrap over (seed, prompt); a contrast is taken pair by pair, "
              "on the seeds both variants have."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", type=Path, help="the benchmark's OUT (dpo_clean/, dpo_compo/)")
    parser.add_argument("--noise", default="bt0.1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference-cache", default=None, help="the benchmark's reference_cache")
    parser.add_argument("--batch-rows", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument(
        "--rerun", nargs="*", default=[], choices=list(REUSED),
        help="train these variants again instead of reading the benchmark's checkpoints",
    )  # fmt: skip
    parser.add_argument(
        "--heldout", nargs="*", default=[], choices=[v for v in VARIANTS if v not in REUSED],
        help="also evaluate these variants on the held-out prompts (heldout.py; ~4 min a run)",
    )  # fmt: skip
    parser.add_argument("--base-dir", type=Path, help="the starting model's held-out answers")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model starts (tests)")
    args = parser.parse_args(argv)
    if args.heldout and (args.base_dir is None or not set(args.heldout) <= set(args.variants)):
        parser.error("--heldout needs --base-dir, and its variants among --variants")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load = lambda: " ".join(Path("/proc/loadavg").read_text().split()[:3])  # noqa: E731
    log.info("load before: %s", load())
    variants = list(dict.fromkeys([*BASELINES, *args.variants]))
    starting = None  # loaded when a result is missing
    for seed in args.seeds:  # seed-major: a stopped study has every variant on its first seeds
        split = args.bench / "dpo_compo" / args.noise / f"seed{seed}" / "split" / "ambiguous.jsonl"
        seed_pairs = None
        for variant in variants:
            run_dir = args.out / "runs" / variant / f"seed{seed}"
            result = run_dir / "schedule_pairs.json"
            if result.exists():
                continue
            started = time.perf_counter()
            own_run = variant not in REUSED or variant in args.rerun
            if own_run and not (run_dir / "metrics.json").exists():  # written last by a run
                train(args.bench, args.noise, seed, variant, run_dir)
            if starting is None:
                starting = (TinyModel() if args.tiny else EmbeddedSmolLM2()).load()
            if seed_pairs is None:
                seed_pairs = SeedPairs(split, *starting, args.reference_cache, args.batch_rows)
            trained = trained_dir(args.bench, args.out, args.noise, variant, seed)
            rows = seed_pairs.measure(trained / "checkpoint")
            rows["compo_seconds"] = json.loads((trained / "metrics.json").read_text()).get(
                "compo.seconds"
            )  # none for DPO-clean
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(result, rows)
            log.info("%s seed %d: %.0f s", variant, seed, time.perf_counter() - started)
        for variant in args.heldout:
            run_dir = args.out / "runs" / variant / f"seed{seed}"
            heldout(run_dir, args.base_dir, args.reference_cache, args.tiny)
    # Every result under --out, also of earlier calls with other seeds or variants.
    per_run: dict[str, dict[int, dict]] = {}
    for variant in VARIANTS:
        for path in sorted((args.out / "runs" / variant).glob("seed*/schedule_pairs.json")):
            seed = int(path.parent.name.removeprefix("seed"))
            rows = json.loads(path.read_text())
            trained = trained_dir(args.bench, args.out, args.noise, variant, seed)
            per_run.setdefault(variant, {})[seed] = rows | own_moves(trained, rows["pair_ids"])
    summary = summarise(per_run, args.resamples)
    table = markdown(summary)
    (args.out / "schedule.md").write_text(table, encoding="utf-8")
    plain = lambda v: v.__dict__ if isinstance(v, Interval) else v  # noqa: E731
    atomic_write_json(
        args.out / "schedule.json",
        {name: {k: plain(v) for k, v in row.items()} for name, row in summary.items()},
    )
    print(table)
    log.info("load after: %s", load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
