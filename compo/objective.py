"""The number a run hands to a Hydra sweeper (Optuna, Ax, Nevergrad): one metric of the run.

``objective`` names a key of ``metrics.json``; ``objective_direction`` says whether larger is
better. The default, ``auto``, is the final model's preference accuracy on the held-out pairs
(``eval.heldout.accuracy``) when the run has them (``data.eval_path`` or ``data.eval_fraction``),
and nothing otherwise: the accuracy on the pairs DPO trained on rewards overfitting, so it is never
chosen silently (name it, ``objective=eval.after.accuracy``, to optimise it anyway).

A named metric the run did not produce, or a value that is not a finite number, is an error of the
run, raised after its files are written; so is a run with no objective under a sweeper that
optimises one. A sweeper's own direction must agree with ``objective_direction``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from compo import settings

AUTO = "auto"
HELDOUT_ACCURACY = "eval.heldout.accuracy"
DIRECTIONS = ("maximize", "minimize")


@dataclass
class Result:
    """What :meth:`Objective.evaluate` found: the key, its value, or why there is none."""

    key: str | None
    value: float | None = None
    error: str | None = None

    def as_metrics(self) -> dict[str, Any]:
        """The ``run.objective*`` metrics (the key, and the value or the error)."""
        found: dict[str, Any] = {"objective": self.key}
        if self.error is not None:
            found["objective_error"] = self.error
        elif self.value is not None:
            found["objective_value"] = self.value
        return found


class Objective:
    """The ``objective`` and ``objective_direction`` settings.

    Args:
        key: A metric key (``eval.heldout.after.margin_mean``), ``auto`` or None (no objective).
        direction: ``maximize`` or ``minimize``.
        sweeper_direction: The running sweeper's direction (see :func:`sweeper_direction`), or
            None when no sweeper optimises a value (single runs, the basic sweeper).

    Raises:
        SettingError: A setting is out of its domain, or the sweeper optimises the other way.
    """

    def __init__(self, key: str | None, direction: str, sweeper_direction: str | None = None):
        settings.text("objective", key, optional=True)
        if key is not None and not key.strip():
            raise settings.SettingError("objective is empty; give a metric key, auto or null")
        self.key = key
        self.direction = settings.choice("objective_direction", direction, DIRECTIONS)
        if sweeper_direction is not None and sweeper_direction != direction:
            raise settings.SettingError(
                f"the sweeper's direction is {sweeper_direction} but objective_direction is "
                f"{direction}: the sweep would optimise the objective the wrong way; set "
                f"hydra.sweeper.direction={direction} (configs/experiment/sweep_optuna.yaml "
                "follows objective_direction)"
            )
        self.required = sweeper_direction is not None

    def evaluate(self, metrics: dict[str, Any]) -> Result:
        """Finds the objective in a run's flat metrics (never raises: see :class:`Result`)."""
        key = self.key
        if key == AUTO:
            key = HELDOUT_ACCURACY if HELDOUT_ACCURACY in metrics else None
        if key is None:
            if not self.required:
                return Result(None)
            how = (
                "objective=auto needs a held-out set (data.eval_fraction or data.eval_path) "
                "and eval=preference"
                if self.key == AUTO
                else "objective=null"
            )
            return Result(None, error=f"the sweeper optimises a value, but {how}")
        if key not in metrics:
            return Result(key, error=f"objective {key}: {_missing(key, metrics)}")
        value = metrics[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            return Result(key, error=f"objective {key} is {value!r}, not a finite number")
        return Result(key, value=float(value))


def _missing(key: str, metrics: dict[str, Any]) -> str:
    """Why a metric is absent, as far as the other metrics tell."""
    if key.startswith("eval.") and not any(k.startswith("eval.") for k in metrics):
        return "this run measured nothing (eval=none); choose eval=preference"
    if key.startswith("eval.heldout") and "data.heldout.n_pairs" not in metrics:
        return "this run has no held-out set; set data.eval_fraction or data.eval_path"
    if ".after" in key and metrics.get("run.model_changed") is False:
        return (
            "no stage changed the model, so nothing was measured after training "
            f"({HELDOUT_ACCURACY} is the final model's either way)"
        )
    close = difflib.get_close_matches(key, list(metrics), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see metrics.json for the keys)"
    return f"no such metric in this run{hint}"


def _optuna(value: Any) -> str:
    """Optuna's ``direction``: a name, its enum, or a list of them (one per objective)."""
    if not isinstance(value, str) and isinstance(value, Sequence):
        if len(value) != 1:
            raise settings.SettingError(
                f"hydra.sweeper.direction has {len(value)} directions; compo reports one objective"
            )
        value = value[0]
    return str(getattr(value, "name", value))


# Where each Hydra sweeper plugin keeps its direction (a config path and how to read it).
_SWEEPER_DIRECTIONS = (
    ("direction", _optuna),
    ("ax_config.experiment.minimize", lambda v: "minimize" if v else "maximize"),  # Ax
    ("optim.maximize", lambda v: "maximize" if v else "minimize"),  # Nevergrad
)


def sweeper_direction(sweeper: Any) -> str | None:
    """The direction a Hydra sweeper's config optimises in, or None if it optimises nothing.

    Args:
        sweeper: The ``hydra.sweeper`` node (a mapping; OmegaConf nodes work).
    """
    for path, read in _SWEEPER_DIRECTIONS:
        node = sweeper
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return read(node)
    return None
