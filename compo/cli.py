"""The ``compo`` command: a Hydra app running the pipeline on preference data.

    compo                                   # embedded default data and model (SmolLM2-135M)
    compo model=tiny                        # tiny random model, seconds on a CPU
    compo model=tiny data.path=pairs.jsonl  # your own file
    compo model=pretrained model.name_or_path=/path/to/hf/model
    torchrun --nproc_per_node=2 -m compo model=tiny optimizer=compo_tiny oracle=likelihood

This is the only module that sees a config object: it instantiates each group's ``_target_`` with
plain arguments and runs the stages top to bottom. A stage is off when its group is ``none``.
User mistakes (bad file, missing model, bad option) end in one ``compo: error: ...`` line and
exit status 2.

Under torchrun every rank runs the whole pipeline (ComPO's perturbations are split across ranks,
see :mod:`compo.distributed`) in rank 0's run dir; only rank 0 writes it. Rerunning a command
in the same run dir resumes: DPO from ``dpo_state/``, ComPO from ``compo_state/``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compo import distributed, settings
from compo.data import load_pairs
from compo.errors import CompoError
from compo.evaluate import PreferenceEval, likelihood_displacement, preference_metrics
from compo.interfaces import ComparisonOracle, OracleError
from compo.models import save_checkpoint
from compo.rundir import RunDir, atomic_write_text, lock_run_dir, write_jsonl
from compo.scoring import SequenceScores
from compo.splitter import Split, record_split

log = logging.getLogger("compo")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _build(node: DictConfig | None, group: str) -> Any:
    """Instantiates a group's node, or returns None when the group is ``none`` (empty)."""
    if node is None or not OmegaConf.select(node, "_target_"):
        return None
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, CompoError):
            raise cause from None
        # Hydra's own message ends with "full_key: <group>"; the reason is the cause's.
        reason = str(cause).strip().splitlines()[0] if cause and str(cause).strip() else str(exc)
        raise CompoError(f"config group '{group}': {reason}") from None


def check_run_settings(cfg: DictConfig) -> None:
    """Checks the top-level settings every group interpolates (``seed``, ``device``)."""
    settings.number("seed", cfg.seed, integer=True, ge=0)
    settings.device("device", cfg.device)


# The headline numbers of a run; everything else is in metrics.json.
SUMMARY_KEYS = (
    "data.n_pairs",
    "split.n_clean",
    "split.n_ambiguous",
    "dpo.loss_first",
    "dpo.loss_last",
    "compo.n_iterations",
    "compo.n_applied",
    "compo.skipped_reason",
    "compo.radius_last",
    "compo.decisive_share",
    "compo.warning",
    "oracle.queries",
    "oracle.judge.texts_scored",
    "eval.before.accuracy",
    "eval.after.accuracy",
    "eval.displacement.clean.delta_logp_chosen",
    "eval.displacement.clean.delta_logp_rejected",
    "eval.displacement.ambiguous.delta_logp_chosen",
    "eval.displacement.ambiguous.delta_logp_rejected",
    "eval.displacement.ambiguous.frac_both_down",
    "run.seconds",
)


def _summary_table(metrics: dict[str, Any]) -> str:
    rows = [(k, metrics[k]) for k in SUMMARY_KEYS if k in metrics]
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def _rows(scores: tuple[SequenceScores, SequenceScores], rows: list[int]):
    """The (chosen, rejected) scores of the pairs at ``rows``."""
    index = torch.tensor(rows, dtype=torch.long)
    return tuple(
        SequenceScores(s.sum_logps[index], s.mean_logps[index], s.n_tokens[index]) for s in scores
    )


def _run_optimizer(optimizer, oracle, policy, tokenizer, data, encoded, split, out) -> bool:
    """Runs ComPO on the ambiguous split or ``optimizer.pairs_path``; True if weights changed."""
    if optimizer.pairs_path:
        loaded = load_pairs(optimizer.pairs_path, data.on_error)
        if loaded.rejected and distributed.is_main():
            rows = [r.to_dict() for r in loaded.rejected]
            write_jsonl(out.path / "rejected_rows.optimizer.jsonl", rows)
        out.log_metrics("compo", {"n_rows_rejected": len(loaded.rejected)})
        pairs = data.encode(loaded.pairs, tokenizer)[0]
    else:
        pairs = [encoded[i] for i in split.ambiguous]
    if not pairs:
        log.warning("compo: skipped: the splitter left no ambiguous pairs")
        out.log_metrics("compo", {"skipped_reason": "no ambiguous pairs"})
        return False
    summary = optimizer.run(policy, tokenizer, pairs, oracle, out)
    out.log_metrics("oracle", oracle.usage())
    return bool(summary["changed"])


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Runs the configured pipeline and returns the flat metrics.

    Args:
        cfg: The composed config.
        run_dir: Where everything is written.

    Returns:
        The metrics also written to ``metrics.json``.
    """
    check_run_settings(cfg)
    # Rank 0 alone writes the run dir, so it alone holds the lock (other ranks only read state).
    with lock_run_dir(run_dir) if distributed.is_main() else contextlib.nullcontext():
        return _run_locked(cfg, run_dir)


def _run_locked(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    main_rank = distributed.is_main()
    # Other ranks compute the same things and write nothing; they read resume state only.
    out = RunDir(run_dir) if main_rank else distributed.ReadOnlyRunDir(run_dir)
    if main_rank:
        atomic_write_text(out.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # Every stage is built (each checks its settings) before any file or model is read, so a
    # bad setting fails in a second and leaves nothing behind.
    data = _build(cfg.data, "data")
    model_loader = _build(cfg.model, "model")
    evaluator = _build(cfg.eval, "eval")
    splitter = _build(cfg.splitter, "splitter")
    trainer = _build(cfg.dpo, "dpo")
    optimizer = _build(cfg.optimizer, "optimizer")
    oracle = _build(cfg.oracle, "oracle")
    if optimizer is not None and oracle is None:
        raise CompoError(
            "optimizer: ComPO needs a comparison oracle; choose e.g. oracle=likelihood"
        )
    if optimizer is not None and not isinstance(oracle, ComparisonOracle):
        raise CompoError(
            f"oracle: {type(oracle).__name__} does not implement "
            "compo.interfaces.ComparisonOracle (subclass it for the default hooks)"
        )

    loaded = data.load()
    if loaded.rejected and main_rank:
        write_jsonl(out.path / "rejected_rows.jsonl", [r.to_dict() for r in loaded.rejected])
    out.log_metrics("data", {"n_pairs": len(loaded.pairs), "n_rows_rejected": len(loaded.rejected)})

    log.info("loading model %s", model_loader.name)
    policy, tokenizer = model_loader.load()
    encoded, truncation = data.encode(loaded.pairs, tokenizer)
    out.log_metrics("data", truncation.as_metrics())

    # The oracle is checked (API key, endpoint, reward model path) before any expensive work.
    if optimizer is not None:
        oracle.bind(tokenizer, out)
        oracle.check()
    # The policy as loaded is the reference model: its scores serve every stage. They come from
    # eval.before, or, without it, from one pass here when both the splitter and the trainer
    # would otherwise compute them each.
    before = None
    reference_pass = evaluator
    shared = getattr(splitter, "uses_reference", False) and trainer is not None
    if reference_pass is None and shared:
        reference_pass = PreferenceEval(batch_size=trainer.ref_batch_size)
    if reference_pass is not None:
        # The trainer may record its frozen blocks' output on the way (one forward pass less).
        scorer = trainer.trunk_recorder(policy) if trainer is not None else policy
        desc = "eval/before" if evaluator is not None else "reference"
        before = reference_pass.score(scorer, encoded, tokenizer.pad_token_id, desc=desc)
    if evaluator is not None:
        out.log_metrics("eval.before", preference_metrics(*before))

    if splitter is None:
        split = Split.all_clean(len(encoded))
    else:
        split = splitter.split(
            policy, loaded.pairs, encoded, tokenizer.pad_token_id, reference=before
        )
        if main_rank:
            record_split(out, loaded.pairs, split)

    model_changed = False
    if trainer is not None and not split.clean:
        log.warning("dpo: skipped: the splitter left no clean pairs")
        out.log_metrics("dpo", {"skipped_reason": "no clean pairs"})
    elif trainer is not None:
        clean = split.clean
        metrics = trainer.train(
            policy,
            [encoded[i] for i in clean],
            tokenizer.pad_token_id,
            out,
            confidences=[loaded.pairs[i].confidence for i in clean],
            reference=_rows(before, clean) if before is not None else None,
        )
        out.log_metrics("dpo", metrics)
        model_changed = True

    if optimizer is not None:
        model_changed |= _run_optimizer(
            optimizer, oracle, policy, tokenizer, data, encoded, split, out
        )
    if not main_rank:  # the checkpoint and eval.after are rank 0's alone: no collectives follow
        return out.metrics

    if model_changed:
        save_checkpoint(policy, tokenizer, out.checkpoint_dir)
        log.info("checkpoint saved to %s", out.checkpoint_dir)
    if model_changed and evaluator is not None:
        after = evaluator.score(policy, encoded, tokenizer.pad_token_id, desc="eval/after")
        out.log_metrics("eval.after", preference_metrics(*after))
        for side, rows in (("clean", split.clean), ("ambiguous", split.ambiguous)):
            if rows:
                shift = likelihood_displacement(_rows(before, rows), _rows(after, rows))
                out.log_metrics(f"eval.displacement.{side}", shift)

    out.log_metrics("run", {"seconds": round(time.perf_counter() - started, 3)})
    print(_summary_table(out.metrics))
    print(f"run dir: {out.path}")
    return out.metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # ${now:...} in hydra.run.dir can differ between ranks started a second apart: rank 0's wins.
    own_dir, run_dir = run_dir, distributed.broadcast_object(run_dir)
    if own_dir != run_dir:
        with contextlib.suppress(OSError):
            own_dir.rmdir()  # empty: other ranks run with hydra.output_subdir=null, no log file
    try:
        metrics = run(cfg, run_dir)
    except (CompoError, OracleError) as exc:
        log.error("%s", exc)
        print(f"compo: error: {exc}", file=sys.stderr)
        sys.exit(2)
    # The returned value is what a Hydra sweeper optimises.
    return metrics.get("eval.after.accuracy", metrics.get("eval.before.accuracy"))


def _quiet_hydra_args(argv: list[str]) -> list[str]:
    """Hydra overrides for ranks other than 0: no ``.hydra/`` copy, no log file in the run dir."""
    extra = ["hydra.output_subdir=null"]
    if not any(a.startswith(("hydra/job_logging=", "hydra.job_logging")) for a in argv):
        extra.append("hydra/job_logging=none")  # Python's default: warnings and errors only
    return [*argv, *extra]


def main() -> None:
    """Console-script entry point (also under torchrun: see :mod:`compo.distributed`)."""
    try:
        if distributed.init_from_env() and not distributed.is_main():
            sys.argv = [sys.argv[0], *_quiet_hydra_args(sys.argv[1:])]
        _hydra_main()
    finally:
        distributed.finalize()


if __name__ == "__main__":
    main()
