"""ComPO's practical scheme (arXiv 2505.05465, Algorithm 2) over the ambiguous pairs.

Per iteration t on ``batch_size`` pairs: draw m directions z_i (regenerated from (seed, t, i)),
ask the oracle y_i = C(theta, theta + r z_i), form g = sum_i y_i z_i / ||.|| in fp32, zero its
small entries, and with frac = |{y_i = -1}| / m take theta <- theta - gamma frac g if frac > lambda
(optionally only if the oracle prefers the result). Each iteration writes one row of
``trace/compo.jsonl``; the summary goes to ``metrics.json`` under ``compo.``.

After each iteration the fp32 master weights are committed to ``compo_state/``
(:mod:`compo.zo.resume`); rerunning the same command continues from there. Under torchrun the m
perturbations are split across ranks (:mod:`compo.distributed`); only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from compo import distributed, state
from compo.errors import CompoError
from compo.rundir import RunDir
from compo.zo.directions import DirectionBatch, DirectionSampler, GaussianSphere
from compo.zo.estimator import Expected, MonteCarlo, cosine, limit_direction, norm
from compo.zo.head import HeadEvaluator
from compo.zo.resume import CompoState, fingerprint
from compo.zo.scope import Scope
from compo.zo.update import clip, normalise
from oracles.base import ParameterOracle, Verdict

log = logging.getLogger(__name__)

ESTIMATORS = ("monte_carlo", "expected")


class ComPO:
    """The zeroth-order optimizer of the output layer (plus optional modules).

    Defaults follow the paper where it pins them (r = 5e-4, m = 1600, lambda = 0.2, batch of one
    pair, ~1% of entries kept). The paper states no default gamma; its Table 3 uses 0.1 and 1 and
    reports changes of 0.01-0.1 nats. We use 0.1: on SmolLM2-135M (experiments/README.md, three
    seeds) it moved the ambiguous pairs by ~0.03 nats per pass in the intended directions with no
    measured harm; 0.01 moved them < 0.005 nats and changed no greedy answer; 1 moved them ~0.3
    nats and, over 44 iterations, lowered held-out utility in 2 of 2 seeds. Steps this small per
    entry (~1e-5 with ~1% of a unit vector kept) are why the perturbed tensors keep an fp32 master
    copy.

    Args:
        num_directions: m, oracle queries per iteration.
        radius: r, perturbation size.
        threshold: lambda; an iteration with frac <= lambda is skipped.
        step_size: gamma; the step is gamma * frac * g.
        clip_threshold: lambda_g; entries of the unit vector g below it are zeroed (None: off).
        keep_fraction: Keep only this fraction of g's largest entries (None: off).
        directions: Direction sampler (default :class:`GaussianSphere`).
        estimator: ``monte_carlo`` (oracle votes) or ``expected`` (the limit direction).
        centred: Centred votes y_i - mean(y).
        antithetic: Antithetic pairs (z, -z).
        acceptance_check: Apply a step only if the oracle prefers the updated weights.
        modules: Extra module names to perturb besides the output layer.
        batch_size: Pairs per iteration (per oracle query).
        epochs: Passes over the pairs.
        max_iterations: Stop after this many iterations (None: all pairs, all epochs).
        perturbation_batch: Directions alive at once (memory vs. speed).
        trace_limit: Compute the limit direction each iteration for the trace (two backward
            passes through the head; cheap next to m oracle queries).
        seed: Seeds every direction through (seed, iteration, index).
        pairs_path: Run on this preference file instead of the splitter's ambiguous split (the
            cli loads it; kept here so the config holds it).
        progress: Show progress bars.
        resume: Continue from ``compo_state/`` in the run dir when it exists.
        save_every: Commit ``compo_state/`` every this many iterations (0: only at the end).
    """

    def __init__(
        self,
        num_directions: int = 1600,
        radius: float = 5e-4,
        threshold: float = 0.2,
        step_size: float = 0.1,
        clip_threshold: float | None = None,
        keep_fraction: float | None = 0.01,
        directions: DirectionSampler | None = None,
        estimator: str = "monte_carlo",
        centred: bool = False,
        antithetic: bool = False,
        acceptance_check: bool = False,
        modules: Sequence[str] = (),
        batch_size: int = 1,
        epochs: int = 1,
        max_iterations: int | None = None,
        perturbation_batch: int = 4,
        trace_limit: bool = True,
        seed: int = 0,
        pairs_path: str | None = None,
        progress: bool = True,
        resume: bool = True,
        save_every: int = 1,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise CompoError(f"optimizer.estimator: {estimator!r} is not one of {ESTIMATORS}")
        if batch_size < 1 or epochs < 1:
            raise CompoError("optimizer.batch_size and optimizer.epochs must be >= 1")
        self.sampler = directions or GaussianSphere()
        self.monte_carlo = MonteCarlo(
            self.sampler, num_directions, radius, perturbation_batch, centred, antithetic
        )
        self.estimator = estimator
        self.threshold, self.step_size = threshold, step_size
        self.clip_threshold, self.keep_fraction = clip_threshold, keep_fraction
        self.acceptance_check = acceptance_check
        self.modules = list(modules)
        self.batch_size, self.epochs, self.max_iterations = batch_size, epochs, max_iterations
        self.trace_limit, self.seed = trace_limit, seed
        self.pairs_path, self.progress = pairs_path, progress
        self.resume, self.save_every = resume, save_every

    def settings(self) -> dict[str, Any]:
        """What the iterations' results depend on (for the resume fingerprint)."""
        ignored = {"epochs", "max_iterations", "progress", "pairs_path", "resume", "save_every"}
        out = {k: v for k, v in vars(self).items() if k not in ignored | {"sampler", "monte_carlo"}}
        out["sampler"] = [type(self.sampler).__name__, vars(self.sampler)]
        out["monte_carlo"] = {k: v for k, v in vars(self.monte_carlo).items() if k != "sampler"}
        return out

    def batches(self, pairs: Sequence) -> list[list]:
        out = []
        for _ in range(self.epochs):
            out.extend(
                list(pairs[i : i + self.batch_size]) for i in range(0, len(pairs), self.batch_size)
            )
        return out[: self.max_iterations] if self.max_iterations is not None else out

    def run(
        self, policy, tokenizer, pairs: Sequence, oracle: Any, run_dir: RunDir
    ) -> dict[str, Any]:
        """Runs ComPO on ``pairs`` (encoded) and leaves the updated weights in ``policy``.

        Returns:
            Summary metrics (also logged under ``compo.``), including ``changed``: whether any
            step was applied (the cli then saves a checkpoint).
        """
        if not isinstance(oracle, ParameterOracle):
            raise CompoError(
                f"oracle {type(oracle).__name__} is not a parameter-level oracle (begin/compare); "
                "ComPO needs one, e.g. oracle=likelihood"
            )
        if not pairs:
            raise CompoError("ComPO: no pairs to run on (the ambiguous split is empty)")
        started = time.perf_counter()
        scope = Scope(policy, self.modules)
        own_head = HeadEvaluator()
        pad = tokenizer.pad_token_id
        batches = self.batches(pairs)
        keeper = CompoState(
            run_dir.path / "compo_state", fingerprint(self.settings(), scope, pairs)
        )
        start = keeper.load(scope) if self.resume else 0
        if start > len(batches):
            raise CompoError(
                f"{keeper.dir}: holds {start} iterations, this run asks for {len(batches)}; "
                "use a new run dir or optimizer.resume=false"
            )
        # Rank 0 commits compo_state/ after its first iteration: every rank must have read it.
        distributed.barrier()
        rows = self._truncate_traces(run_dir, start) if distributed.is_main() else []
        if hasattr(oracle, "iteration"):
            # An oracle counting iterations (GenerativeOracle seeds its sampling noise with it)
            # must count from where the committed state ends.
            oracle.iteration = start - 1
        log.info(
            "ComPO: %d iterations%s, %d perturbed parameters (%s)",
            len(batches),
            f" (resuming after {start})" if start else "",
            scope.numel,
            ", ".join(scope.names),
        )
        progress = self.progress and distributed.is_main()
        with run_dir.trace("compo") as trace, torch.no_grad():
            todo = range(start, len(batches))
            bar = tqdm(todo, desc="compo", disable=not progress, initial=start, total=len(batches))
            for t in bar:
                row = self._iteration(t, batches[t], policy, scope, oracle, own_head, pad, progress)
                # The row first, then the commit: a row past the commit is dropped on resume.
                trace.write(row)
                rows.append(row)
                done = t + 1
                due = done == len(batches) or (self.save_every and done % self.save_every == 0)
                if due and distributed.is_main():
                    keeper.save(scope, done, batches, self.seed)
                bar.set_postfix(frac=f"{row['frac']:.2f}", applied=row["applied"])
        scope.write_back()
        summary = _summary(rows, time.perf_counter() - started)
        summary.update(resumed_from_iteration=start, iterations_run=len(batches) - start)
        run_dir.log_metrics("compo", summary)
        return summary

    @staticmethod
    def _truncate_traces(run_dir: RunDir, start: int) -> list[dict[str, Any]]:
        """Keeps the trace rows of the ``start`` committed iterations; returns ComPO's."""
        oracle_trace = run_dir.path / "trace" / "oracle.jsonl"
        state.truncate_trace(oracle_trace, lambda r: r.get("iteration", -1) < start)
        return state.truncate_trace(
            run_dir.path / "trace" / "compo.jsonl", lambda r: r["iteration"] < start
        )

    def _iteration(self, t, batch, policy, scope, oracle, own_head, pad, progress):
        started = time.perf_counter()
        base = oracle.begin(policy, scope, batch, pad)
        head = getattr(oracle, "head", None)
        if not isinstance(head, HeadEvaluator) or head.scope is not scope:
            head = own_head
            base = head.begin(policy, scope, batch, pad)
        n = len(batch)
        limit = None
        if self.trace_limit or self.estimator == "expected":
            limit = limit_direction(head)
        if self.estimator == "expected":
            est = Expected().estimate_from_limit(limit)
        else:
            support = head.support(self.sampler.top_k) if _needs_support(self.sampler) else None
            est = self.monte_carlo.estimate(oracle, scope, self.seed, t, support, progress=progress)
        g, raw_norm = normalise(est.vector)
        frac = est.frac
        row: dict[str, Any] = {
            "iteration": t,
            "pair_ids": [p.pair_id for p in batch],
            "m": est.m,
            "n_better": est.n_better,
            "n_worse": est.n_worse,
            "n_tie": est.n_tie,
            "frac": frac,
            "frac_predicted": limit.frac if limit else None,
            "angle_ab": limit.angle if limit else None,
            "cos_limit": cosine(g, limit.direction) if limit else None,
            "logp_chosen_before": base[:n].tolist(),
            "logp_rejected_before": base[n:].tolist(),
        }
        clipped, kept = clip(g, self.clip_threshold, self.keep_fraction)
        step = self.step_size * frac
        delta = [-step * c for c in clipped]
        reason = None
        if raw_norm == 0 or kept == 0:
            reason = "no signal: all votes cancel"
        elif frac <= self.threshold:
            reason = f"frac {frac:.3f} <= lambda {self.threshold}"
        elif self.acceptance_check:
            verdict = oracle.compare(DirectionBatch.from_tensors(delta))[0]
            if verdict != Verdict.PERTURBED_BETTER:
                reason = f"acceptance check: oracle says {verdict.name}"
        after = base
        if reason is None:
            # Before applying: the head's cache describes the current weights.
            after = base + head.deltas(DirectionBatch.from_tensors(delta))[0]
            scope.add_(delta)
        row.update(
            {
                "applied": reason is None,
                "skip_reason": reason,
                "step": step if reason is None else 0.0,
                "entries_kept": kept,
                "delta_norm": norm(delta) if reason is None else 0.0,
                "logp_chosen_after": after[:n].tolist(),
                "logp_rejected_after": after[n:].tolist(),
                "seconds": round(time.perf_counter() - started, 4),
            }
        )
        return row


def _needs_support(sampler) -> bool:
    return bool(getattr(sampler, "needs_support", False))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _summary(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    applied = [r for r in rows if r["applied"]]

    def changes(key: str) -> list[float]:
        after, before = f"logp_{key}_after", f"logp_{key}_before"
        return [a - b for r in rows for a, b in zip(r[after], r[before], strict=True)]

    d_chosen, d_rejected = changes("chosen"), changes("rejected")
    return {
        "changed": bool(applied),
        "n_iterations": len(rows),
        "n_applied": len(applied),
        "n_skipped": len(rows) - len(applied),
        "frac_mean": _mean(r["frac"] for r in rows),
        "frac_predicted_mean": _mean(r["frac_predicted"] for r in rows),
        "cos_limit_mean": _mean(r["cos_limit"] for r in rows),
        "delta_norm_sum": sum(r["delta_norm"] for r in rows),
        "delta_logp_chosen_mean": _mean(d_chosen),
        "delta_logp_rejected_mean": _mean(d_rejected),
        "seconds": round(seconds, 3),
    }


def run_compo(policy, tokenizer, encoded_pairs, oracle, optimizer: ComPO, run_dir: RunDir):
    """The cli's entry point: ``optimizer.run(...)``; returns the summary (``changed`` included)."""
    return optimizer.run(policy, tokenizer, encoded_pairs, oracle, run_dir)
