"""The package's layering: oracles/ sees compo through compo.interfaces only; no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, everywhere: bool) -> set[str]:
    """Modules of compo/oracles imported by ``path`` (module level, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    # Module level includes `if TYPE_CHECKING:` blocks: a cycle through annotations is a cycle.
    top = [n for node in tree.body for n in (node.body if isinstance(node, ast.If) else [node])]
    nodes = ast.walk(tree) if everywhere else top
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in ("compo", "oracles")}


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_oracles_use_compo_only_through_its_interface_module():
    """Every import of compo in oracles/, lazy ones included, is of compo.interfaces."""
    for path in _sources("oracles"):
        for module in _imports(path, everywhere=True):
            if module.startswith("compo"):
                assert module.startswith("compo.interfaces"), f"{path.name} imports {module}"


def test_compo_never_imports_oracles():
    for path in _sources("compo"):
        assert not any(m.startswith("oracles") for m in _imports(path, everywhere=True)), path


def test_no_import_cycle_between_modules():
    modules = {_module_name(p): p for p in _sources("compo") + _sources("oracles")}
    graph = {
        name: {m for m in _imports(path, everywhere=False) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert len(graph) > 30  # the walk saw the package, not an empty directory
