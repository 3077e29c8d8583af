"""experiments/benchmark/compo_schedule.py on the tiny model: ComPO's stage rerun from a DPO-clean
checkpoint on a benchmark run's ambiguous pairs, measured per pair against the starting model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from compo.data import load_pairs
from compo.models import TinyModel
from compo.rundir import write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.benchmark import compo_schedule

ROOT = Path(__file__).resolve().parents[1]


def study_args(root: Path, out: Path, *more: str) -> list[str]:
    """The study's command line on the fixture's benchmark dir (tiny model, eps0.1, seed 0)."""
    return [str(root), "--noise", "eps0.1", "--seeds", "0", "--out", str(out), "--tiny", *more]


@pytest.fixture
def bench(tmp_path):
    """A benchmark OUT with what the study reads: dpo_clean's checkpoint, dpo_compo's split."""
    source = ROOT / "experiments" / "benchmark" / "data" / "pairs_eps0.1_seed0.jsonl"
    pairs = load_pairs(source, limit=6).pairs
    compo_run = tmp_path / "dpo_compo" / "eps0.1" / "seed0"
    (compo_run / "split").mkdir(parents=True)
    (compo_run / "config.yaml").write_text(f"data:\n  path: {source}\n")
    write_jsonl(compo_run / "split" / "ambiguous.jsonl", [p.to_dict() for p in pairs])
    (compo_run / "metrics.json").write_text(json.dumps({"compo.seconds": 1.5}))
    model, tokenizer = TinyModel().load()
    for run in (tmp_path / "dpo_clean" / "eps0.1" / "seed0", compo_run):
        model.save_pretrained(run / "checkpoint")
        tokenizer.save_pretrained(run / "checkpoint")
    (tmp_path / "dpo_clean" / "eps0.1" / "seed0" / "metrics.json").write_text("{}")
    return tmp_path, pairs


def test_the_study_reruns_compo_and_measures_every_pair(bench):
    root, pairs = bench
    out = root / "study"
    args = study_args(root, out, "--variants", "expected")
    assert compo_schedule.main([*args, "--resamples", "50", "--rerun", "compo"]) == 0
    for variant in ("dpo_clean", "compo", "expected"):
        rows = json.loads((out / "runs" / variant / "seed0" / "schedule_pairs.json").read_text())
        assert rows["pair_ids"] == [p.id for p in pairs]
        assert rows["label_correct"] == [p.metadata["label_correct"] for p in pairs]
        changes = [abs(x) for x in rows["d_chosen"] + rows["d_rejected"]]
        if variant == "dpo_clean":  # the starting model itself here: nothing moved
            assert max(changes) == 0.0
        else:  # ComPO's stage ran on these pairs and moved them
            assert (out / "runs" / variant / "seed0" / "checkpoint").is_dir()
            assert max(changes) > 0.0
    summary = json.loads((out / "schedule.json").read_text())
    assert set(summary) == {"dpo_clean", "compo", "expected"}
    assert summary["expected"]["n_pairs"] == len(pairs)
    assert "frac_up_down - dpo_clean" in summary["expected"]
    assert "| expected |" in (out / "schedule.md").read_text()
    # A finished run is reused: a second call trains nothing and gives the same table.
    before = (out / "schedule.md").read_text()
    assert compo_schedule.main([*args, "--resamples", "50"]) == 0
    assert (out / "schedule.md").read_text() == before


def test_a_variant_gets_the_benchmarks_heldout_evaluation(bench):
    import os
    import subprocess

    root, _ = bench
    base = root / "base"
    heldout = ROOT / "experiments" / "benchmark" / "heldout.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(heldout), "--base", "--base-dir", str(base)]
    subprocess.run([*command, *compo_schedule.TINY_HELDOUT], env=env, check=True)
    out = root / "study"
    args = study_args(root, out, "--variants", "expected_g0.1", "--heldout", "expected_g0.1")
    args += ["--base-dir", str(base)]
    assert compo_schedule.main([*args, "--resamples", "20"]) == 0
    run = out / "runs" / "expected_g0.1" / "seed0"
    metrics = json.loads((run / "heldout_metrics.json").read_text())
    assert metrics["heldout.n_prompts"] == 4 and 0.0 <= metrics["heldout.win_rate"] <= 1.0
    # aggregate.py tells it from the benchmark's own ComPO arm by its variant
    assert "variant: expected_g0.1" in (run / "config.yaml").read_text()
    with pytest.raises(SystemExit):  # --heldout without --base-dir
        compo_schedule.main([str(root), "--out", str(out), "--heldout", "expected"])


def test_a_judge_variant_runs_the_judge_arm_under_the_plain_variants_label(bench):
    root, pairs = bench
    out = root / "study"
    args = study_args(root, out, "--resamples", "20")
    (root / "dpo_compo_judge" / "eps0.1" / "seed0").mkdir(parents=True)
    (root / "dpo_compo_judge" / "eps0.1" / "seed0" / "metrics.json").write_text("{}")
    model, tokenizer = TinyModel().load()  # the judge arm's own checkpoint (judge_compo reads it)
    model.save_pretrained(root / "dpo_compo_judge" / "eps0.1" / "seed0" / "checkpoint")
    tokenizer.save_pretrained(root / "dpo_compo_judge" / "eps0.1" / "seed0" / "checkpoint")
    assert compo_schedule.main([*args, "--variants", "judge_compo", "judge_expected_g0.1"]) == 0
    run = out / "runs" / "judge_expected_g0.1" / "seed0"
    config = (run / "config.yaml").read_text()
    assert "arm: dpo_compo_judge" in config and "variant: expected_g0.1" in config
    judged = [json.loads(line) for line in (run / "judged_pairs.jsonl").read_text().splitlines()]
    assert [j["pair_id"] for j in judged] == [p.id for p in pairs]  # the judge saw every pair
    assert json.loads((run / "metrics.json").read_text())["compo.n_applied"] > 0
    # What each pair's own updates moved it, read back from the trace (a pair the judge flipped is
    # traced the other way round), reaches the summary.
    rows = json.loads((run / "schedule_pairs.json").read_text())
    own = compo_schedule.own_moves(run, rows["pair_ids"])
    for side in ("chosen", "rejected"):
        assert any(abs(x) > 0 for x in own[f"own_{side}"])
    summary = json.loads((out / "schedule.json").read_text())["judge_expected_g0.1"]
    assert summary["own_delta_logp_chosen"]["value"] == pytest.approx(
        sum(own["own_chosen"]) / len(pairs)
    )


def test_the_benchmark_arms_checkpoints_are_read_not_retrained(bench):
    root, _ = bench
    out = root / "study"
    args = study_args(root, out, "--variants", "compo")
    assert compo_schedule.main([*args, "--resamples", "20"]) == 0
    assert not (out / "runs" / "compo" / "seed0" / "checkpoint").exists()
    rows = json.loads((out / "runs" / "compo" / "seed0" / "schedule_pairs.json").read_text())
    assert rows["compo_seconds"] == 1.5  # the benchmark run's metrics
    assert max(abs(x) for x in rows["d_chosen"]) == 0.0  # its checkpoint here: the starting model
