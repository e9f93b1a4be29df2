"""The layout as a contract: which module may import which.

``storage`` and ``backpressure`` (installed as ``eventbus.storage`` and
``eventbus.backpressure``: the repository keeps them at the top, and ``eventbus/``
links to them) import nothing of the rest of the project. Inside ``eventbus`` every
subsystem sits on a floor, and imports only from lower floors or
from its own package; no module takes part in an import cycle, imports for typing
(``if TYPE_CHECKING:``) included, since those mark a two-way dependency too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each folder of the repository and the name it is imported by.
PACKAGES = {
    "eventbus": "eventbus",
    "storage": "eventbus.storage",
    "backpressure": "eventbus.backpressure",
}
FOUNDATIONS = ("eventbus.storage", "eventbus.backpressure")

# The floors of eventbus: a module imports only from lower floors, or within its
# own package (a subpackage, or the top-level module itself).
FLOORS: dict[str, int] = {
    # the foundations, which import nothing of the project
    "eventbus.storage": -1,
    "eventbus.backpressure": -1,
    # what every subsystem shares
    "eventbus._errors": 0,
    "eventbus.progress": 0,
    "eventbus._config": 1,
    "eventbus._clock": 1,
    "eventbus._event": 1,
    "eventbus._metrics": 1,
    "eventbus._logging": 1,
    "eventbus._stopping": 1,
    "eventbus._effect_log": 2,
    "eventbus._payloads": 2,
    "eventbus._run": 2,
    "eventbus._export": 2,
    # subsystems
    "eventbus.publish": 2,
    "eventbus.failures": 2,
    "eventbus.dispatch": 3,
    "eventbus.workflows": 3,
    "eventbus.reconcile": 4,
    "eventbus._hooks": 4,
    # the facade
    "eventbus._reconciliation": 5,
    "eventbus._unclaimed": 5,
    "eventbus._log_access": 5,
    "eventbus._bus": 6,
    # built on the facade
    "eventbus._effects": 7,
    "eventbus.operators": 7,
    "eventbus.dashboard": 7,
    "eventbus.cli": 8,
    "eventbus._chaos_pg": 7,
    "eventbus.chaos": 8,
    "eventbus.testing": 8,
    # optional exporters, imported only when used
    "eventbus.prometheus": 8,
    "eventbus.otel": 8,
    "eventbus": 9,
    "eventbus.__main__": 9,
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts and parts[0] in PACKAGES and (ROOT / folder / parts[0]).is_symlink():
                continue  # eventbus/storage: the link, listed under its own folder
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The project modules ``name`` imports (typing-only imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            # ``from package import module`` names the module, not the package.
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # The deepest project module the import names.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports(name, path, known)) for name, path in found.items()}


def floor_of(module: str) -> tuple[str, int]:
    """The unit (a floor entry) a module belongs to, and its floor."""
    unit = module
    while unit not in FLOORS:
        unit = unit.rpartition(".")[0]
        assert unit, f"{module} is on no floor: add it to FLOORS"
    return unit, FLOORS[unit]


def test_storage_and_backpressure_import_nothing_of_the_rest() -> None:
    for name, targets in graph().items():
        top = next((f for f in FOUNDATIONS if name == f or name.startswith(f + ".")), None)
        if top is not None:
            foreign = sorted(t for t in targets if not (t == top or t.startswith(top + ".")))
            assert not foreign, f"{name} imports {foreign}"


def test_eventbus_imports_only_downwards_or_within_a_package() -> None:
    problems = []
    for name, targets in graph().items():
        if not name.startswith("eventbus"):
            continue
        unit, floor = floor_of(name)
        for target in targets:
            if not target.startswith("eventbus"):
                continue
            other, other_floor = floor_of(target)
            if other == unit or other_floor < floor:
                continue
            problems.append(f"{name} (floor {floor}) imports {target} (floor {other_floor})")
    assert not problems, "\n".join(problems)


def test_no_module_takes_part_in_an_import_cycle() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"
