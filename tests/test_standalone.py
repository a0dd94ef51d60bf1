"""End to end: `airflow standalone` serves the melanoma DAG over the REST API, with Params enforced.

A real Airflow 3 (SQLite, LocalExecutor, api-server, scheduler, dag-processor, triggerer) from
.venv/bin in a temporary AIRFLOW_HOME, on a free loopback port, with the environment of
``make demo`` (pipeline.demo.airflow_env). The test logs in through the simple auth manager
(the password standalone generates, POST /auth/token), then checks that the DAG is served
without import errors, can be unpaused and paused, accepts a trigger with valid Params and
rejects invalid ones with a 400 naming the bad field. The DAG stays paused, so no task runs;
the whole process group is stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.demo import airflow_env

from airflow_server import api_server_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "melanoma_pipeline"
HOST = "127.0.0.1"
START_TIMEOUT_S = float(os.environ.get("MELANOMA_STANDALONE_TIMEOUT", "240"))
DAG_TIMEOUT_S = float(os.environ.get("MELANOMA_STANDALONE_DAG_TIMEOUT", "180"))


def airflow_binary() -> Path:
    for candidate in (ROOT / ".venv" / "bin" / "airflow", Path(sys.executable).parent / "airflow"):
        if candidate.exists():
            return candidate
    pytest.fail("no airflow executable in .venv/bin: run 'make venv'")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def request(
    method: str, url: str, body: dict | None = None, token: str | None = None, timeout: float = 30
) -> tuple[int, object]:
    """(status, parsed JSON or text) for one HTTP call; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def log_tail(log_path: Path, chars: int = 4000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM the standalone's process group (and any descendant that left it), then SIGKILL what is left."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        for child in descendants:
            try:
                child.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        _, alive = psutil.wait_procs(alive, timeout=grace)
        if not alive:
            return


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen, log_path: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"airflow standalone exited ({process.returncode}) while waiting for {what}:\n{log_tail(log_path)}"
            )
        result = predicate()
        if result:
            return result
        time.sleep(2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log_tail(log_path)}")


def test_standalone_serves_the_dag_and_enforces_its_params(tmp_path):
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    base = f"http://{HOST}:{port}"
    env = airflow_env(home, str(tmp_path / "data"), str(tmp_path / "raw"))
    env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW__DATABASE__")}
    env.update(
        {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            **api_server_env(HOST, port),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        }
    )
    log_path = tmp_path / "standalone.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(airflow_binary()), "standalone"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        # 1. the API answers on the loopback port
        def api_up():
            if not _port_open(port):
                return False
            try:
                return request("GET", f"{base}/api/v2/version", timeout=5)[0] == 200
            except OSError:  # still starting: connection reset, timeout
                return False

        wait_for(api_up, START_TIMEOUT_S, f"the API on {base}", process, log_path)

        # 2. log in with the password standalone generated for admin
        password_file = home / "simple_auth_manager_passwords.json.generated"
        passwords = wait_for(lambda: _read_json(password_file), 60, f"{password_file}", process, log_path)
        status, body = request(
            "POST", f"{base}/auth/token", {"username": "admin", "password": passwords["admin"]}
        )
        assert status == 201 and body.get("access_token"), f"login failed: {status} {body}"
        token = body["access_token"]
        status, _ = request("GET", f"{base}/api/v2/dags/{DAG_ID}")
        assert status == 401, "the API must refuse requests without a token"

        # 3. the DAG is parsed and served, without import errors
        def dag_served():
            status, body = request("GET", f"{base}/api/v2/dags/{DAG_ID}", token=token)
            return body if status == 200 else None

        dag = wait_for(dag_served, DAG_TIMEOUT_S, f"the DAG {DAG_ID} to be parsed", process, log_path)
        assert dag["dag_id"] == DAG_ID
        assert dag["has_import_errors"] is False, dag
        assert dag["is_paused"] is True, "DAGs start paused (dags_are_paused_at_creation)"
        assert set(dag["tags"] and [t["name"] for t in dag["tags"]]) >= {"melanoma", "spark", "keras"}
        status, errors = request("GET", f"{base}/api/v2/importErrors", token=token)
        assert status == 200 and errors["total_entries"] == 0, errors

        # 4. it can be unpaused (and is paused again at once, so that no scheduled run executes)
        for paused in (False, True):
            status, body = request(
                "PATCH", f"{base}/api/v2/dags/{DAG_ID}?update_mask=is_paused", {"is_paused": paused}, token
            )
            assert status == 200 and body["is_paused"] is paused, (status, body)

        # 5. a trigger with valid Params is accepted and its conf stored as given
        conf = {
            "epochs": 2,
            "backbone": "efficientnet_lite0",
            "drops": ["ham-2026-01-01"],
            "n_boot": 200,
            "threshold_strategy": "sensitivity",
            "target_sensitivity": 0.9,
        }
        status, run = request(
            "POST",
            f"{base}/api/v2/dags/{DAG_ID}/dagRuns",
            {"dag_run_id": "standalone_check", "logical_date": None, "conf": conf},
            token,
        )
        assert status == 200, f"valid trigger refused: {status} {run}"
        assert run["dag_run_id"] == "standalone_check" and run["conf"] == conf and run["run_type"] == "manual"
        status, stored = request("GET", f"{base}/api/v2/dags/{DAG_ID}/dagRuns/standalone_check", token=token)
        assert status == 200 and stored["conf"] == conf

        # 6. invalid Params are refused with a 400 that names the field
        for bad, field in (
            ({"epochs": -1}, "epochs"),
            ({"backbone": "vgg"}, "backbone"),
            ({"drops": ["../etc"]}, "drops"),
            ({"n_boot": "many"}, "n_boot"),
        ):
            status, body = request(
                "POST", f"{base}/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": bad}, token
            )
            detail = json.dumps(body)
            print(f"conf {bad} -> {status}: {detail[:300]}")
            assert status == 400, f"invalid conf {bad} got {status}: {detail}"
            assert f"Invalid input for param {field}" in detail, (
                f"the 400 for {bad} does not name {field!r}: {detail}"
            )
        status, runs = request("GET", f"{base}/api/v2/dags/{DAG_ID}/dagRuns", token=token)
        assert status == 200 and [r["dag_run_id"] for r in runs["dag_runs"] if r["run_type"] == "manual"] == [
            "standalone_check"
        ]
    finally:
        stop_process_tree(process)
    assert process.poll() is not None, "airflow standalone is still running"


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def _read_json(path: Path):
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) and value.get("admin") else None
