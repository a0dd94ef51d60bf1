"""Run the pipeline once on the embedded default: ``make demo`` calls this.

SQLite metadata, Spark ``local[2]``, a local folder as object storage and the local
training runner, through ``airflow dags test melanoma_ingest`` (the drop into the data set)
then ``airflow dags test melanoma_train`` (a model on the manifest it left; under a scheduler
the manifest asset's event starts that run, here it is run by hand). Without ``DATA_DIR`` it
first writes a small synthetic lesion drop (see :mod:`melanoma.synthetic`); with
``DATA_DIR=../shared/data/ham10000`` it runs on that HAM10000-layout folder as one drop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Airflow's SQLite connections wait this long for a lock (sqlite3's default is 5 s): under
# `airflow standalone` the scheduler can hold the write lock longer than that while it starts a
# run. It cannot help when SQLite sees a deadlock (a reader upgrading to write while another
# process waits to write): that fails at once with "database is locked", which is why the
# backfill test creates its backfill before standalone starts. SQLite is for the embedded demo only.
SQLITE_CONNECT_ARGS: dict[str, object] = {"timeout": 60}


def missing_prerequisites() -> list[str]:
    """One line per missing tool, saying what to install."""
    problems = []
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        problems.append(
            "Java 17+ is needed by Spark: install a JDK (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    if shutil.which("spark-submit", path=airflow_env_path()) is None:
        problems.append(
            "spark-submit not found: install the requirements (pyspark==4.2.0) into .venv with 'make venv'"
        )
    return problems


def airflow_env_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def airflow_env(
    airflow_home: Path, data_root: str, raw_root: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for an embedded Airflow (SQLite, local Spark, local runner)."""
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "pipeline.demo.SQLITE_CONNECT_ARGS",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": sys.executable,
            "PATH": airflow_env_path(),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
            "MELANOMA_DATA_ROOT": data_root,
            "MELANOMA_RAW_ROOT": raw_root,
            "MELANOMA_RUNNER": "local",
            # `dags test` runs tasks in one process: a retry would only repeat the same error later.
            # Under a scheduler (`airflow standalone`) pass MELANOMA_TASK_RETRIES=1 in ``extra``.
            "MELANOMA_TASK_RETRIES": "0",
            # Workers call the execution API over HTTP; on SQLite a call can wait up to the busy
            # timeout (SQLITE_CONNECT_ARGS, 60 s) for the scheduler's write lock. Airflow's 5 s
            # default then times out and retries a call that may already have been applied (the
            # task's start), and the task fails before it runs: wait longer than the lock can.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "90",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    env.update(extra or {})
    return env


def run_dag(
    env: dict[str, str], conf: dict, logical_date: str | None = None, dag_id: str = "melanoma_pipeline"
) -> subprocess.CompletedProcess:
    """``airflow dags test <dag_id>`` with ``conf`` as the run's Params (migrating the SQLite DB first)."""
    airflow = str(Path(sys.executable).parent / "airflow")
    migrate = subprocess.run(
        [airflow, "db", "migrate"],
        env=env,
        cwd=PROJECT_ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if migrate.returncode != 0:
        return migrate
    command = [
        airflow,
        "dags",
        "test",
        dag_id,
        *([logical_date] if logical_date else []),
        "-c",
        json.dumps(conf),
    ]
    return subprocess.run(
        command, env=env, cwd=PROJECT_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def task_states(airflow_home: Path, dag_id: str = "melanoma_pipeline") -> list[tuple[str, str, float | None]]:
    """(task_id, state, seconds) of the DAG's last run, read from the embedded Airflow's SQLite DB."""
    import sqlite3

    with sqlite3.connect(airflow_home / "airflow.db") as db:
        return db.execute(
            "select task_id, state, duration from task_instance where dag_id = ? "
            "and run_id = (select run_id from dag_run where dag_id = ? order by id desc limit 1) "
            "order by start_date",
            (dag_id, dag_id),
        ).fetchall()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DATA_DIR") or None,
        help="a HAM10000-layout folder (default: synthetic data)",
    )
    parser.add_argument("--out", default=str(PROJECT_ROOT / "output" / "demo"))
    parser.add_argument("--conf", default="{}", help="JSON Params for the run (e.g. '{\"epochs\": 5}')")
    args = parser.parse_args()

    problems = missing_prerequisites()
    if problems:
        print("\n".join(f"demo: {p}" for p in problems), file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    # Each demo shows a whole run from scratch: a leftover manifest would make this run "no new drop".
    shutil.rmtree(out, ignore_errors=True)
    # The quick recipe (head only): the demo shows the pipeline, not the best model (recipe best).
    conf = {"recipe": "quick", "epochs": 15, "n_boot": 200, **json.loads(args.conf)}
    if args.data_dir:
        drop = Path(args.data_dir).resolve()
        if not drop.is_dir():
            print(f"demo: DATA_DIR {drop} is not a folder", file=sys.stderr)
            return 2
        raw_root, conf["drops"] = str(drop.parent), [drop.name]
    else:
        from melanoma.synthetic import write_drop

        raw_root = str(out / "raw")
        drop = write_drop(Path(raw_root))
        conf["drops"] = [drop.name]
        print(f"demo: no DATA_DIR given; wrote the SYNTHETIC drop {drop} (drawn lesions, not dermoscopy)")
    data_root = str(out / "data")
    env = airflow_env(out / "airflow", data_root, raw_root)
    log = out / "dags_test.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    # The drop into the data set, then a model on the manifest it left (the train run's Params: the rest).
    steps = [("melanoma_ingest", {"drops": conf.pop("drops")}), ("melanoma_train", conf)]
    for dag_id, dag_conf in steps:
        print(f"demo: airflow dags test {dag_id} with Params {json.dumps(dag_conf)}")
        result = run_dag(env, dag_conf, dag_id=dag_id)
        with open(log, "a") as handle:
            handle.write(f"===== airflow dags test {dag_id}\n{result.stdout}")
        states = task_states(out / "airflow", dag_id) if (out / "airflow" / "airflow.db").exists() else []
        for task_id, state, seconds in states:
            print(f"  {task_id:<15} {state or 'none':<10} {'' if seconds is None else f'{seconds:6.1f} s'}")
        if result.returncode != 0:
            print(
                f"demo: the {dag_id} run failed (exit {result.returncode}); full log: {log}", file=sys.stderr
            )
            return result.returncode
    runs = sorted((Path(data_root) / "runs").glob("train-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        print(
            f"demo: every task finished but no training run folder exists under {data_root}/runs (nothing to train?); log: {log}"
        )
        return 0
    run = runs[-1]
    print(f"demo: done. Full log: {log}")
    print(f"  metrics:  {run / 'eval' / 'metrics.json'}")
    print(f"  heatmaps: {run / 'gradcam'}")
    print(f"  report:   {run / 'report.html'}")
    _show_promotion(run)
    return 0


def _show_promotion(run: Path) -> None:
    """The registry's decision on the demo's model, and where to browse the tracking store."""
    decision_file = run / "promotion.json"
    if not decision_file.exists():
        print(f"demo: no promotion decision in {run} (the promote task did not run)")
        return
    decision = json.loads(decision_file.read_text())
    verdict = "promoted to champion" if decision["promoted"] else "not promoted (kept, labelled rejected)"
    print(f"demo: registry: {decision['model']} v{decision['version']} {verdict}:")
    for reason in decision["reasons"]:
        print(f"    - {reason}")
    print(f"  tracking store: {decision['tracking_uri']} (MLflow run {decision['mlflow_run_id']})")
    print(f"  browse it:      mlflow ui --backend-store-uri {decision['tracking_uri']} --host 127.0.0.1")


if __name__ == "__main__":
    sys.exit(main())
