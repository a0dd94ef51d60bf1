"""Settings for an `airflow standalone` the tests start on 127.0.0.1 (shared by its tests)."""

from __future__ import annotations


def api_server_env(host: str, port: int) -> dict[str, str]:
    """API server on ``host:port`` with one worker, simple auth (admin:admin), DAGs paused at
    creation, two tasks at a time, and no scheduler health-check server."""
    base = f"http://{host}:{port}"
    return {
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
    }
