"""The ``compo`` command: a Hydra app running the pipeline on preference data.

    compo                                   # embedded default data and model (SmolLM2-135M)
    compo model=tiny                        # tiny random model, seconds on a CPU
    compo model=tiny data.path=pairs.jsonl  # your own file
    compo model=pretrained model.name_or_path=/path/to/hf/model

This is the only module that sees a config object: it instantiates each group's ``_target_`` with
plain arguments and runs the stages top to bottom. A stage is off when its group is ``none``.
User mistakes (bad file, missing model, bad option) end in one ``compo: error: ...`` line and
exit status 2.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compo.errors import CompoError
from compo.evaluate import preference_metrics
from compo.rundir import RunDir, atomic_write_text, write_jsonl

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
        raise CompoError(f"config group '{group}': {str(exc).strip().splitlines()[-1]}") from None


def _summary_table(metrics: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in metrics.items() if k.startswith(("eval.", "split.", "data.n_pairs"))]
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Runs the configured pipeline and returns the flat metrics.

    Args:
        cfg: The composed config.
        run_dir: Where everything is written.

    Returns:
        The metrics also written to ``metrics.json``.
    """
    started = time.perf_counter()
    out = RunDir(run_dir)
    atomic_write_text(out.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    data = _build(cfg.data, "data")
    loaded = data.load()
    if loaded.rejected:
        write_jsonl(out.path / "rejected_rows.jsonl", [r.to_dict() for r in loaded.rejected])
    out.log_metrics("data", {"n_pairs": len(loaded.pairs), "n_rows_rejected": len(loaded.rejected)})

    model_loader = _build(cfg.model, "model")
    log.info("loading model %s", model_loader.name)
    policy, tokenizer = model_loader.load()
    encoded, truncation = data.encode(loaded.pairs, tokenizer)
    out.log_metrics("data", truncation.as_metrics())

    evaluator = _build(cfg.eval, "eval")
    if evaluator is not None:
        chosen, rejected = evaluator.score(
            policy, encoded, tokenizer.pad_token_id, desc="eval/before"
        )
        out.log_metrics("eval.before", preference_metrics(chosen, rejected))

    # Later stages (splitter, first-order stage, ComPO optimizer) plug in here as they land; their
    # groups exist already and default to `none`, so nothing is reported that did not run.
    for group in ("splitter", "dpo", "optimizer", "oracle"):
        if _build(cfg.get(group), group) is not None:
            raise CompoError(
                f"config group '{group}': this stage is not implemented yet; use {group}=none"
            )

    out.log_metrics("run", {"seconds": round(time.perf_counter() - started, 3)})
    print(_summary_table(out.metrics))
    print(f"run dir: {out.path}")
    return out.metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, run_dir)
    except CompoError as exc:
        log.error("%s", exc)
        print(f"compo: error: {exc}", file=sys.stderr)
        sys.exit(2)
    # The returned value is what a Hydra sweeper optimises.
    return metrics.get("eval.after.accuracy", metrics.get("eval.before.accuracy"))


def main() -> None:
    """Console-script entry point."""
    _hydra_main()


if __name__ == "__main__":
    main()
