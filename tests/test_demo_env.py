"""The embedded Airflow's environment (``pipeline.demo.airflow_env``), as Airflow itself reads it."""

from __future__ import annotations

import json

from pipeline.demo import PROJECT_ROOT, airflow_env

from fresh_python import run_python


def test_embedded_airflow_waits_for_sqlite_locks_longer_than_sqlite_default(tmp_path):
    # Read back through Airflow's own config, in a fresh process with exactly that environment:
    # a wrong import path or a value Airflow ignores fails here, not as a flaky "database is locked".
    env = airflow_env(tmp_path / "airflow", str(tmp_path / "data"), str(tmp_path / "raw"))
    code = (
        "import json; from airflow.configuration import conf; "
        "print(json.dumps(conf.getimport('database', 'sql_alchemy_connect_args')))"
    )
    output = run_python(code, env, cwd=PROJECT_ROOT)
    connect_args = json.loads(output)
    assert connect_args["timeout"] >= 30  # seconds; sqlite3 defaults to 5


def test_embedded_airflow_waits_for_the_execution_api_longer_than_a_sqlite_lock(tmp_path):
    """Issue #20: under load the workers' 5 s default timed out (httpx.ReadTimeout) before ``plan`` ran."""
    env = airflow_env(tmp_path / "airflow", str(tmp_path / "data"), str(tmp_path / "raw"))
    code = "from airflow.sdk.api import client; print(client.API_TIMEOUT)"  # what the task SDK's client uses
    output = run_python(code, env, cwd=PROJECT_ROOT)
    from pipeline.demo import SQLITE_CONNECT_ARGS

    assert float(output) > SQLITE_CONNECT_ARGS["timeout"]
