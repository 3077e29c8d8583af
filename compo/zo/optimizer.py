"""ComPO's practical scheme (arXiv 2505.05465, Algorithm 2) over the ambiguous pairs.

Per iteration t on ``batch_size`` pairs: draw m directions z_i (regenerated from (seed, t, i)),
ask the oracle y_i = C(theta, theta + r z_i), form g = sum_i y_i z_i / ||.|| in fp32, zero its
small entries, and with frac = |{y_i = -1}| / m take theta <- theta - gamma frac g if frac > lambda
(optionally only if the oracle prefers the result); r is :class:`compo.zo.radius.RadiusSchedule`'s.
Each iteration writes one row of ``trace/compo.jsonl``; their summary (:mod:`compo.zo.summary`)
goes to ``metrics.json`` under ``compo.``.

After each iteration the fp32 master weights are committed to ``compo_state/``
(:mod:`compo.zo.resume`); rerunning the same command continues from there. Under torchrun the m
perturbations are split across ranks (:mod:`compo.distributed`); only rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from compo import distributed, settings
from compo.data import keep_rejected, load_pairs
from compo.errors import CompoError
from compo.heldout import count_shared
from compo.interfaces import ComparisonOracle
from compo.rundir import RunDir
from compo.stages import Job, Outcome
from compo.zo.directions import DirectionBatch, DirectionSampler, GaussianSphere
from compo.zo.estimator import TIE_RULES, Expected, MonteCarlo, cosine, norm
from compo.zo.head import HeadEvaluator
from compo.zo.radius import PARAMETER_ORACLE_RADIUS, RADIUS_SCALES, RadiusSchedule, RadiusSearch
from compo.zo.resume import CompoState, identity, truncate_traces, untraced
from compo.zo.scope import Scope
from compo.zo.summary import low_decisive, noisy_direction, summarise
from compo.zo.update import clip, normalise

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

    Ties and abstentions carry no vote (``ties=ignore``): frac counts decisive verdicts only and
    an iteration without any is skipped. A run whose oracle was decisive on fewer than 5% of its
    queries ends with one warning line and ``compo.warning`` in the metrics.

    Args:
        num_directions: m, oracle queries per iteration.
        radius: r, the perturbation size, or ``auto`` (see :mod:`compo.zo.radius`).
        radius_scale: ``total`` (||r z|| = r, the paper) or ``per_entry`` (r per entry, the
            authors' code: ||r z|| ~ r sqrt(d)).
        target_differ: ``radius=auto``: share of perturbed responses that should differ.
        radius_every: ``radius=auto``: search again every this many iterations.
        radius_probes: ``radius=auto``: probe directions per measured share.
        threshold: lambda; an iteration with frac <= lambda is skipped.
        step_size: gamma; the step is gamma * frac * g.
        clip_threshold: lambda_g; entries of the unit vector g below it are zeroed (None: off).
        keep_fraction: Keep only this fraction of g's largest entries (None: off).
        directions: Direction sampler (default :class:`GaussianSphere`).
        estimator: ``monte_carlo`` (oracle votes) or ``expected`` (the oracle's r -> 0 limit).
        centred: Centred votes y_i - mean(y).
        antithetic: Antithetic pairs (z, -z), each compared with the current model.
        ties: ``ignore`` (a tie is no vote) or ``current`` (the authors' +1).
        acceptance_check: Apply a step only if the oracle prefers the updated weights.
        modules: Extra module names to perturb besides the output layer.
        batch_size: Pairs per iteration (per oracle query).
        epochs: Passes over the pairs.
        max_iterations: Stop after this many iterations (None: all pairs, all epochs).
        perturbation_batch: Directions alive at once (memory vs. speed).
        trace_limit: Trace each iteration's step against the oracle's own exact r -> 0
            direction when it has one (``cos_limit``; likelihood, judged_pairs, sample_scored),
            and the likelihood oracle's predicted frac and angle (two backward passes through
            the head; cheap next to m oracle queries). A vote run whose mean ``cos_limit`` is
            below :data:`compo.zo.summary.NOISY_COSINE` ends with a warning.
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
        radius: float | str = 5e-4,
        radius_scale: str = "total",
        target_differ: float = 0.5,
        radius_every: int = 10,
        radius_probes: int = 8,
        threshold: float = 0.2,
        step_size: float = 0.1,
        clip_threshold: float | None = None,
        keep_fraction: float | None = 0.01,
        directions: DirectionSampler | None = None,
        estimator: str = "monte_carlo",
        centred: bool = False,
        antithetic: bool = False,
        ties: str = "ignore",
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
        settings.choice("optimizer.estimator", estimator, ESTIMATORS)
        settings.choice("optimizer.ties", ties, TIE_RULES)
        settings.choice("optimizer.radius_scale", radius_scale, RADIUS_SCALES)
        for name, value in (
            ("batch_size", batch_size),
            ("epochs", epochs),
            ("radius_every", radius_every),
        ):
            settings.number(f"optimizer.{name}", value, integer=True, ge=1)
        settings.number(
            "optimizer.max_iterations", max_iterations, integer=True, ge=1, optional=True
        )
        settings.number("optimizer.save_every", save_every, integer=True, ge=0)
        settings.seed("optimizer.seed", seed)
        for name, value in (
            ("centred", centred),
            ("antithetic", antithetic),
            ("acceptance_check", acceptance_check),
            ("trace_limit", trace_limit),
            ("progress", progress),
            ("resume", resume),
        ):
            settings.flag(f"optimizer.{name}", value)
        settings.path("optimizer.pairs_path", pairs_path, null="the splitter's ambiguous pairs")
        modules = settings.names("optimizer.modules", modules)
        if directions is not None and not isinstance(directions, DirectionSampler):
            raise settings.SettingError(
                f"optimizer.directions must be a direction sampler (e.g. optimizer="
                f"compo_lowrank), got {type(directions).__name__}"
            )
        # frac is in [0, 1]; threshold=1 never steps (a dry run measuring the oracle's frac).
        settings.number("optimizer.threshold", threshold, ge=0, le=1)
        settings.number("optimizer.step_size", step_size, gt=0)
        # Entries of a unit vector are at most 1 in magnitude: lambda_g >= 1 zeroes all of them.
        settings.number("optimizer.clip_threshold", clip_threshold, ge=0, lt=1, optional=True)
        settings.number("optimizer.keep_fraction", keep_fraction, gt=0, le=1, optional=True)
        self.auto_radius = radius == "auto"
        if not self.auto_radius:
            if isinstance(radius, str):
                raise settings.SettingError(
                    f"optimizer.radius must be a finite number > 0 or 'auto', got {radius!r}"
                )
            radius = settings.number("optimizer.radius", radius, gt=0)
        self.radius, self.radius_scale, self.radius_every = radius, radius_scale, radius_every
        self.radius_search = RadiusSearch(target_differ, radius_probes)
        self.sampler = directions or GaussianSphere()
        self.monte_carlo = MonteCarlo(
            self.sampler,
            num_directions,
            radius if not self.auto_radius else PARAMETER_ORACLE_RADIUS,
            perturbation_batch,
            centred,
            antithetic,
            ties,
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

    needs_oracle = True

    @property
    def unpaired_fix(self) -> str | None:
        """ComPO's oracles compare pairs: unpaired examples are refused unless it reads its own
        pairs file (``optimizer.pairs_path``)."""
        return None if self.pairs_path else "optimizer=none"

    def fit(self, job: Job, rows: Sequence[int], oracle: ComparisonOracle) -> Outcome:
        """The zeroth-order stage: ComPO on the pairs at ``rows`` (or on ``pairs_path``)."""
        metrics: dict[str, Any] = {}
        if self.pairs_path:
            loaded = keep_rejected(
                job.out,
                "rejected_rows.optimizer",
                lambda: load_pairs(self.pairs_path, job.data.on_error),
            )
            metrics["n_rows_rejected"] = len(loaded.rejected)
            pairs = job.data.encode(loaded.pairs, job.tokenizer)[0]
            if job.heldout is not None:
                # optimizer.pairs_path bypasses the held-out split: say when they overlap.
                metrics["n_prompts_heldout_shared"] = count_shared(
                    {tuple(p.prompt_ids) for p in job.heldout.encoded},
                    {tuple(p.prompt_ids) for p in pairs},
                    "compo",
                    "optimizer.pairs_path",
                    "compo.n_prompts_heldout_shared",
                )
        else:
            pairs = [job.encoded[i] for i in rows]
        if not pairs:
            log.warning("compo: skipped: the splitter left no ambiguous pairs")
            return Outcome({"compo": {**metrics, "skipped_reason": "no ambiguous pairs"}})
        summary = self.run(job.policy, job.tokenizer, pairs, oracle, job.out)
        return Outcome(
            {"compo": {**metrics, **summary}, "oracle": oracle.usage()},
            changed=bool(summary["changed"]),
        )

    def settings(self) -> dict[str, Any]:
        """What the iterations' results depend on, under the optimizer config's names (a resume
        under other settings is refused naming the one that changed: ``optimizer.radius``).

        ``epochs``, ``max_iterations``, ``save_every``, ``progress``, ``resume`` and
        ``pairs_path`` are left out: the first two only extend or cut the list of batches (a
        longer rerun continues), the pairs themselves are recorded by digest, and the others
        do not touch the numbers.
        """
        carlo, search = self.monte_carlo, self.radius_search
        return {
            "num_directions": carlo.m,
            "radius": self.radius,
            "radius_scale": self.radius_scale,
            "target_differ": search.target,
            "radius_every": self.radius_every,
            "radius_probes": search.probes,
            "threshold": self.threshold,
            "step_size": self.step_size,
            "clip_threshold": self.clip_threshold,
            "keep_fraction": self.keep_fraction,
            "directions": {"type": type(self.sampler).__name__, **vars(self.sampler)},
            "estimator": self.estimator,
            "centred": carlo.centred,
            "antithetic": carlo.antithetic,
            "ties": carlo.ties,
            "acceptance_check": self.acceptance_check,
            "modules": self.modules,
            "batch_size": self.batch_size,
            # Sums over directions are accumulated a batch at a time: another batch changes the
            # fp32 rounding, so a continuation under it would not equal the uninterrupted run.
            "perturbation_batch": carlo.batch,
            "trace_limit": self.trace_limit,
            "seed": self.seed,
        }

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
            Summary metrics (``compo.*``), including ``changed``: whether any step was applied.
        """
        if not isinstance(oracle, ComparisonOracle):
            raise CompoError(
                f"oracle {type(oracle).__name__} does not implement compo.interfaces."
                "ComparisonOracle (subclass it for the defaults); e.g. oracle=likelihood"
            )
        if not pairs:
            raise CompoError("ComPO: no pairs to run on (the ambiguous split is empty)")
        started = time.perf_counter()
        pairs = oracle.prepare(list(pairs))
        if not pairs:
            log.warning("compo: skipped: the oracle kept none of the pairs (see oracle.*)")
            return {"changed": False, "skipped_reason": "oracle kept no pairs"}
        scope = Scope(policy, self.modules)
        head = HeadEvaluator()
        pad = tokenizer.pad_token_id
        batches = self.batches(pairs)
        keeper = CompoState(
            run_dir.path / "compo_state",
            identity(self.settings(), oracle.describe(), scope, pairs),
        )
        start = keeper.load(scope) if self.resume else 0
        if start > len(batches):
            raise CompoError(
                f"{keeper.dir}: holds {start} iterations, this run asks for {len(batches)}; "
                "use a new run dir or optimizer.resume=false"
            )
        # Rank 0 commits compo_state/ after its first iteration: every rank must have read it.
        distributed.barrier()
        rows = truncate_traces(run_dir.path, start) if distributed.is_main() else []
        self._radii = RadiusSchedule(
            None if self.auto_radius else self.radius,
            self.radius_scale,
            self.radius_every,
            self.radius_search,
            self.sampler,
            self.seed,
            self.monte_carlo.batch,
            keeper.radius if start else None,
        )
        log.info(
            "ComPO: %d iterations%s, %d perturbed parameters (%s)",
            len(batches),
            f" (resuming after {start})" if start else "",
            scope.numel,
            ", ".join(scope.names),
        )
        progress = self.progress and distributed.is_main()
        todo = range(start, len(batches))
        bar = tqdm(todo, desc="compo", disable=not progress, initial=start, total=len(batches))
        with run_dir.trace("compo") as trace, torch.no_grad(), bar:
            for t in bar:
                row = self._iteration(t, batches[t], policy, scope, oracle, head, pad, progress)
                # The row first, then the commit: a row past the commit is dropped on resume.
                trace.write(row)
                rows.append(row)
                done = t + 1
                due = done == len(batches) or (self.save_every and done % self.save_every == 0)
                if due and distributed.is_main():
                    keeper.save(scope, done, batches, self.seed, self._radii.in_force)
                bar.set_postfix(frac=f"{row['frac']:.2f}", applied=row["applied"])
        scope.write_back()
        summary = summarise(rows, time.perf_counter() - started)
        summary.update(resumed_from_iteration=start, iterations_run=len(batches) - start)
        warnings = []
        if distributed.is_main() and len(rows) < len(batches):
            warnings.append(untraced(len(rows), len(batches)))
            # An untraced iteration may have stepped: the weights count as changed.
            summary.update(n_iterations=len(batches), n_iterations_traced=len(rows), changed=True)
        # The expected estimator asks the oracle nothing: no verdicts, no estimate to judge.
        if self.estimator == "monte_carlo":
            found = (low_decisive(summary, self.auto_radius), noisy_direction(summary))
            warnings += [w for w in found if w]
        for warning in warnings:
            log.warning("compo: %s", warning)
        if warnings:
            summary["warning"] = "; ".join(warnings)
        return summary

    # ------------------------------------------------------------------ one iteration
    def _iteration(self, t, batch, policy, scope, oracle, head, pad, progress):
        started = time.perf_counter()
        base = head.begin(policy, scope, batch, pad)
        oracle.begin(policy, scope, batch, pad, iteration=t, head=head)
        n = len(batch)
        limit = head.limit() if self.trace_limit else None
        # The oracle's own exact direction (None for a judge of text): the expected estimator's
        # step, and what the trace measures a vote step against. Asked once: it may cost a
        # backward pass (the likelihood oracle's is the head's limit above, memoised).
        exact = oracle.limit() if self.trace_limit or self.estimator == "expected" else None
        radius, search = None, {}
        if self.estimator == "expected":
            est = Expected().estimate(oracle, exact)
        else:
            support = None
            if self.sampler.needs_support:
                support = oracle.support(self.sampler.top_k)
                support = head.support(self.sampler.top_k) if support is None else support
            radius, search = self._radii.at(t, oracle, scope, support)
            est = self.monte_carlo.estimate(
                oracle, scope, self.seed, t, support, progress=progress, radius=radius
            )
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
            "radius": radius,
            **search,
            "frac_predicted": limit.frac if limit else None,
            "angle_ab": limit.angle if limit else None,
            # No vote (all ties, or votes that cancel) has no direction: its cosine is undefined,
            # not the 0 that would pass for a noisy step.
            "cos_limit": (
                cosine(g, exact.direction) if exact and self.trace_limit and raw_norm else None
            ),
            "logp_chosen_before": base[:n].tolist(),
            "logp_rejected_before": base[n:].tolist(),
        }
        clipped, kept = clip(g, self.clip_threshold, self.keep_fraction)
        step = self.step_size * frac
        delta = [-step * c for c in clipped]
        reason = None
        if est.m and est.n_better + est.n_worse == 0 and self.monte_carlo.ties == "ignore":
            reason = f"no decisive verdicts: {est.n_tie} of {est.m} ties"
        elif raw_norm == 0 or kept == 0:
            reason = "no signal: all votes cancel"
        elif frac <= self.threshold:
            reason = f"frac {frac:.3f} <= lambda {self.threshold}"
        elif self.acceptance_check:
            vote = oracle.compare(DirectionBatch.from_tensors(delta))[0]
            if not vote < 0:
                reason = f"acceptance check: oracle's vote {float(vote):+g} is not an improvement"
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
