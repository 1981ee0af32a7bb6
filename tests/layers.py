"""The layer check: imports inside p2pvbd run one way only, and never in a circle.

Every module belongs to a layer through its wing (or, for the few top-level modules, by name). A module
may import its own layer or any layer below; an import of a higher layer is an error, and so is any
cycle between modules. Every import counts: at module level, inside a function, and under
``TYPE_CHECKING`` (a type-only import still ties the two modules' designs together). A module that no
layer names is an error too, so a new file cannot slip past the check. Run as a script to print the
problems (``python -m tests.layers [ROOT]``); ``tests/test_layers.py`` runs it in ``make test``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "p2pvbd"
# Bottom to top, as docs/DESIGN.md draws them. A name is a wing (every module under it) or a top-level module.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("p2pvbd", "base", "data"),  # the package face (its version), what every layer stands on, shipped files
    ("store", "wire", "plan"),  # on-disk formats, pure codecs, pure planning
    ("replica_store", "dht", "sync_planner"),
    ("swarm", "kernel_hook_ctl"),
    ("migration",),
    ("migrate", "vm", "nbd", "libvirt"),
    ("daemon",),
    ("cli",),
)
# The only modules allowed outside a wing: the five the project was specified with, the composition
# root and the package face.
TOP_LEVEL = {"replica_store", "kernel_hook_ctl", "dht", "sync_planner", "migrate", "daemon", "__init__"}
# Imports the check still lets through, until the code they stand for is rewired: this list only shrinks
# (tests/test_layers.py fails on an entry that no longer exists).
EXEMPT: frozenset[tuple[str, str]] = frozenset({
})


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def imports(root: Path) -> Iterator[Import]:
    """Every import of a p2pvbd module, resolved to the module (not the name) it loads."""
    known = modules(root)
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from p2pvbd.swarm import trust` loads the module p2pvbd.swarm.trust; `from x import Name`, x.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
            else:
                continue
            for t in targets:
                if t == PACKAGE or t.startswith(PACKAGE + "."):
                    yield Import(mod, t, node.lineno)


def component(mod: str) -> str:
    """The wing or top-level module ``mod`` belongs to ("p2pvbd" for the package face)."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def layer_of(mod: str) -> int | None:
    comp = component(mod)
    return next((i for i, names in enumerate(LAYERS) if comp in names), None)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def check(root: Path, exempt: frozenset[tuple[str, str]] = EXEMPT) -> list[str]:
    """Every problem with the imports under ``root`` (the p2pvbd package directory), one line each."""
    problems: list[str] = []
    for mod, path in modules(root).items():
        parts = mod.split(".")
        if len(parts) == 2 and path.name != "__init__.py" and parts[1] not in TOP_LEVEL:
            problems.append(f"{path}: a module outside every wing (only {', '.join(sorted(TOP_LEVEL))} may be)")
        elif layer_of(mod) is None:
            problems.append(f"{path}: {component(mod)} is in no layer of tests/layers.py")
    graph: dict[str, set[str]] = {}
    for imp in dict.fromkeys(imports(root)):
        if imp.imported == imp.importer or (imp.importer, imp.imported) in exempt:
            continue
        graph.setdefault(imp.importer, set()).add(imp.imported)
        low, high = layer_of(imp.importer), layer_of(imp.imported)
        if low is not None and high is not None and high > low:
            problems.append(f"{imp.importer} (layer {low}) imports {imp.imported} (layer {high}), line {imp.line}: "
                            "imports run downward only")
    for cycle in iter_cycles(graph):
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def iter_cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """Cycles until none is left, breaking each one found at its last edge, so every cycle is reported once."""
    edges = {k: set(v) for k, v in graph.items()}
    while cycle := find_cycle(edges):
        yield cycle
        edges[cycle[-2]].discard(cycle[-1])


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / PACKAGE
    problems = check(root)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
