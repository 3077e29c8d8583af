"""An Optuna sweep (configs/experiment/sweep_optuna.yaml) optimises the held-out objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import mixed_pair_rows
from hydra import compose, initialize_config_dir

from compo.cli import CONFIG_DIR

optuna = pytest.importorskip(
    "optuna", reason="needs the sweep extra (pip install -e '.[sweep]'): hydra-optuna-sweeper"
)
pytest.importorskip(
    "hydra_plugins.hydra_optuna_sweeper",
    reason="needs the sweep extra (pip install -e '.[sweep]'): hydra-optuna-sweeper",
)


def _config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", ["+experiment=sweep_optuna", *overrides], return_hydra_config=True)


def test_the_sweep_file_optimises_the_heldout_accuracy_in_the_objectives_direction():
    cfg = _config()
    assert cfg.objective == "eval.heldout.accuracy" and cfg.data.eval_fraction > 0
    assert cfg.hydra.sweeper.direction == cfg.objective_direction == "maximize"
    assert _config("objective_direction=minimize").hydra.sweeper.direction == "minimize"


def _trial_params(trial_dir) -> dict[str, float]:
    """The values Optuna chose for a trial (its swept overrides)."""
    overrides = yaml.safe_load((trial_dir / ".hydra" / "overrides.yaml").read_text())
    swept = ("dpo.lr=", "dpo.loss.beta=", "optimizer.step_size=")
    return {o.split("=")[0]: float(o.split("=")[1]) for o in overrides if o.startswith(swept)}


def test_two_trials_on_the_tiny_model_report_the_best_heldout_objective(tmp_path, write_jsonl):
    data = write_jsonl(mixed_pair_rows())  # 12 pairs, 6 prompts: 2 prompts (4 pairs) held out
    # The held-out accuracy of 4 pairs ties between trials here; the held-out margin differs with
    # every trial's settings, so the best trial is a real choice.
    objective = "eval.heldout.margin_mean"
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'study.db'}"
    overrides = [
        "+experiment=sweep_optuna",
        "model=tiny",
        f"data.path={data}",
        "splitter.delta=10",  # the tiny model's scale: clean and ambiguous pairs both
        "optimizer=compo_tiny",
        "optimizer.max_iterations=2",
        f"objective={objective}",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",  # the study persists (the pinned SQLAlchemy)
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "compo", "-m", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]
    for metrics in trials:  # what each trial handed to Optuna: its held-out number
        assert metrics["data.heldout.n_pairs"] == 4 and metrics["data.n_pairs"] == 8
        assert metrics["run.objective"] == objective
        assert metrics["run.objective_value"] == metrics[objective]
        assert metrics[objective] != metrics["eval.after.margin_mean"]  # not the training pairs'
        assert metrics["dpo.steps_run"] > 0 and metrics["compo.n_iterations"] > 0
    values = [m["run.objective_value"] for m in trials]
    assert values[0] != values[1]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values))  # maximize: the objective's direction
    winner = sweep / str(values.index(max(values)))
    assert set(best["best_params"]) == {"dpo.lr", "dpo.loss.beta", "optimizer.step_size"}
    assert _trial_params(winner) == pytest.approx(best["best_params"])
    study = optuna.load_study(study_name="compo", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.value for t in study.trials] == pytest.approx(values)
