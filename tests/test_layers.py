"""Imports point down: every ldlib import, those inside functions included, goes to a lower layer or a sibling, and
none closes a cycle. The layers are README's Layout; a module's layer is its folder (or its top-level name)."""

from __future__ import annotations

import ast
from pathlib import Path

import ldlib

# Lowest first. A module may import its own layer (no cycle) and any layer below it.
LAYERS = ("core", "presets", "models", "data", "degrade", "build", "train", "apps")
PACKAGE = Path(ldlib.__file__).resolve().parent


def module_name(path: Path) -> str:
    """ldlib.a.b for PACKAGE/a/b.py, ldlib.a for PACKAGE/a/__init__.py."""
    parts = ["ldlib", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer index of an ldlib module; ldlib itself sits at the bottom, __main__ with the apps."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    return LAYERS.index("apps") if parts[1] == "__main__" else LAYERS.index(parts[1])


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported ldlib module: line}}, function-level imports included."""
    files = [p for p in PACKAGE.rglob("*.py") if "assets" not in p.relative_to(PACKAGE).parts]
    modules = {module_name(p): p for p in files}
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a name imported from a module: that module
                    target = target.rpartition(".")[0]
                # A package's __init__ re-exporting its own modules is not a dependency on them.
                if target and target != name and not (path.name == "__init__.py" and target.startswith(name + ".")):
                    deps.setdefault(target, node.lineno)
        graph[name] = deps
    return graph


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports of a higher layer than the importer's."""
    return [f"{a}:{line} imports {b} (layer {LAYERS[layer(b)]} above {LAYERS[layer(a)] if layer(a) >= 0 else 'ldlib'})"
            for a, deps in graph.items() for b, line in deps.items() if layer(b) > layer(a)]


def cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports a -> b from which a can be reached again."""
    def reaches(src: str) -> set[str]:
        seen, todo = set(), [src]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    closure = {m: reaches(m) for m in graph}
    return sorted(f"{a} imports {b}, which leads back to {a}" for a in graph for b in graph[a] if a in closure[b])


def test_imports_point_down() -> None:
    """No import points up a layer, none closes a cycle (function-level imports included)."""
    graph = import_graph()
    assert sum(map(len, graph.values())) > 50  # the walk found ldlib's imports
    assert upward_imports(graph) == []
    assert cycles(graph) == []


def test_every_module_has_a_layer() -> None:
    """Each module lives in one of the layers (a new folder needs a place in LAYERS)."""
    for name in import_graph():
        layer(name)  # ValueError for a folder that is not a layer


if __name__ == "__main__":  # the counts, as the issue note quotes them
    g = import_graph()
    up, cyc = upward_imports(g), cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} ldlib imports; {len(up)} upward, {len(cyc)} closing a cycle")
    print("\n".join(up + cyc))
