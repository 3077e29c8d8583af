"""What a run returns to a sweeper: ``objective`` / ``objective_direction`` (compo.objective)."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys

import pytest
from conftest import mixed_pair_rows, run_compo
from omegaconf import OmegaConf

from compo.errors import CompoError
from compo.objective import Objective, sweeper_direction
from compo.settings import SettingError

HELDOUT = {"data.heldout.n_pairs": 4, "eval.heldout.accuracy": 0.75, "eval.after.accuracy": 1.0}


def test_auto_is_the_heldout_accuracy_and_never_the_training_pairs():
    assert Objective("auto", "maximize").evaluate(HELDOUT).value == 0.75
    # Without a held-out set, auto reports nothing rather than the overfit training accuracy.
    found = Objective("auto", "maximize").evaluate({"eval.after.accuracy": 1.0})
    assert (found.key, found.value, found.error) == (None, None, None)
    assert found.as_metrics() == {"objective": None}
    named = Objective("eval.after.accuracy", "maximize").evaluate(HELDOUT)
    assert named.as_metrics() == {"objective": "eval.after.accuracy", "objective_value": 1.0}
    assert Objective(None, "minimize").evaluate(HELDOUT).value is None


@pytest.mark.parametrize(
    ("key", "metrics", "reason"),
    [
        ("eval.after.accuracy", {"data.n_pairs": 3}, "this run measured nothing (eval=none)"),
        ("eval.heldout.accuracy", {"eval.before.accuracy": 0.5}, "this run has no held-out set"),
        (
            "eval.heldout.after.accuracy",
            {**HELDOUT, "run.model_changed": False},
            "no stage changed the model",
        ),
        ("eval.afterr.accuracy", HELDOUT, "no such metric in this run; did you mean eval.after"),
        ("nothing.like.it", HELDOUT, "no such metric in this run (see metrics.json"),
    ],
)
def test_a_missing_metric_is_an_error_saying_why(key, metrics, reason):
    found = Objective(key, "maximize").evaluate(metrics)
    assert found.value is None and found.error.startswith(f"objective {key}: {reason}")
    assert found.as_metrics() == {"objective": key, "objective_error": found.error}


@pytest.mark.parametrize("value", ["no ambiguous pairs", True, float("nan"), None])
def test_a_value_that_is_not_a_finite_number_is_an_error(value):
    found = Objective("compo.skipped_reason", "maximize").evaluate({"compo.skipped_reason": value})
    assert found.error == f"objective compo.skipped_reason is {value!r}, not a finite number"


def test_under_an_optimising_sweeper_no_objective_is_an_error():
    found = Objective("auto", "maximize", sweeper_direction="maximize").evaluate({"x": 1})
    assert "the sweeper optimises a value, but objective=auto needs a held-out set" in found.error
    found = Objective(None, "maximize", sweeper_direction="maximize").evaluate(HELDOUT)
    assert found.error.endswith("but objective=null")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("auto", "max"), "objective_direction: 'max' is not one of ['maximize', 'minimize']"),
        ((3, "maximize"), "objective must be a string or null, got 3"),
        (("  ", "maximize"), "objective is empty"),
        (
            ("auto", "maximize", "minimize"),
            "the sweeper's direction is minimize but objective_direction is maximize: the sweep "
            "would optimise the objective the wrong way; set hydra.sweeper.direction=maximize",
        ),
    ],
)
def test_bad_settings_and_a_sweeper_going_the_other_way_are_refused(args, message):
    with pytest.raises(SettingError) as err:
        Objective(*args)
    assert str(err.value).startswith(message)


class Direction(enum.Enum):  # what optuna's plugin uses for its default
    minimize = 1
    maximize = 2


@pytest.mark.parametrize(
    ("sweeper", "direction"),
    [
        ({"direction": "maximize", "n_trials": 2}, "maximize"),  # optuna
        ({"direction": Direction.minimize}, "minimize"),
        ({"direction": ["minimize"]}, "minimize"),
        ({"ax_config": {"experiment": {"minimize": False}}}, "maximize"),  # Ax
        ({"optim": {"maximize": False, "budget": 80}}, "minimize"),  # Nevergrad
        ({"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}, None),
    ],
)
def test_the_direction_of_each_sweeper_plugin_is_read(sweeper, direction):
    node = sweeper if isinstance(sweeper.get("direction"), Direction) else OmegaConf.create(sweeper)
    assert sweeper_direction(node) == direction


def test_several_optuna_directions_are_refused():
    with pytest.raises(SettingError, match="has 2 directions; compo reports one objective"):
        sweeper_direction(OmegaConf.create({"direction": ["maximize", "minimize"]}))


@pytest.fixture
def mixed_pairs(write_jsonl):
    return write_jsonl(mixed_pair_rows())


def test_a_missing_objective_fails_after_the_run_dir_is_written(tmp_path, mixed_pairs):
    args = [f"data.path={mixed_pairs}", "optimizer=none", "objective=eval.heldout.accuracy"]
    with pytest.raises(CompoError, match=r"accuracy: this run has no held-out set"):
        run_compo(tmp_path, *args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run.objective"] == "eval.heldout.accuracy"
    assert "no held-out set" in metrics["run.objective_error"]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoint").is_dir()


def test_eval_none_with_an_objective_is_one_line_and_exit_2_at_the_end(tmp_path, mixed_pairs):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "compo", "model=tiny", f"hydra.run.dir={run_dir}"]
    extra = [f"data.path={mixed_pairs}", "data.eval_fraction=0.3", "optimizer=none", "eval=none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, *extra, "objective=eval.heldout.accuracy"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # stderr also holds the progress bars of the work done; the error is one line, the last.
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [
        "compo: error: objective eval.heldout.accuracy: this run measured nothing (eval=none); "
        "choose eval=preference"
    ]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "run dir:" in proc.stdout  # the summary came first: the run did its work
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dpo.steps_run"] > 0 and "run.objective_error" in metrics
    assert (run_dir / "split" / "heldout.jsonl").is_file()
