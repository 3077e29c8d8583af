"""The ``compo`` command: a Hydra app running the pipeline on preference data.

    compo                                   # embedded default data and model (SmolLM2-135M)
    compo model=tiny                        # tiny random model, seconds on a CPU
    compo model=tiny data.path=pairs.jsonl  # your own file
    compo model=pretrained model.name_or_path=/path/to/hf/model
    torchrun --nproc_per_node=2 -m compo model=tiny optimizer=compo_tiny oracle=likelihood

This is the only module that sees a config object: it instantiates each group's ``_target_`` with
plain arguments (a group set to ``none`` builds a do-nothing stage) and hands them to the recipe,
:func:`compo.pipeline.run_pipeline`. It keeps Hydra, ranks and errors: user mistakes (bad file,
missing model, bad option) end in one ``compo: error: ...`` line and exit status 2.

Under torchrun every rank runs the whole pipeline (ComPO's perturbations are split across ranks,
see :mod:`compo.distributed`) in rank 0's run dir; only rank 0 writes it. Rerunning a command
in the same run dir resumes: DPO from ``dpo_state/``, ComPO from ``compo_state/``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compo import distributed, settings, tracking
from compo.errors import CompoError, first_line
from compo.interfaces import ComparisonOracle, OracleError
from compo.objective import Objective, sweeper_direction
from compo.pipeline import Stages, run_pipeline
from compo.rundir import RunDir, atomic_write_text, lock_run_dir
from compo.stages import (
    Evaluator,
    FirstOrderStage,
    NoOracle,
    Splitter,
    ZerothOrderStage,
)

log = logging.getLogger("compo")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _build(node: DictConfig, group: str) -> Any:
    """Instantiates a group's node (``none`` options build do-nothing stages)."""
    if not OmegaConf.select(node, "_target_"):
        raise CompoError(f"config group '{group}': no _target_ to build")
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__  # a nested node (dpo.loss) failed inside its parent
        if isinstance(cause, CompoError):
            raise cause from None
        # Hydra's own message ends with "full_key: <group>"; the reason is the cause's.
        reason = first_line(cause) if cause is not None else str(exc)
        raise CompoError(f"config group '{group}': {reason}") from None


def check_run_settings(cfg: DictConfig) -> None:
    """Checks the top-level settings every group interpolates (``seed``, ``device``, ``dtype``)
    and ``report_to``.

    ``auto`` is resolved here, once: every ``${device}`` then names the same device, and the
    run dir's ``config.yaml`` says what ran.
    """
    settings.seed("seed", cfg.seed)
    cfg.device = settings.device("device", cfg.device)
    cfg.dtype = settings.dtype("dtype", cfg.dtype, cfg.device)
    tracking.check(cfg.report_to)


# The headline numbers of a run; everything else is in metrics.json.
SUMMARY_KEYS = (
    "data.n_pairs",
    "data.n_examples",
    "data.heldout.n_pairs",
    "split.n_clean",
    "split.n_ambiguous",
    "dpo.loss_first",
    "dpo.loss_last",
    "compo.n_iterations",
    "compo.n_iterations_traced",  # only when a resumed run's trace lost rows
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
    "eval.displacement.clean.delta_logp_desirable",  # unpaired examples (KTO's data)
    "eval.displacement.clean.delta_logp_undesirable",
    "eval.displacement.clean.frac_desirable_down",
    "eval.displacement.ambiguous.delta_logp_chosen",
    "eval.displacement.ambiguous.delta_logp_rejected",
    "eval.displacement.ambiguous.frac_both_down",
    "eval.displacement.ambiguous.frac_up_down",
    "eval.heldout.before.accuracy",
    "eval.heldout.after.accuracy",
    "eval.displacement.heldout.frac_both_down",
    "run.objective",
    "run.objective_value",
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


def warn_unread_keys(cfg: DictConfig) -> None:
    """Warns about top-level keys added on the command line (``+seeds=1``) that compo's configs do
    not define: nothing reads them, and a typo of a setting would otherwise pass unnoticed.
    (They stay in config.yaml, where metadata such as ``+note=baseline`` belongs.)"""
    if not HydraConfig.initialized():
        return
    primary = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml")
    known = {k for k in primary if k not in ("defaults", "hydra")}
    known |= {group.name for group in Path(CONFIG_DIR).iterdir() if group.is_dir()}  # +experiment=
    added = []
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0]
        if key.startswith("+") and "." not in key and key.lstrip("+") not in known:
            added.append(key)
    if added:
        near = difflib.get_close_matches(added[0].lstrip("+"), sorted(known), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        log.warning(
            "config: %s: nothing in compo reads these new top-level keys (kept in config.yaml)%s",
            ", ".join(added),
            hint,
        )


def check_interpolations(cfg: DictConfig) -> None:
    """Resolves every ``${...}`` of the config once (without changing it), so an unresolvable one
    (an unset ``${oc.env:...}``, a misspelt key) is one line naming the setting.

    Raises:
        CompoError: A required setting left unset (``???``), or an interpolation that cannot
            be resolved.
    """
    try:
        OmegaConf.to_container(cfg, resolve=True)
        missing = sorted(OmegaConf.missing_keys(cfg))  # resolves too: after the check above
        if missing:
            raise CompoError(f"{missing[0]}: must be set (it has no default)")
        return
    except OmegaConfBaseException as exc:
        failed, key = exc, exc.full_key
    # Blame the setting that holds the bad interpolation, not one that refers to it (model.seed
    # is ${seed}): the shallowest failing key, as the user wrote them on the command line.
    for path in sorted(_leaf_paths(OmegaConf.to_container(cfg, resolve=False)), key=len):
        try:
            OmegaConf.select(cfg, ".".join(path), throw_on_resolution_failure=True)
        except OmegaConfBaseException as exc:
            failed, key = exc, ".".join(path)
            break
    raise CompoError(f"{key}: cannot resolve its value: {first_line(failed)}")


def _leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, (*prefix, str(k)))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*prefix, str(i)))]
    return [prefix]


def build_stages(cfg: DictConfig) -> Stages:
    """Builds every stage from its config group; each checks its own settings here.

    Raises:
        CompoError: A setting is out of its domain, or the optimizer has no oracle to ask.
    """
    check_run_settings(cfg)
    stages = Stages(
        data=_build(cfg.data, "data"),
        model=_build(cfg.model, "model"),
        evaluator=_build(cfg.eval, "eval"),
        splitter=_build(cfg.splitter, "splitter"),
        first_order=_build(cfg.dpo, "dpo"),
        zeroth_order=_build(cfg.optimizer, "optimizer"),
        oracle=_build(cfg.oracle, "oracle"),
    )
    for group, stage, protocol in (
        ("eval", stages.evaluator, Evaluator),
        ("splitter", stages.splitter, Splitter),
        ("dpo", stages.first_order, FirstOrderStage),
        ("optimizer", stages.zeroth_order, ZerothOrderStage),
        ("oracle", stages.oracle, ComparisonOracle),
    ):
        if not isinstance(stage, protocol):
            raise CompoError(
                f"{group}: {type(stage).__name__} does not implement {protocol.__name__} "
                f"(see {protocol.__module__})"
            )
    if stages.zeroth_order.needs_oracle and isinstance(stages.oracle, NoOracle):
        raise CompoError(
            "optimizer: ComPO needs a comparison oracle; choose e.g. oracle=likelihood"
        )
    return stages


def _sweeper_direction() -> str | None:
    """The direction of the sweeper running this job, if it optimises a value (multirun only)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return sweeper_direction(HydraConfig.get().sweeper)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Builds the stages, then runs the recipe in ``run_dir``; returns the flat metrics.

    Every stage is built (checking its settings) before any file or model is read, so a bad
    setting fails in a second and leaves nothing behind. Rank 0 alone writes the run dir and holds
    its lock; other ranks compute the same things and only read resume state. The objective
    (``run.objective_value``, what a sweeper optimises) is looked up once the run is done.

    Raises:
        CompoError: A user mistake; also the objective missing, after the run dir is written.
    """
    if HydraConfig.initialized() and HydraConfig.get().job.chdir:
        # Every path setting (data, caches, pairs files, models) is relative to the launch
        # directory; under chdir they would silently name files inside the run dir.
        raise CompoError(
            "hydra.job.chdir=true is not supported: compo reads relative paths from the "
            "directory it is started in, and writes only into the run dir anyway"
        )
    check_interpolations(cfg)
    warn_unread_keys(cfg)
    objective = Objective(cfg.objective, cfg.objective_direction, _sweeper_direction())
    stages = build_stages(cfg)
    if not distributed.is_main():
        return run_pipeline(stages, distributed.ReadOnlyRunDir(run_dir))
    plain = OmegaConf.to_container(cfg, resolve=True)
    with lock_run_dir(run_dir), tracking.start(plain["report_to"], run_dir, plain) as trackers:
        out = RunDir(run_dir, trackers)
        metrics = run_pipeline(stages, out)
        found = objective.evaluate(metrics)
        out.log_metrics("run", found.as_metrics())
        out.save(OmegaConf.to_yaml(cfg, resolve=True))
    print(_summary_table(metrics))
    print(f"run dir: {out.path}")
    if found.error is not None:
        raise CompoError(found.error)
    return metrics


def refused_secrets(cfg: DictConfig) -> tuple[str, ...]:
    """The values the oracle group refuses because they look secret, for a run that stopped on
    another error first (``dpo.lr=-1``): Hydra's copy of the config must lose them all the same.

    Building a group reads no file and no model, so it is cheap here; any other failure of it
    means it refuses no secret.
    """
    try:
        _build(cfg.oracle, "oracle")
    except CompoError as exc:
        return exc.secrets
    except Exception:  # whatever else fails, there is no secret to scrub
        return ()
    return ()


def scrub_hydra_copy(run_dir: Path, secrets: tuple[str, ...]) -> None:
    """Replaces ``secrets`` by ``***`` in Hydra's copies of the config: ``.hydra/`` in the run
    dir and, in a sweep, ``multirun.yaml`` at the sweep dir's root.

    Hydra writes those copies, command-line overrides included, before compo checks any setting;
    a setting refused because it looks secret (:attr:`CompoError.secrets`) is removed from them.
    (Hydra also prints a sweep job's overrides when it launches it: that is on the terminal
    only, where the user typed them.)
    """
    if not secrets or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    paths = []
    if hydra_cfg.output_subdir is not None:
        paths += sorted((run_dir / hydra_cfg.output_subdir).glob("*.yaml"))
    # The overrides that held a secret: in a sweep their other values (a swept list of keys)
    # are in the sweep's files too, so each such override loses its whole value there.
    keys = [o.partition("=")[0] for o in hydra_cfg.overrides.task if any(x in o for x in secrets)]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = Path(hydra_cfg.sweep.dir)
        paths += [sweep / "multirun.yaml", *sorted(sweep.glob(f"*/{hydra_cfg.output_subdir}/*"))]
    for path in paths:
        if not path.is_file() or path.suffix != ".yaml":
            continue
        text = path.read_text(encoding="utf-8")
        scrubbed = text
        for secret in sorted(secrets, key=len, reverse=True):
            scrubbed = scrubbed.replace(secret, "***")
        for key in keys:
            scrubbed = re.sub(rf"(?<![\w.]){re.escape(key)}=[^\n]*", f"{key}=***", scrubbed)
        if scrubbed != text:
            atomic_write_text(path, scrubbed)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), raised like Ctrl-C so that a run stops the
    same way: one line saying how to resume, not a silent exit."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _exit_interrupted(exc: KeyboardInterrupt, message: str) -> None:
    """Prints ``compo: <message>`` and exits as a shell reports the signal (130, SIGTERM 143)."""
    print(f"compo: {message}", file=sys.stderr)
    sys.exit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT))


def _log_to_files_only(message: str) -> None:
    """Record an error in the run's log file (cli.log) without Hydra's console copy of it.

    The terminal gets the error once, as the ``compo: error:`` line on stderr; the log file keeps
    it next to the run's other records.
    """
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


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
        scrub_hydra_copy(run_dir, getattr(exc, "secrets", ()) or refused_secrets(cfg))
        _log_to_files_only(str(exc))
        print(f"compo: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see main): every stage resumes
        message = f"interrupted; the same command with hydra.run.dir={run_dir} resumes the run"
        _log_to_files_only(message)
        _exit_interrupted(exc, message)
    # What a Hydra sweeper optimises (None on ranks other than 0, and without an objective).
    return metrics.get("run.objective_value")


def _quiet_hydra_args(argv: list[str]) -> list[str]:
    """Hydra overrides for ranks other than 0: no ``.hydra/`` copy, no log file in the run dir."""
    extra = ["hydra.output_subdir=null"]
    if not any(a.startswith(("hydra/job_logging=", "hydra.job_logging")) for a in argv):
        extra.append("hydra/job_logging=none")  # Python's default: warnings and errors only
    return [*argv, *extra]


def hydra_error_line(exc: CompactHydraException) -> str:
    """Hydra's report of an override it refused (an unknown key or option, a syntax error), which
    it prints in up to ~16 lines with its config search path, as one line.

    Hydra's hint to append a new key repeats the override's value; it is given without the value,
    which may be a secret typed under a misspelt key.
    """
    text = str(exc).split("Config search path:")[0]
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if raw[:1].isspace() and parts:  # one of the options Hydra lists under "Available options"
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
        elif line.startswith("To append to your config use +"):
            parts.append("to add it as a new key, prefix it with +")
        else:
            line = line.rstrip(".")
            parts.append(line if not parts else line[:1].lower() + line[1:])
    cause = exc.__cause__
    return "; ".join(parts) + (f" ({first_line(cause)})" if str(cause or "").strip() else "")


def raised_in_job(exc: BaseException) -> bool:
    """Whether an exception comes from compo's code (its job, a resolver) rather than from Hydra
    or a plugin before or after the job (two modes given, ``--cfg job --resolve`` on an
    unresolvable value, a launcher or sweeper setting out of its domain).

    That is: a frame of this package other than :func:`main` in its traceback, in the traceback
    of its cause or context, or in a worker's traceback that a launcher (joblib) attached to it
    as text. Oracles run inside the job, below :func:`_hydra_main`, so their frames come with
    one of this package's.
    """
    package = str(Path(__file__).resolve().parent) + os.sep
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame in traceback.extract_tb(current.__traceback__):
            entry_point = frame.name == "main" and frame.filename == __file__
            if frame.filename.startswith(package) and not entry_point:
                return True
        if package in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


RUN_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")


def _leading_interpolation(value: str) -> str | None:
    """The ``${...}`` a value starts with (balanced braces), if any."""
    if not value.startswith("${"):
        return None
    depth = 0
    for i, char in enumerate(value):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "}" and depth == 0:
            return value[: i + 1]
    return None


def _resolved(value: str) -> str | None:
    """``value`` with its interpolations resolved where OmegaConf can (None: only Hydra can,
    e.g. ``now``)."""
    if "${" not in value:
        return value
    try:
        with warnings.catch_warnings():  # `${oc.env:OUT,}`: "some elements are missing"
            warnings.simplefilter("ignore")
            return str(OmegaConf.create({"value": value}).value)
    except OmegaConfBaseException:
        return None


def _bad_run_dir(argv: list[str]) -> str | None:
    """Why a run or sweep dir override names no directory of its own, if one does.

    An unset shell variable, ``hydra.run.dir=$OUT`` or ``$OUT/``, or an interpolation resolving
    to nothing, ``${oc.env:OUT,}``, would make Hydra write the run into the working directory
    or the filesystem root; an empty or ``.`` ``hydra.sweep.subdir`` would put every job of a
    sweep in one dir.
    """
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key not in RUN_DIR_KEYS:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # Hydra's quoted string
        resolved = _resolved(value)
        if resolved is None:
            continue
        if not resolved.strip(" '\""):
            return f"{key} is empty (an unset shell variable?); give a directory"
        leading = _leading_interpolation(value)
        lead = _resolved(leading) if leading else None  # None: no such part, or only Hydra's
        if lead is not None and not lead.strip():
            return (
                f"{key} starts with a variable that is empty (an unset shell variable?); "
                "give a directory"
            )
        if key == "hydra.sweep.subdir" and os.path.normpath(resolved) == ".":
            return f"{key} is the sweep dir itself: every job would share it; give a name"
        if key != "hydra.sweep.subdir" and os.path.normpath(resolved) == "/":
            return f"{key} is the filesystem root (an unset shell variable?); give a directory"
    return None


def main() -> None:
    """Console-script entry point (also under torchrun: see :mod:`compo.distributed`)."""
    if sys.argv[1:] == ["--version"]:
        print(f"compo {importlib.metadata.version('compo')}")
        return
    bad_dir = _bad_run_dir(sys.argv[1:])
    if bad_dir is not None:  # checked before Hydra writes .hydra/ into the run dir
        print(f"compo: error: {bad_dir}", file=sys.stderr)
        sys.exit(2)
    # Hydra prints a refused override in several lines and exits 1; told to raise instead, it
    # lets compo say it in one line. A user who set HYDRA_FULL_ERROR gets Hydra's full report.
    user_wants_full_error = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if distributed.init_from_env() and not distributed.is_main():
            sys.argv = [sys.argv[0], *_quiet_hydra_args(sys.argv[1:])]
        _hydra_main()
    except CompactHydraException as exc:
        if user_wants_full_error:
            raise
        print(f"compo: error: {hydra_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # e.g. Hydra making the run dir where a file is, or no space left
        if user_wants_full_error or exc.filename is None:
            raise
        print(f"compo: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:  # before a run dir was made
        _exit_interrupted(exc, "interrupted")
    except Exception as exc:
        # Hydra or a plugin failed outside the job: a user's flag or hydra.* setting, said in
        # one line. A failure inside compo's job is a bug and keeps its traceback.
        if user_wants_full_error or raised_in_job(exc):
            raise
        print(
            f"compo: error: hydra: {first_line(exc)} (HYDRA_FULL_ERROR=1 shows where)",
            file=sys.stderr,
        )
        sys.exit(2)
    finally:
        if not user_wants_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        distributed.finalize()


if __name__ == "__main__":
    main()
