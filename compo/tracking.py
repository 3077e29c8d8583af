"""Experiment trackers: a copy of the run dir's numbers for TensorBoard, trackio, W&B or MLflow.

    compo model=tiny 'report_to=[tensorboard]'     # then: tensorboard --logdir runs/
    compo 'report_to=[wandb,mlflow]'

The run dir stays the record; a tracker gets the same numbers as they are written there (never
instead of the files):

* every trace row (``trace/<stream>.jsonl``, see :class:`compo.rundir.TraceWriter`): each
  numeric field as ``<stream>/<field>`` at the row's own position, its ``iteration`` (ComPO and
  oracle rows, whose ``step`` is a step size) or else its ``step`` (first-order rows);
* the numeric metrics of ``metrics.json`` as ``metrics/<key>`` when the run saves them;
* the resolved config (what ``config.yaml`` holds, so never a secret) as hyper-parameters.

Texts and lists (reasons, pair ids, per-pair log-probs) stay in the files. Each tracker is
driven through its own client (accelerate's tracker classes refuse to log without an
``Accelerator`` state, which compo, with its own torch.distributed setup, does not create); what
this module decides is where they write and how steps map:

* ``tensorboard``: event files in ``<run dir>/tensorboard/``;
* ``wandb``: ``mode=offline`` unless ``WANDB_MODE`` is set, files in ``<run dir>/wandb/``
  (``wandb sync`` uploads them); W&B wants one increasing step per run, so each stream's
  position is a field (``dpo/step``) declared as that stream's x-axis;
* ``mlflow``: a SQLite store in ``<run dir>/mlflow/`` unless ``MLFLOW_TRACKING_URI`` is set
  (MLflow 3 refuses its old file store by default);
* ``trackio``: its local store (``TRACKIO_DIR``); it reaches a server only if the user names one
  (``TRACKIO_SPACE_ID``).

Only rank 0 reports: other ranks write through :class:`compo.distributed.ReadOnlyRunDir`, which
has no tracker. A tracker that fails mid-run is dropped with one warning line and a
``report_to.<name>`` metric; the run goes on, since the files hold everything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from compo import settings
from compo.settings import SettingError

log = logging.getLogger("compo")

#: Each tracker's client package (what must be importable for it).
CLIENTS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL = "pip install 'compo[trackers]'"
#: The fields that give a trace row its position, in order of preference.
POSITION_KEYS = ("iteration", "step")


class Tracking:
    """What :class:`compo.rundir.RunDir` calls; this base reports nowhere (``report_to: []``)."""

    def row(self, stream: str, row: Mapping[str, Any]) -> None:
        """Reports one trace row of ``trace/<stream>.jsonl``."""

    def metrics(self, metrics: Mapping[str, Any]) -> None:
        """Reports the run's flat metrics (what ``metrics.json`` holds)."""

    def problems(self) -> dict[str, str]:
        """``name -> what went wrong`` for each tracker dropped during the run."""
        return {}


NO_TRACKING = Tracking()


def check(report_to: Any) -> list[str]:
    """Returns the tracker names if each is known and its client installed.

    Raises:
        SettingError: Not a list, an unknown or repeated name, or a client not installed.
    """
    names = settings.names("report_to", report_to)
    for name in names:
        settings.choice("report_to", name, CLIENTS)
        if names.count(name) > 1:
            raise SettingError(f"report_to: {name!r} is listed twice")
        package = CLIENTS[name]
        if importlib.util.find_spec(package) is None:
            raise SettingError(
                f"report_to: {name} needs the {package} package, which is not installed: "
                f"{INSTALL} (or pip install {package})"
            )
    return names


def _scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """The numbers in ``values`` (nested mappings flattened with dots; bools as 0/1)."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_scalars(value, f"{name}."))
        elif isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, int | float):
            out[name] = value
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            out[name] = value.item()  # a 0-d tensor or numpy scalar
    return out


def _hyperparameters(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to ``a.b.c -> bool | int | float | str`` (lists and None as JSON)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_hyperparameters(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def _position(row: Mapping[str, Any]) -> tuple[str | None, int | None]:
    for key in POSITION_KEYS:
        value = row.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None, None


class _TensorBoard:
    """Event files in ``<run dir>/tensorboard/``; the config and final metrics as HParams."""

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.where = str(run_dir / "tensorboard")
        self.writer = SummaryWriter(self.where, flush_secs=10)
        self.hyper = _hyperparameters(config)

    def log(self, values: dict[str, float | int], step: int, axis: str = "") -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def final(self, values: dict[str, float | int]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Written by this run's own writer (add_hparams would open a second run dir), so the
        # HParams tab lines up the config with the final metrics across a sweep's runs.
        for summary in hparams(self.hyper, values):
            self.writer.file_writer.add_summary(summary)
        self.log(values, 0)

    def finish(self, ok: bool) -> None:
        self.writer.close()


class _WandB:
    """``mode=offline`` unless ``WANDB_MODE`` says otherwise; files in ``<run dir>/wandb/``."""

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "compo"),
            name=run_name,
            dir=str(run_dir),
            mode=mode,
            config=dict(config),
        )
        self.where = f"offline, {run_dir / 'wandb'} (wandb sync uploads it)"
        if mode != "offline":
            self.where = mode
        self.axes: set[str] = set()

    def log(self, values: dict[str, float | int], step: int, axis: str) -> None:
        # W&B drops a step lower than one it has seen, and the streams count from 1 or 0 each:
        # W&B keeps its own counter, and each stream's position is a field declared as that
        # stream's x-axis.
        if axis not in self.axes:
            self.axes.add(axis)
            self.run.define_metric(axis)
            self.run.define_metric(f"{axis.split('/', 1)[0]}/*", step_metric=axis)
        self.run.log({**values, axis: step})

    def final(self, values: dict[str, float | int]) -> None:
        self.run.summary.update(values)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class _MLflow:
    """A SQLite store in ``<run dir>/mlflow/`` unless ``MLFLOW_TRACKING_URI`` is set."""

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifacts = None, None
        self.where = "MLFLOW_TRACKING_URI"  # it may carry credentials: named, never written
        if "MLFLOW_TRACKING_URI" not in os.environ:
            # SQLite, not ./mlruns: MLflow 3 refuses its file store unless told to allow it.
            local = (run_dir / "mlflow").resolve()
            local.mkdir(parents=True, exist_ok=True)
            uri = self.where = f"sqlite:///{local / 'mlflow.db'}"
            artifacts = (local / "artifacts").as_uri()
        # A client of its own: no process-wide mlflow state (active run, URI) is touched.
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "compo")
        found = self.client.get_experiment_by_name(name)
        experiment = (
            found.experiment_id if found else self.client.create_experiment(name, artifacts)
        )
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        params = [Param(k, str(v)) for k, v in _hyperparameters(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, values: dict[str, float | int], step: int, axis: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def final(self, values: dict[str, float | int]) -> None:
        self.log(values, 0)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _Trackio:
    """trackio's local store (``TRACKIO_DIR``); a server only if the user names one."""

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        import trackio

        self.run = trackio.init(project="compo", name=run_name, config=dict(config))
        self.where = "trackio's store (TRACKIO_DIR; trackio show opens it)"

    def log(self, values: dict[str, float | int], step: int, axis: str = "") -> None:
        self.run.log(values, step=step)

    def final(self, values: dict[str, float | int]) -> None:
        self.run.log(values, step=0)

    def finish(self, ok: bool) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _WandB, "mlflow": _MLflow}


class Trackers(Tracking):
    """The trackers named in ``report_to``, started; see the module docstring.

    Args:
        names: Checked tracker names (:func:`check`).
        run_dir: The run dir (local trackers write inside it).
        config: The resolved config, recorded as the run's hyper-parameters.

    Raises:
        SettingError: A tracker's client refused to start (e.g. W&B online without a login).
    """

    def __init__(self, names: list[str], run_dir: Path, config: Mapping[str, Any]) -> None:
        run_dir = Path(run_dir)
        run_name = "/".join(run_dir.resolve().parts[-2:])  # runs/<date>/<time>: <date>/<time>
        self.backends: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        self.counters: dict[str, int] = {}
        try:
            for name in names:
                try:
                    self.backends[name] = BACKENDS[name](run_dir, run_name, config)
                except Exception as exc:  # the client's own error: no login, bad URI, ...
                    reason = _reason(exc)
                    raise SettingError(f"report_to: {name} could not start: {reason}") from None
                log.info("report_to: %s -> %s", name, self.backends[name].where)
        except BaseException:
            self.close(ok=False)
            raise

    def _each(self, call: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                call(backend)
            except Exception as exc:  # the files still get everything: go on without it
                reason = _reason(exc)
                log.warning("report_to: %s failed (%s); it gets nothing more", name, reason)
                self.failed[name] = f"failed: {reason}"
                del self.backends[name]
                with contextlib.suppress(Exception):
                    backend.finish(ok=False)

    def row(self, stream: str, row: Mapping[str, Any]) -> None:
        key, step = _position(row)
        if key is None:  # a stream without a position field: its rows are counted from 0
            key, step = "row", self.counters.get(stream, -1) + 1
            self.counters[stream] = step
        values = {f"{stream}/{k}": v for k, v in _scalars(row).items() if k != key}
        if not values:
            return
        self._each(lambda backend: backend.log(values, step, f"{stream}/{key}"))

    def metrics(self, metrics: Mapping[str, Any]) -> None:
        values = {f"metrics/{k}": v for k, v in _scalars(metrics).items()}
        self._each(lambda backend: backend.final(values))

    def problems(self) -> dict[str, str]:
        return dict(self.failed)

    def close(self, ok: bool) -> None:
        """Finishes every tracker (a failed run is marked failed where the tracker can)."""
        for name, backend in self.backends.items():
            try:
                backend.finish(ok)
            except Exception as exc:
                log.warning("report_to: %s did not finish cleanly (%s)", name, _reason(exc))
        self.backends = {}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def start(report_to: Any, run_dir: Path, config: Mapping[str, Any]) -> Iterator[Tracking]:
    """Starts the trackers named in ``report_to`` for the ``with`` block (rank 0's run).

    Args:
        report_to: The ``report_to`` setting (a list of names; empty: no tracker).
        run_dir: The run dir.
        config: The resolved config as plain containers.

    Raises:
        SettingError: ``report_to`` is invalid, or a tracker could not start.
    """
    names = check(report_to)
    if not names:
        yield NO_TRACKING
        return
    trackers = Trackers(names, run_dir, config)
    ok = False
    try:
        yield trackers
        ok = True
    finally:
        trackers.close(ok)
