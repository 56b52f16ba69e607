"""The shape of the code: the import graph of ehrnode/ has no cycle, its layers point down, and the
consensus core does no I/O.

Read with ``ast`` (nothing is imported): every ``import`` and ``from ... import`` of an ehrnode
module, at module level, inside functions and under ``TYPE_CHECKING`` alike, is an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ehrnode"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ehrnode modules ``name`` imports (a package import counts as its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from pkg import module" is an arrow to the module; "from module import name" to the module.
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        for target in targets:
            # The longest known module the name starts with: "ehrnode.ledger.state.LedgerState" is
            # ehrnode.ledger.state; "from . import crypto" is ehrnode.crypto.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("ehrnode"):
                found.add(target)
    # Importing ehrnode.a.b runs ehrnode.a's __init__ too, but that is the package's own
    # business: only what a module names is an arrow here.
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    names = set(known)
    return {name: imports_of(name, path, names) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# From the bottom up: a module may import its own layer and the ones below, never one above.
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(layer.split()) for layer in (
    "errors codec logs",
    "crypto epochs storage limits metrics sdnotify empi synthetic synthetic_notes",
    "consensus",
    "config membership",
    "ledger",
    "records users net",
    "sharing consortium backup sim",
    "daemon client localnet",
    "api demo",
    "rest",
    "cli",
))

# The consensus core decides from the messages and ticks it is given; it does no I/O of its own.
NO_IO = {"trio", "trio_websocket", "socket", "ssl", "sqlite3", "asyncio", "threading", "subprocess", "time",
         "structlog", "select", "selectors"}


def part(module: str) -> str:
    """ehrnode.ledger.state -> ledger; ehrnode.config -> config."""
    return module.split(".")[1] if "." in module else module


def layer_of(module: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) if part(module) in layer]
    assert found, f"{module} is in no layer: place it in LAYERS"
    return found[0]


def test_every_module_has_a_layer():
    for name in modules():
        if name != "ehrnode":
            layer_of(name)


def test_layers_point_down():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() if a != "ehrnode"
                    for b in targets if layer_of(b) > layer_of(a))
    assert not upward, "imports reaching up a layer: " + "; ".join(upward)


def test_the_consensus_core_does_no_io():
    found = []
    for name, path in modules().items():
        if part(name) != "consensus":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{name} imports {n}" for n in names if n.split(".")[0] in NO_IO]
    assert not found, "; ".join(found)
