"""report_to: the run dir's trace rows and metrics, copied to experiment trackers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import mixed_pair_rows, run_compo

from compo import tracking
from compo.rundir import RunDir
from compo.settings import SettingError

SECRET = "sk-compo-test-secret-0123456789"
# Split, DPO on the clean pairs and ComPO on the ambiguous ones, in seconds (see test_pipeline).
RUN = [
    "splitter=likelihood_margin",
    "splitter.delta=10",
    "optimizer=compo_tiny",
    "dpo=dpo",
    "dpo.lr=1e-3",
]


def _trace(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "trace" / f"{name}.jsonl").read_text().splitlines()]


def _pairs(tmp: Path) -> Path:
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed_pair_rows()))
    return path


def _run(tmp: Path, *overrides: str) -> tuple[Path, dict]:
    run_dir = tmp / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_API_KEY", SECRET)  # a tracker's secret must never reach the run dir
        env.setenv("OPENAI_API_KEY", SECRET)
        env.delenv("WANDB_MODE", raising=False)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        metrics = run_compo(run_dir, f"data.path={_pairs(tmp)}", *RUN, *overrides)
    return run_dir, metrics


def _no_secret_on_disk(run_dir: Path) -> None:
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    return _run(tmp_path_factory.mktemp("tb"), "report_to=[tensorboard]")


def test_tensorboard_gets_the_trace_rows_and_metrics(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics = tensorboard_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    dpo = _trace(run_dir, "dpo")
    assert len(dpo) == metrics["dpo.total_steps"] > 1
    assert series("dpo/loss") == [(r["step"], pytest.approx(r["loss"])) for r in dpo]
    assert series("dpo/reward_margin") == [
        (r["step"], pytest.approx(r["reward_margin"])) for r in dpo
    ]
    compo = _trace(run_dir, "compo")
    assert len(compo) == metrics["compo.n_iterations"] > 1
    # ComPO rows sit at their iteration; their 'step' is the step size, a value like any other.
    assert series("compo/frac") == [(r["iteration"], pytest.approx(r["frac"])) for r in compo]
    assert series("compo/step") == [(r["iteration"], pytest.approx(r["step"])) for r in compo]
    assert series("compo/applied") == [(r["iteration"], float(r["applied"])) for r in compo]
    assert series("metrics/eval.after.accuracy") == [
        (0, pytest.approx(metrics["eval.after.accuracy"]))
    ]
    assert "metrics/split.rule" not in events.Tags()["scalars"]  # texts stay in the files
    # The config is recorded next to the final metrics (TensorBoard's HParams tab).
    content = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    assert b"optimizer.num_directions" in content["_hparams_/session_start_info"]
    assert not any(k.startswith("report_to") for k in metrics)  # no tracker was dropped


def test_trackers_write_no_secret(tensorboard_run):
    _no_secret_on_disk(tensorboard_run[0])


def test_report_to_is_checked(monkeypatch):
    assert tracking.check([]) == []
    for value, message in (
        ("tensorboard", "report_to must be a list of names"),
        (["tensorbord"], "report_to: 'tensorbord' is not one of ['tensorboard', 'trackio'"),
        (["tensorboard", "tensorboard"], "report_to: 'tensorboard' is listed twice"),
    ):
        with pytest.raises(SettingError, match="^" + message.replace("[", r"\[")):
            tracking.check(value)
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n)
    )
    with pytest.raises(SettingError) as caught:
        tracking.check(["wandb"])
    assert str(caught.value) == (
        "report_to: wandb needs the wandb package, which is not installed: "
        "pip install 'compo[trackers]' (or pip install wandb)"
    )


def test_an_unknown_tracker_is_one_line_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "compo", "model=tiny", f"hydra.run.dir={run_dir}",
         "report_to=[tensorboard,neptune]"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "compo: error: report_to: 'neptune' is not one of "
        "['tensorboard', 'trackio', 'wandb', 'mlflow']"
    ]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / ".lock").exists()


class _Flaky:
    """A backend whose client breaks after ``ok`` rows (a full disk, a dropped connection)."""

    ok = 2
    finished: ClassVar[list[bool]] = []

    def __init__(self, run_dir, run_name, config):
        self.where, self.rows = "nowhere", 0

    def log(self, values, step, axis=""):
        self.rows += 1
        if self.rows > self.ok:
            raise OSError("No space left on device")

    def final(self, values):
        raise AssertionError("a dropped tracker gets nothing more")

    def finish(self, ok):
        self.finished.append(ok)


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", _Flaky)
    _Flaky.finished = []
    with tracking.start(["tensorboard"], tmp_path, {"seed": 0}) as trackers:
        out = RunDir(tmp_path, trackers)
        with out.trace("dpo") as trace:
            for step in range(1, 6):
                trace.write({"step": step, "loss": 1.0 / step})
        out.log_metrics("dpo", {"loss_last": 0.2})
        out.save("seed: 0\n")
    # The files keep every row; the tracker was dropped once, said so, and was closed as failed.
    assert len(_trace(tmp_path, "dpo")) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "report_to: tensorboard failed (OSError: No space left on device); it gets nothing more"
    ]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["report_to.tensorboard"] == "failed: OSError: No space left on device"
    assert _Flaky.finished == [False]


def test_a_tracker_that_cannot_start_is_one_line_and_the_others_are_closed(tmp_path, monkeypatch):
    class NoLogin(_Flaky):
        def __init__(self, run_dir, run_name, config):
            raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login()")

    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", _Flaky)
    monkeypatch.setitem(tracking.BACKENDS, "wandb", NoLogin)
    monkeypatch.setitem(tracking.CLIENTS, "wandb", "json")  # "installed"
    _Flaky.finished = []
    with (
        pytest.raises(SettingError) as caught,
        tracking.start(["tensorboard", "wandb"], tmp_path, {}),
    ):
        pass
    assert str(caught.value) == (
        "report_to: wandb could not start: RuntimeError: api_key not configured (no-tty)"
    )
    assert _Flaky.finished == [False]


def test_rows_without_a_position_are_counted(tmp_path, monkeypatch):
    got = []

    class Recorder(_Flaky):
        def log(self, values, step, axis=""):
            got.append((dict(values), step, axis))

    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", Recorder)
    trackers = tracking.Trackers(["tensorboard"], tmp_path, {})
    trackers.row("oracle", {"vote": 1.0, "reasons": ["a"], "identical": [False]})
    trackers.row("oracle", {"vote": -1.0, "ok": True, "nested": {"a": 2}})
    trackers.row("oracle", {"reasons": ["only texts"]})  # nothing numeric: nothing sent
    trackers.row("compo", {"iteration": 3, "step": 0.5})
    assert got == [
        ({"oracle/vote": 1.0}, 0, "oracle/row"),
        ({"oracle/vote": -1.0, "oracle/ok": 1, "oracle/nested.a": 2}, 1, "oracle/row"),
        ({"compo/step": 0.5}, 3, "compo/iteration"),
    ]


# The other trackers' clients are heavy optional installs (compo[trackers]); each test runs
# where its client is installed.


def test_mlflow_gets_a_local_store_in_the_run_dir(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    run_dir, metrics = _run(tmp_path, "report_to=[mlflow]")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("compo").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "dpo/loss")
    assert [(m.step, m.value) for m in history] == [
        (r["step"], pytest.approx(r["loss"])) for r in _trace(run_dir, "dpo")
    ]
    assert run.data.metrics["metrics/eval.after.accuracy"] == pytest.approx(
        metrics["eval.after.accuracy"]
    )
    assert run.data.params["optimizer.num_directions"] == "64"
    _no_secret_on_disk(run_dir)


def test_wandb_runs_offline_into_the_run_dir(tmp_path):
    pytest.importorskip("wandb")
    run_dir, _ = _run(tmp_path, "report_to=[wandb]")
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert log.stat().st_size > 0
    _no_secret_on_disk(run_dir)


def test_trackio_gets_every_stream_at_its_own_position(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    run_dir, _ = _run(tmp_path, "report_to=[trackio]")
    logs = SQLiteStorage.get_logs("compo", "/".join(run_dir.resolve().parts[-2:]))
    frac = [(row["step"], row["compo/frac"]) for row in logs if "compo/frac" in row]
    assert frac == [(r["iteration"], pytest.approx(r["frac"])) for r in _trace(run_dir, "compo")]
