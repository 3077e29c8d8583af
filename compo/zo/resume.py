"""ComPO's resume state: ``compo_state/`` in the run dir, committed after every iteration.

``weights-<t>.safetensors`` holds the fp32 master copies of the perturbed tensors after t
iterations; ``progress.json`` (written last, the commit marker, see :mod:`compo.state`) holds t,
the data position, the seed, what the iterations depend on (:func:`identity`) and the file's
sha256. A rerun of the same command loads it, skips the t committed iterations and continues;
directions are regenerated from (seed, t, i), so nothing else is needed to continue exactly.
Trace rows written after the last commit are dropped (:func:`truncate_traces`): their
iterations run again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from compo import state
from compo.errors import CompoError
from compo.zo.scope import Scope


def identity(
    settings: dict[str, Any], oracle: dict[str, Any], scope: Scope, pairs: Sequence
) -> dict[str, Any]:
    """What the iterations depend on, recorded in ``progress.json`` and checked on resume.

    The settings and the oracle's description are kept as they are (canonical JSON), so a
    refusal names the one that changed (``optimizer.radius``, ``oracle.aggregation``); the pairs
    and the starting weights as digests, so a state is never continued on other pairs or on top
    of a different model (another DPO result, another seed).

    Args:
        settings: :meth:`compo.zo.ComPO.settings`.
        oracle: The oracle's ``describe()``.
        scope: The perturbed tensors, at the weights the iterations start from.
        pairs: The encoded pairs, in order.
    """

    def canonical(value: Any) -> Any:  # as it reads back from JSON: tuples are lists
        return json.loads(json.dumps(value, sort_keys=True, default=str))

    return {
        "optimizer": canonical(settings),
        "oracle": canonical(oracle),
        "data": state.digest_pairs(pairs),
        "blocks": [[n, list(s)] for n, s in zip(scope.names, scope.shapes, strict=True)],
        "start": state.digest_tensors(scope.masters()),
    }


def truncate_traces(run_dir: Path, start: int) -> list[dict[str, Any]]:
    """Keeps the trace rows of the ``start`` committed iterations; returns ComPO's, one per
    iteration in order (fewer than ``start`` when the trace was damaged or deleted).

    ``trace/compo.jsonl`` and ``trace/oracle.jsonl`` under ``run_dir`` are rewritten; oracle rows
    that belong to no iteration are kept.
    """
    oracle_trace = run_dir / "trace" / "oracle.jsonl"
    # Oracle rows of no iteration (e.g. a judge's setup) stay.
    state.truncate_trace(
        oracle_trace, lambda r: type(r.get("iteration")) is not int or r["iteration"] < start
    )
    compo_trace = run_dir / "trace" / "compo.jsonl"
    rows = state.truncate_trace(compo_trace, lambda r: r["iteration"] < start, "iteration")
    by_iteration = {}
    for row in rows:  # a row repeated by hand must not count twice
        by_iteration.setdefault(row["iteration"], row)
    return [by_iteration[t] for t in sorted(by_iteration)]


def untraced(traced: int, total: int) -> str:
    """The warning for a resumed run whose trace lost rows of its committed iterations."""
    return (
        f"trace/compo.jsonl holds {traced} of the {total} iterations (damaged or deleted before "
        "this resume): the weights are exact, but compo.* counts and means cover only the "
        "traced iterations"
    )


class CompoState:
    """Loads and commits ``compo_state/``.

    Args:
        state_dir: The directory (``<run dir>/compo_state``).
        identity: From :func:`identity`, computed before any iteration.
    """

    def __init__(self, state_dir: Path, identity: dict[str, Any]) -> None:
        self.dir, self.identity = state_dir, identity
        self.radius: float | None = None  # the radius in force at the commit (radius=auto)

    def load(self, scope: Scope) -> int:
        """Restores the committed master weights into ``scope``; returns iterations done (0: none).

        Raises:
            CompoError: The state is corrupt (see :func:`compo.state.load`) or was written by a
                different setup.
        """
        loaded = state.load(self.dir, ("weights",))
        if loaded is None:
            return 0
        progress, blobs = loaded
        iteration, radius = progress.get("iteration"), progress.get("radius")
        # The weights file is named after the step: the iteration count is bound to it.
        if type(iteration) is not int or iteration != progress["step"]:
            raise CompoError(
                f"{self.dir / state.PROGRESS}: corrupt resume state (iteration {iteration!r} "
                f"does not match step {progress['step']}); delete {self.dir} to start over"
            )
        if radius is not None and not (isinstance(radius, int | float) and 0 < radius < 1e308):
            raise CompoError(
                f"{self.dir / state.PROGRESS}: corrupt resume state (radius {radius!r}); "
                f"delete {self.dir} to start over"
            )
        state.check_identity(self.dir, progress, self.identity, "optimizer.resume")
        tensors = safetensors_load(blobs["weights"])
        if sorted(tensors) != sorted(scope.names):
            raise CompoError(
                f"{self.dir}: holds {sorted(tensors)}, this run perturbs {scope.names}"
            )
        with torch.no_grad():
            for block in scope.blocks:
                block.master.copy_(tensors[block.name])
        scope.write_back()
        self.radius = radius
        return iteration

    def save(
        self,
        scope: Scope,
        done: int,
        batches: Sequence[Sequence],
        seed: int,
        radius: float | None = None,
    ) -> None:
        """Commits the master weights after ``done`` iterations (of ``len(batches)``).

        ``radius`` is the radius in force (searched under ``radius=auto``), so a resumed run
        continues with it instead of searching at an iteration an uninterrupted run would not.
        """
        tensors = {b.name: b.master.detach().float().contiguous().cpu() for b in scope.blocks}
        state.check_finite(tensors.items(), f"resume state {self.dir}")
        progress = {
            "iteration": done,
            "n_iterations": len(batches),
            "pairs_done": sum(len(b) for b in batches[:done]),
            "next_pair_ids": [p.pair_id for p in batches[done]] if done < len(batches) else [],
            "seed": seed,
            **self.identity,
            "radius": radius,
        }
        state.commit(
            self.dir, done, {"weights": ("safetensors", safetensors_save(tensors))}, progress
        )
