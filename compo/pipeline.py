"""The recipe: one run of compo, top to bottom.

    pairs (held-out ones set apart) -> model -> tokens -> oracle checked -> reference scores
          -> eval.before -> split -> first-order stage (clean pairs) -> ComPO (ambiguous pairs)
          -> checkpoint -> eval.after

Every stage is an object built from its config group (see :mod:`compo.stages` for the contract);
a group set to ``none`` builds a stage that does nothing, so this function has no branch per
stage. It sees no config: :mod:`compo.cli` builds the stages and calls :func:`run_pipeline`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

from compo import distributed, plots
from compo.data import DataSpec, keep_rejected
from compo.errors import CompoError
from compo.heldout import record_heldout
from compo.interfaces import ComparisonOracle
from compo.models import ModelLoader, save_checkpoint
from compo.rundir import RunDir
from compo.scoring import divergence
from compo.stages import (
    Evaluator,
    FirstOrderStage,
    Job,
    Outcome,
    Splitter,
    ZerothOrderStage,
    check_unpaired,
)

log = logging.getLogger("compo")


@dataclass
class Stages:
    """The objects one run is made of, each from its config group."""

    data: DataSpec
    model: ModelLoader
    evaluator: Evaluator
    splitter: Splitter
    first_order: FirstOrderStage
    zeroth_order: ZerothOrderStage
    oracle: ComparisonOracle


def _log(out: RunDir, outcome: Outcome) -> None:
    for group, values in outcome.metrics.items():
        out.log_metrics(group, values)


def _checkpoint(out: RunDir, job: Job, changed: bool, files: dict) -> None:
    """Saves the policy (and the stages' ``files``) if a stage changed it; else no checkpoint
    may stand for this run. A policy whose outputs diverged is not saved (its weights, checked
    by :func:`save_checkpoint`, can be finite)."""
    if changed:
        broken = divergence(job.policy, job.encoded, job.pad_token_id)
        if broken is not None:
            raise CompoError(
                f"checkpoint {out.checkpoint_dir} not written: the trained model diverged: "
                f"{broken}; lower optimizer.step_size or dpo.lr"
            )
        save_checkpoint(job.policy, job.tokenizer, out.checkpoint_dir, files)
        log.info("checkpoint saved to %s", out.checkpoint_dir)
    elif out.checkpoint_dir.exists():
        shutil.rmtree(out.checkpoint_dir)
        log.warning("run: no stage changed the model; removed the checkpoint/ of an earlier run")


def run_pipeline(stages: Stages, out: RunDir) -> dict[str, Any]:
    """Runs every stage on the data and returns the flat metrics (also in ``metrics.json``).

    Args:
        stages: The built stages (``none`` groups are do-nothing stages).
        out: The run dir (a read-only view on ranks other than 0 under torchrun).
    """
    started = time.perf_counter()
    loaded = keep_rejected(out, "rejected_rows", stages.data.load)
    if loaded.unpaired:  # KTO's data: refused before any model loads if a stage needs pairs
        pairwise = {"splitter": stages.splitter, "dpo": stages.first_order}
        check_unpaired(stages.data.path, {**pairwise, "optimizer": stages.zeroth_order})
    n_train_rejected = len(loaded.rejected) - loaded.n_heldout_rejected
    count = "n_examples" if loaded.unpaired else "n_pairs"
    out.log_metrics("data", {count: len(loaded.pairs), "n_rows_rejected": n_train_rejected})
    heldout = record_heldout(out, loaded.pairs, loaded.heldout)
    if heldout:
        heldout["n_rows_rejected"] = loaded.n_heldout_rejected
    out.log_metrics("data.heldout", heldout)

    log.info("loading model %s", stages.model.name)
    policy, tokenizer = stages.model.load()
    encoded, truncation = stages.data.encode(loaded.pairs, tokenizer)
    out.log_metrics("data", truncation.as_metrics())
    # The oracle is checked (API key, endpoint, reward model) before any expensive work.
    stages.oracle.bind(tokenizer, out)
    stages.oracle.check()

    # The policy as loaded is the reference model. Its scores are computed once, by whichever
    # stage asks first, recording the first-order stage's frozen blocks on the way.
    trunk = stages.first_order.frozen_trunk(policy)
    reference = stages.evaluator.reference(policy, encoded, tokenizer.pad_token_id, trunk)
    job = Job(policy, tokenizer, stages.data, loaded.pairs, encoded, reference, out)
    if loaded.heldout:  # the evaluator alone sees them
        heldout, truncation = stages.data.encode(loaded.heldout, tokenizer)
        out.log_metrics("data.heldout", truncation.as_metrics())
        job.heldout = stages.evaluator.reference(policy, heldout, tokenizer.pad_token_id)
    _log(out, stages.evaluator.before(job))

    split = stages.splitter.split(policy, loaded.pairs, encoded, tokenizer.pad_token_id, reference)
    out.log_metrics("split", split.record(out, loaded.pairs))
    first = stages.first_order.fit(job, split.clean)
    _log(out, first)
    zeroth = stages.zeroth_order.fit(job, split.ambiguous, stages.oracle)
    _log(out, zeroth)

    # The checkpoint and eval.after are rank 0's alone: no collective operation follows.
    changed = first.changed or zeroth.changed
    if distributed.is_main():
        _checkpoint(out, job, changed, {**first.files, **zeroth.files})
        if changed:
            _log(out, stages.evaluator.after(job, split))
        out.log_metrics("plots", plots.draw(out.path, out.metrics))
    # Whether the on-disk cache served the reference passes (reference_cache; absent when off).
    out.log_metrics("reference", reference.cache_metrics())
    if job.heldout is not None:
        out.log_metrics("reference.heldout", job.heldout.cache_metrics())
    out.log_metrics("run", {"model_changed": changed})
    out.log_metrics("run", {"seconds": round(time.perf_counter() - started, 3)})
    return out.metrics
