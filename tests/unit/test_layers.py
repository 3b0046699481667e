"""The layers show in the imports: transport at the bottom, runtime above it, stages above
that, the command line at the edge; no import cycle. Read from the source, not by importing."""

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGES = ("shared", "services")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


MODULES = _modules()


def imports(name: str) -> set[str]:
    """Every module `name` imports, at any depth of its code (function bodies included)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in MODULES}  # fmt: skip
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_only_the_transport_talks_to_nats_py():
    users = {m for m in MODULES if any(_under(i, "nats") for i in imports(m))}
    assert users and all(_under(m, "shared.transport") for m in users), users
    assert "shared.transport.memory" not in users
    assert "shared.transport.api" not in users


def test_the_transport_knows_nothing_of_the_pipeline():
    for name in (m for m in MODULES if _under(m, "shared.transport")):
        project = {i for i in imports(name) if i.split(".")[0] in PACKAGES}
        allowed = {i for i in project if _under(i, "shared.transport") or i == "shared.errors"}
        assert project == allowed, (name, project - allowed)
    api = {i for i in imports("shared.transport.api") if i.split(".")[0] in PACKAGES}
    assert api == set(), api


def test_the_library_never_imports_a_stage_or_the_edge():
    for name in MODULES:
        if not _under(name, "shared") or _under(name, "shared.app"):
            continue
        above = {i for i in imports(name) if _under(i, "services") or _under(i, "shared.app")}
        assert not above, (name, above)


def test_stages_use_the_stage_api_not_the_runtime_or_the_bus():
    for name in MODULES:
        if not _under(name, "services") or name.endswith("__main__"):
            continue
        below = {
            i for i in imports(name)
            if _under(i, "nats") or _under(i, "shared.transport") or _under(i, "shared.runtime")
            or _under(i, "shared.app")
        }  # fmt: skip
        assert not below, (name, below)


def test_no_import_cycle():
    graph = {name: {i for i in imports(name) if i in MODULES and i != name} for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
