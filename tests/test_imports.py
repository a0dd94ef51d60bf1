"""Every product module imports on its own, and the project's import graph has no cycle.

A cycle can hide for a long time: it only bites when a module of it is the first one
imported. So each module is imported first, in a fresh interpreter, and the module-level
imports (those run at import time: not the ones inside functions) are checked for cycles.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("melanoma", "pipeline", "training", "spark_jobs")
# Not imported here: Airflow-side helpers import the Airflow SDK (the DAG's tests import them),
# and ``__main__`` runs the CLI (``python -m training``; its code is training.cli).
NOT_IMPORTED = {"pipeline.training_tasks", "training.__main__"}


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``packages`` under ``root``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: module level, and inside if/try at module level."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            todo += [
                *node.body,
                *node.orelse,
                *getattr(node, "finalbody", []),
                *[s for h in getattr(node, "handlers", []) for s in h.body],
            ]
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> project modules it imports at module level (``from p import m`` counts m when m is a module)."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = set()
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in known and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_project_import_graph_has_no_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 30 and graph["training.train"], "the graph was not built from the project"
    assert find_cycle(graph) is None


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """Not vacuous: a package whose modules import each other at module level is caught."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import g\n\ndef f():\n    return 1\n")
    (package / "b.py").write_text("import os\n\nfrom cyclic import c\n\ndef g():\n    return 2\n")
    (package / "c.py").write_text("try:\n    from cyclic.a import f\nexcept ImportError:\n    f = None\n")
    (package / "d.py").write_text(
        "def h():\n    from cyclic.a import f  # inside a function: not an import-time edge\n"
    )
    graph = import_graph(tmp_path, ("cyclic",))
    assert graph["cyclic.d"] == set()
    assert find_cycle(graph) == ["cyclic.a", "cyclic.b", "cyclic.c", "cyclic.a"]


@pytest.mark.parametrize("module", sorted(set(modules(ROOT, PACKAGES)) - NOT_IMPORTED))
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
