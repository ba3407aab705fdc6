"""The method library's import graph: no circle through more than two of its modules, counting the imports made
inside functions (they run too) and not those only type checkers read, as DVC's code dependencies count them."""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from flows.code_deps import ROOT, imported_names, module_file


def import_graph(package: str = "dna") -> dict[str, set[str]]:
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: {m for m in imported_names(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one module, largest first."""
    names = sorted(graph)
    index = {name: i for i, name in enumerate(names)}
    edges = [(index[a], index[b]) for a in names for b in graph[a]]
    rows, cols = zip(*edges) if edges else ((), ())
    matrix = csr_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(names), len(names)))
    _, labels = connected_components(matrix, directed=True, connection="strong")
    parts = [[n for n in names if labels[index[n]] == label] for label in set(labels)]
    return sorted((p for p in parts if len(p) > 1), key=len, reverse=True)


def test_no_import_circle_in_the_method_library_spans_more_than_two_modules():
    found = circles(import_graph())
    assert all(len(part) <= 2 for part in found), found


def test_the_circle_finder_sees_a_circle_through_a_function_level_import():
    graph = import_graph()
    looped = {**graph, "dna.errors": graph["dna.errors"] | {"dna.engine"}}  # errors -> engine -> checkpoint -> errors
    assert any({"dna.errors", "dna.engine", "dna.checkpoint"} <= set(part) for part in circles(looped))
    assert module_file("dna.spaces") == ROOT / "dna" / "spaces" / "__init__.py"
