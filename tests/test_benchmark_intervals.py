"""The benchmark's interval tables: per-prompt answers -> two-way bootstrap tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compo.rundir import write_jsonl
from experiments.benchmark import aggregate, intervals

PROMPTS, ANSWERS = 30, 3


def answer_rows(rng, shift: float) -> list[dict]:
    """Per-prompt rows as heldout.py writes them: utilities = prompt effect + shift + noise."""
    prompt_effect = np.linspace(-0.3, 0.3, PROMPTS)
    return [
        {
            "prompt_id": f"h{p:02d}",
            "answers": ["a"] * ANSWERS,
            "utility": (prompt_effect[p] + shift + rng.normal(0, 0.1, ANSWERS)).tolist(),
            "words": rng.integers(5, 40, ANSWERS).tolist(),
        }
        for p in range(PROMPTS)
    ]


def job(
    root: Path, arm: str, seed: int, rows: list[dict], frac_up_down: float, variant: str = "null"
) -> None:
    root.mkdir(parents=True)
    bench = f"bench:\n  arm: {arm}\n  noise: bt0.1\n  variant: {variant}\n"
    (root / "config.yaml").write_text(f"seed: {seed}\n{bench}")
    (root / "metrics.json").write_text(json.dumps({"run.seconds": 60.0}))
    held = {"heldout.win_rate": 0.5, "ambiguous.frac_up_down": frac_up_down}
    (root / "heldout_metrics.json").write_text(json.dumps(held))
    write_jsonl(root / "heldout_generations.jsonl", rows)


def benchmark(tmp_path: Path, seed: int, n_seeds: int, shift: float, variant: str = "null"):
    """Base answers, then per seed a dpo_all job (the base's distribution) and a dpo_compo job
    whose answers are better by ``shift`` on every prompt; aggregated. Returns (base, runs, md)."""
    rng = np.random.default_rng(seed)
    base = tmp_path / "base"
    write_jsonl(base / "heldout_generations.jsonl", answer_rows(rng, 0.0))
    runs = tmp_path / "multirun"
    for s in range(n_seeds):
        job(runs / f"all{s}", "dpo_all", s, answer_rows(rng, 0.0), 0.5)
        job(runs / f"compo{s}", "dpo_compo", s, answer_rows(rng, shift), 0.9, variant=variant)
    out = tmp_path / "results"
    assert aggregate.main([str(runs), "--out", str(out), "--base", str(base), "--no-plots"]) == 0
    return base, runs, (out / "results.md").read_text()


def test_interval_tables_find_a_real_effect_and_not_a_null_one(tmp_path):
    # The recipe's answers are better by 0.15 on every prompt: a clear effect.
    base, runs, md = benchmark(tmp_path, seed=0, n_seeds=4, shift=0.15)
    assert "With 95% intervals" in md and "Paired contrasts, cell by cell" in md
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if " - " in line}
    goal = rows["dpo_compo - dpo_all"]
    assert goal.count(" *") == 3  # every contrast column excludes 0
    records = aggregate.collect([runs])
    base_rows = intervals.read_rows(base / "heldout_generations.jsonl")
    table = intervals.arm_table(intervals.arm_cells(records, base_rows), records, base_rows, [])
    null = next(line for line in table.splitlines() if line.startswith("| dpo_all"))
    # dpo_all's answers come from the base's distribution: its win-rate interval holds 0.5.
    low, high = (float(x) for x in null.split(" | ")[3].split("[")[1].rstrip("]").split(", "))
    assert low < 0.5 < high
    assert "0.900 [0.900, 0.900]" in table  # frac_up_down, the same on every seed


def test_a_variant_of_an_arm_gets_its_interval_contrasts(tmp_path):
    # A variant (bench.variant, e.g. compo_schedule.py's reruns of the ComPO stage) is compared
    # with the arm's baselines, as in the mean +- std contrasts.
    _, _, md = benchmark(tmp_path, seed=1, n_seeds=3, shift=0.2, variant="exact")
    head = "| dpo_compo [exact] - dpo_all | bt0.1 | 3 | +"
    rows = [line for line in md.splitlines() if line.startswith(head) and " *" in line]
    assert len(rows) == 1 and rows[0].count(" *") == 3  # the interval table's row


def test_jobs_without_per_prompt_answers_keep_the_first_table_only(tmp_path):
    runs = tmp_path / "multirun"
    (runs / "0").mkdir(parents=True)
    (runs / "0" / "config.yaml").write_text("seed: 0\nbench:\n  arm: dpo_all\n  noise: 0.1\n")
    (runs / "0" / "metrics.json").write_text(json.dumps({"run.seconds": 60.0}))
    (runs / "0" / "heldout_metrics.json").write_text(json.dumps({"heldout.lc_win_rate": 0.6}))
    out = tmp_path / "results"
    assert (
        aggregate.main(
            [str(runs), "--out", str(out), "--base", str(tmp_path / "none"), "--no-plots"]
        )
        == 0
    )
    md = (out / "results.md").read_text()
    assert "With 95% intervals" not in md
    assert "| 0.600 |" in md  # the first benchmark's lc_win_rate under its new name


def test_the_one_command_benchmark_in_smoke_mode(tmp_path):
    """experiments/run_benchmark.sh --smoke: click files, base answers, two arms trained and
    evaluated, the interval tables: the whole pipeline on the tiny model."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path / "runs"), RESULTS=str(tmp_path / "results"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        ["bash", str(root / "experiments" / "run_benchmark.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "runs" / "logs").glob("*.log")))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    md = (tmp_path / "results" / "results.md").read_text()
    assert "With 95% intervals" in md and "| dpo_compo - dpo_all | bt0.1 | 1 |" in md
    for arm in ("dpo_all", "dpo_compo"):
        run = tmp_path / "runs" / arm / "bt0.1" / "seed0"
        assert (run / "heldout_generations.jsonl").is_file()
        assert json.loads((run / "heldout_metrics.json").read_text())["heldout.n_prompts"] == 4
    assert "benchmark: load after:" in done.stdout
