"""Code run in a fresh interpreter, for what only a new process shows (what an import pulls in, config read at start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "pyspark", "torch", "cv2", "sklearn")


def run_python(code: str, env: dict[str, str], cwd: Path = ROOT) -> str:
    """``code`` run by this interpreter in a new process with exactly ``env``: its last line of output (it must exit 0)."""
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def import_dag_file(dag_file: Path) -> dict:
    """``dag_file`` imported in a fresh interpreter after what any DagBag has already imported (the SDK, the
    Spark provider), outside any Airflow configuration: ``{"seconds": its import time, "heavy": the heavy
    modules loaded}``."""
    script = (
        "import importlib.util, json, sys, time\n"
        "import airflow.sdk\n"
        "import airflow.providers.apache.spark.operators.spark_submit\n"
        f"spec = importlib.util.spec_from_file_location('dag_module', {str(dag_file)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "started = time.perf_counter()\n"
        "spec.loader.exec_module(module)\n"
        "seconds = time.perf_counter() - started\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps({'seconds': seconds, 'heavy': heavy}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return json.loads(run_python(script, env))
