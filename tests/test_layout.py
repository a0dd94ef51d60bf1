"""The product and its tests never import research code (issue #21).

``research/`` keeps one-off experiments and their records. Nothing under the product's folders,
``benchmarks/`` or ``tests/`` may import from it or load a file under it: no ``import research...``,
and no loader (importlib, runpy, ``__import__``, a ``SourceFileLoader``, ``exec``, a subprocess, a
``sys.path`` entry) in a module that names a path into ``research/`` in a string. Docstrings may
point at the folder (the history lives there).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("melanoma", "pipeline", "training", "spark_jobs", "dags", "plugins", "benchmarks", "tests")
RESEARCH = "research"

# Calls that import or run code from a name or a file path.
LOADERS = {
    "spec_from_file_location",
    "spec_from_loader",
    "module_from_spec",
    "import_module",
    "__import__",
    "run_path",
    "run_module",
    "SourceFileLoader",
    "SourcelessFileLoader",
    "load_source",
    "exec",
    "execfile",
    "run",
    "Popen",
    "call",
    "check_call",
    "check_output",  # subprocess: running a research script
}
# A path into research/: the folder's name as a path segment of a string, or alone (Path(...) / "research").
RESEARCH_PATH = re.compile(r"(?:^|[/\\])research(?:[/\\]|$)")


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _is_sys_path_change(node: ast.Call) -> bool:
    """``sys.path.insert(...)`` / ``sys.path.append(...)`` / ``sys.path.extend(...)``."""
    func = node.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr in {"insert", "append", "extend"}
        and isinstance(func.value, ast.Attribute)
        and func.value.attr == "path"
        and isinstance(func.value.value, ast.Name)
        and func.value.value.id == "sys"
    )


def research_uses(source: str) -> list[str]:
    """How ``source`` imports or loads research code: one line per finding, empty when it does not."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == RESEARCH
            ]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == RESEARCH
        ):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and _call_name(node) in {"import_module", "__import__"}:
            first = node.args[0] if node.args else None
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.split(".")[0] == RESEARCH
            ):
                found.append(f"line {node.lineno}: {_call_name(node)}({first.value!r})")
    docstrings = {
        id(body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and (body := n.body)
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
    }
    paths = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and id(n) not in docstrings
        and "\n" not in n.value
        and RESEARCH_PATH.search(n.value)
    ]
    loaders = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and (_call_name(n) in LOADERS or _is_sys_path_change(n))
    ]
    if paths and loaders:
        found += [
            f"line {n.lineno}: path {n.value!r} in a module that loads code "
            f"({', '.join(sorted({_call_name(c) or 'sys.path' for c in loaders}))})"
            for n in paths
        ]
    return found


def findings_in(root: Path, folders, check) -> dict[str, list[str]]:
    """``check``'s findings for every Python file under ``root``'s ``folders`` that has any."""
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            findings = check(path.read_text(encoding="utf-8"))
            if findings:
                out[str(path.relative_to(root))] = findings
    return out


def scan(root: Path) -> dict[str, list[str]]:
    """Every Python file under ``root``'s checked folders that uses research code, with its findings."""
    return findings_in(root, CHECKED, research_uses)


def test_no_product_module_benchmark_or_test_uses_research_code():
    checked = [p for folder in CHECKED for p in (ROOT / folder).rglob("*.py")]
    assert len(checked) > 50  # the scan sees the tree (not an empty glob)
    assert scan(ROOT) == {}


def test_the_research_folder_exists_and_holds_code_the_rule_is_about():
    assert any((ROOT / RESEARCH).rglob("*.py"))


BAD = {
    "import_module.py": "import research.x\n",
    "from_import.py": "from research.exp import pick\n",
    "importlib_by_name.py": "import importlib\nmod = importlib.import_module('research.exp')\n",
    # The pattern tests/test_ensemble_pick.py used before it moved: a path built from segments.
    "spec_by_path.py": textwrap.dedent("""
        import importlib.util
        from pathlib import Path
        SCRIPT = Path(__file__).resolve().parents[1] / "research" / "2026-11-model-selection" / "exp.py"
        spec = importlib.util.spec_from_file_location("exp", SCRIPT)
    """),
    "runpy_path.py": "import runpy\nrunpy.run_path('research/2026-11-model-selection/exp.py')\n",
    "subprocess.py": "import subprocess, sys\nsubprocess.run([sys.executable, 'research/x/exp.py'], check=True)\n",
    "sys_path.py": "import sys\nsys.path.insert(0, 'research/2026-11-model-selection')\nimport exp\n",
}
GOOD = {
    # Prose about the folder, and a loader that loads something else: allowed.
    "docstring.py": '"""Figures: see research/2026-11-model-selection/README.md for the history."""\nimport os\n',
    "other_loader.py": "import importlib\nmod = importlib.import_module('training.metrics')\nNOTES = 'researchers/notes'\n",
}


def test_the_rule_catches_each_way_of_using_research_code(tmp_path):
    for folder in ("tests", "melanoma"):
        (tmp_path / folder).mkdir()
        for name, source in {**BAD, **GOOD}.items():
            (tmp_path / folder / name).write_text(source)
    found = scan(tmp_path)
    assert set(found) == {f"{folder}/{name}" for folder in ("tests", "melanoma") for name in BAD}, found


# --- the runtimes' boundary: what the Spark and training images ship never needs Airflow ---------

#: Packages only the Airflow image has (docker/airflow/Dockerfile): the Airflow-side package and Airflow.
AIRFLOW_ONLY = ("pipeline", "airflow")
#: Folders copied into the Spark image (melanoma, spark_jobs) or the training image (melanoma, training).
SHIPPED_WITHOUT_AIRFLOW = ("melanoma", "spark_jobs", "training")


def airflow_imports(source: str) -> list[str]:
    """Every import of an Airflow-only package in ``source``, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif (
            isinstance(node, ast.Call)
            and _call_name(node) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names if name.split(".")[0] in AIRFLOW_ONLY]
    return found


def airflow_uses(root: Path) -> dict[str, list[str]]:
    """Python files of the folders shipped without Airflow that import ``pipeline`` or ``airflow``."""
    return findings_in(root, SHIPPED_WITHOUT_AIRFLOW, airflow_imports)


def test_the_spark_and_training_code_imports_nothing_airflow_side():
    """melanoma/ runs on Spark executors (and in the training image): pipeline/ and Airflow are not there."""
    assert len(list((ROOT / "melanoma").rglob("*.py"))) > 10  # the scan sees the package
    assert airflow_uses(ROOT) == {}


def test_the_airflow_side_modules_live_in_pipeline():
    """The folder layout shows the runtimes: the DAGs' helpers are in pipeline/, not in the shipped package."""
    moved = ("airflow_ops", "asset_ops", "dag_parts", "retrain", "training_tasks", "demo")
    assert all((ROOT / "pipeline" / f"{name}.py").is_file() for name in moved)
    assert not any((ROOT / "melanoma" / f"{name}.py").exists() for name in moved)


def test_the_boundary_rule_catches_each_way_of_importing_airflow_side_code(tmp_path):
    bad = {
        "plain.py": "import pipeline.airflow_ops\n",
        "from_pipeline.py": "from pipeline.dag_parts import params\n",
        "from_package.py": "from pipeline import retrain\n",
        "airflow_sdk.py": "def f():\n    from airflow.sdk import Variable  # lazy still counts\n",
        "by_name.py": "import importlib\nm = importlib.import_module('pipeline.demo')\n",
    }
    good = {
        "relative.py": "from . import storage\n",
        "similar_names.py": "import pipelines\nfrom airflow_tools import x\nNAME = 'pipeline.demo'\n",
    }
    (tmp_path / "melanoma").mkdir()
    for name, source in {**bad, **good}.items():
        (tmp_path / "melanoma" / name).write_text(source)
    assert set(airflow_uses(tmp_path)) == {f"melanoma/{name}" for name in bad}


#: Product code: what a newcomer reads (tests/ and research/ are not held to it).
PRODUCT = ("melanoma", "pipeline", "training", "spark_jobs", "dags", "plugins", "benchmarks")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def oversized(source: str) -> list[str]:
    """What breaks the size rules in one file: its length, and each function that is too long."""
    lines = source.count("\n") + (not source.endswith("\n") and bool(source))
    found = [f"{lines} lines"] if lines >= MAX_FILE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{node.name}: {length} lines (line {node.lineno})")
    return found


def test_product_files_and_functions_stay_short():
    assert len(list((ROOT / "training").glob("*.py"))) > 10  # the scan sees the tree
    assert findings_in(ROOT, PRODUCT, oversized) == {}


def test_the_size_check_sees_long_files_and_long_functions():
    long_function = "def f():\n" + "    x = 1\n" * 90
    assert oversized(long_function) == ["f: 91 lines (line 1)"]
    assert oversized("x = 1\n" * 600) == ["600 lines"]
    assert oversized("def g():\n    return 1\n") == []
