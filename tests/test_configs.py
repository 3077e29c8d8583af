"""Every config file composes, and every ``_target_`` accepts the arguments it is given.

Arguments are bound to the target's signature without building anything (no model is loaded).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from compo.cli import CONFIG_DIR

CONFIGS = Path(CONFIG_DIR)
# Groups provided by Hydra itself (or its plugins) are composed by Hydra; ours are checked here.
OWN_GROUPS = sorted(
    str(p.relative_to(CONFIGS).parent)
    for p in CONFIGS.rglob("*.yaml")
    if p.parent != CONFIGS and not str(p.relative_to(CONFIGS)).startswith(("hydra", "experiment"))
)


def _needs_plugin(path: Path) -> list:
    """Marks a file that switches Hydra's sweeper to Optuna: it composes with the sweep extra."""
    wanted = "override /hydra/sweeper: optuna" in path.read_text()
    missing = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None
    reason = "needs the sweep extra (pip install -e '.[sweep]')"
    return [pytest.mark.skipif(wanted and missing, reason=reason)]


def _options():
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS)
        if rel.parent == Path("."):
            yield []
        elif rel.parts[0] == "experiment":
            yield pytest.param([f"+experiment={rel.stem}"], marks=_needs_plugin(path))
        elif rel.parent == Path("oracle/judge"):  # a judge is chosen inside an output-level oracle
            yield ["oracle=sample_scored", f"oracle/judge={rel.stem}"]
        else:
            yield [f"{'/'.join(rel.parent.parts)}={rel.stem}"]


def _required_overrides(overrides):
    # Options with mandatory values (???) need one to compose; a placeholder path is enough here.
    if overrides == ["model=pretrained"]:
        return [*overrides, "model.name_or_path=/nonexistent/model"]
    return overrides


def _resolve(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _check_targets(node, where: str) -> int:
    checked = 0
    if isinstance(node, DictConfig):
        if "_target_" in node:
            target = _resolve(node._target_)
            kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
            inspect.signature(target).bind(**kwargs)
            checked += 1
        for key, value in node.items():
            checked += _check_targets(value, f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            checked += _check_targets(value, f"{where}[{i}]")
    return checked


@pytest.mark.parametrize("overrides", list(_options()), ids=lambda o: " ".join(o) or "config")
def test_config_composes_and_targets_bind(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=_required_overrides(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
    _check_targets(cfg.hydra.launcher, "hydra.launcher")
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(job)  # every interpolation resolves
    assert _check_targets(job, "cfg") >= 2  # at least model and data


def test_every_yaml_starts_with_the_command_that_runs_it():
    for path in CONFIGS.rglob("*.yaml"):
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
        assert lines[0].startswith("# compo"), f"{path}: first line should be '# compo ...'"


def test_every_stage_group_has_a_none_option():
    for group in ("splitter", "dpo", "optimizer", "oracle", "eval"):
        assert (CONFIGS / group / "none.yaml").is_file(), group
    assert OWN_GROUPS  # the glob found our groups


def _group_nodes():
    """(file, composed node) of every option of our groups that builds an object."""
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS)
        if rel.parent == Path(".") or rel.parts[0] in ("experiment", "hydra"):
            continue
        group = "/".join(rel.parent.parts)
        overrides = [f"{group}={rel.stem}"]
        if group == "oracle/judge":
            overrides = ["oracle=sample_scored", f"oracle/judge={rel.stem}"]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=_required_overrides(overrides))
        yield rel, OmegaConf.select(cfg, group.replace("/", "."))


# Constructor arguments that are objects or streams handed over in code, never config values.
CODE_ONLY = {"stdin", "stdout"}


@pytest.mark.parametrize(
    ("rel", "node"), list(_group_nodes()), ids=lambda x: str(x) if isinstance(x, Path) else ""
)
def test_every_constructor_argument_has_a_yaml_key(rel, node):
    """The other direction of the binding check: a setting with no YAML key cannot be overridden
    from the command line (`+key=` is needed, and a typo there passes silently)."""
    # The group's object and every object nested in it (dpo.loss, optimizer.directions).
    nodes = [node, *(v for v in node.values() if isinstance(v, DictConfig) and "_target_" in v)]
    for each in nodes:
        target = _resolve(each._target_)
        params = list(inspect.signature(target).parameters.values())
        # A class taking **options passes them to its base: those need keys too.
        for base in target.__mro__[1:] if isinstance(target, type) else []:
            if any(p.kind == p.VAR_KEYWORD for p in params) and "__init__" in vars(base):
                params += list(inspect.signature(base.__init__).parameters.values())[1:]
        wanted = {
            p.name
            for p in params
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in CODE_ONLY
        }
        missing = sorted(wanted - set(each.keys()))
        assert not missing, f"{rel}: no key for {missing} ({each._target_})"


def _top_command(path: Path) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
    command = lines[0].removeprefix("# ").split("  ")[0].split("(")[0]
    return command.split()


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=_needs_plugin(p), id=p.name) for p in sorted(CONFIGS.rglob("*.yaml"))],
)
def test_the_command_at_the_top_of_each_yaml_composes(path):
    words = _top_command(path)
    assert words[0] == "compo", words
    overrides = [w for w in words[1:] if "=" in w and not w.startswith("-")]
    if "-m" in words:  # a sweep: compose its first job (the first value of each swept key)
        overrides = [w.split(",")[0] for w in overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(job)
    _check_targets(job, "cfg")
