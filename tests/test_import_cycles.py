"""No import cycle inside omni_model, and the model never imports the data package.

The rule: the import graph of omni_model's modules, read from the source with `ast` and counting EVERY import
statement (module level and inside functions: a function-level import is still a dependency, only a later one), has no
cycle. `from .pkg import name` counts as an import of `pkg` and, when `name` is a submodule, of `pkg.name`. Code named
by a string and resolved at run time (omni_model.compat's "module:qualname" seams) is not an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "omni_model"


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported(module: str, path: Path, node) -> list[str]:
    """The module names one import statement depends on (inside omni_model or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(name for name in imported(module, path, node) if name in modules and name != module)
        graph[module] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_inside_omni_model():
    graph = import_graph()
    found = [sorted(c) for c in cycles(graph)]
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) + ")" for c in found)


def test_the_detector_sees_a_function_level_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    path = PACKAGE / "train" / "build.py"
    tree = ast.parse("def f():\n    from .checkpointing import load_model_weights\n")
    node = tree.body[0].body[0]
    assert imported("omni_model.train.build", path, node)[0] == "omni_model.train.checkpointing"


def test_the_model_does_not_import_the_data_package():
    graph = import_graph()
    leaks = {m: sorted(d for d in deps if d.startswith("omni_model.data"))
             for m, deps in graph.items() if m.startswith("omni_model.model")}
    assert not any(leaks.values()), {m: d for m, d in leaks.items() if d}
