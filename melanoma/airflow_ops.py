"""Airflow-side pieces of the pipeline: run configuration, drop selection, task runners.

Imported by the DAG at parse time, so it imports neither TensorFlow nor PySpark: the heavy
work happens in ``spark-submit`` and in the training CLI, each in its own process or
container.

Configuration, lowest precedence first: built-in defaults, environment variables /
Airflow Variables (``melanoma_data_root``, ``melanoma_raw_root``, ...; Airflow also reads
them from ``AIRFLOW_VAR_MELANOMA_DATA_ROOT`` and friends), then the run's Params. Object
store credentials come from the Airflow connection ``melanoma_s3`` (type aws: login/password
= key/secret, extra ``endpoint_url``) or the environment, and are handed to Spark and the
training runtime as environment variables at execution time, so they never appear in
rendered templates or in code.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "
S3_CONN_ID = "melanoma_s3"

#: Defaults for the run's Params (also the schema the UI form shows).
PARAM_DEFAULTS: dict[str, Any] = {
    "drops": [],
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "epochs": 30,
    "fine_tune_epochs": 0,
    "fine_tune_blocks": 2,
    "class_weight": "balanced",
    "max_train_images": 0,
    "threshold_strategy": "youden",
    "target_sensitivity": 0.95,
    "n_boot": 1000,
    "external_drops": [],
}


def setting(name: str, default: str) -> str:
    """An Airflow Variable (``melanoma_<name>``), else the environment (``MELANOMA_<NAME>``), else ``default``."""
    env_value = os.environ.get(f"MELANOMA_{name.upper()}")
    try:
        from airflow.sdk import Variable

        return Variable.get(f"melanoma_{name}", default=env_value or default)
    except Exception:  # noqa: BLE001 - outside a running task (tests, CLI) there is no Variable backend
        return env_value or default


def run_key(run_type: str, logical_date: dt.datetime | None, run_id: str) -> str:
    """A storage-safe name for a run: reruns of one Airflow run share it, different runs never do."""
    if logical_date is not None:
        stamp = logical_date.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return f"{run_type}__{stamp}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)


def drops_in_interval(drop_ids: list[str], start: dt.datetime | None, end: dt.datetime | None) -> list[str]:
    """Drops whose id carries a date inside [start, end): what a scheduled run owns."""
    from melanoma.drops import drop_date

    selected = []
    for drop_id in drop_ids:
        day = drop_date(drop_id)
        if day is None or start is None or end is None:
            continue
        if start.date() <= day < end.date() or (start.date() == end.date() == day):
            selected.append(drop_id)
    return selected


def resolve_run(params: dict, *, run_type: str, run_id: str, logical_date: dt.datetime | None,
                interval_start: dt.datetime | None, interval_end: dt.datetime | None) -> dict:
    """Everything the run's tasks need, as small JSON (pushed to XCom by the ``plan`` task)."""
    from melanoma.drops import list_drops
    from melanoma.manifest import latest_manifest
    from melanoma.storage import join_key, open_storage

    values = {**PARAM_DEFAULTS, **{k: v for k, v in params.items() if k in PARAM_DEFAULTS}}
    data_root = setting("data_root", str(PROJECT_ROOT / "output" / "data"))
    raw_root = setting("raw_root", str(PROJECT_ROOT / "output" / "raw"))
    raw, processed = open_storage(raw_root), open_storage(data_root)
    available = list_drops(raw)
    done = set((latest_manifest(processed) or {}).get("drops", []))
    if values["drops"]:
        unknown = [d for d in values["drops"] if d not in available]
        if unknown:
            raise ValueError(f"drops {unknown} not found under {raw_root}; available: {available}")
        selected = list(values["drops"])
    elif run_type in ("scheduled", "backfill"):
        selected = drops_in_interval(available, interval_start, interval_end)
    else:
        selected = available  # a manual run without a choice takes every drop
    new = [d for d in selected if d not in done]
    key = run_key(run_type, logical_date, run_id)
    as_of = logical_date.astimezone(dt.timezone.utc).date().isoformat() if logical_date else None
    train_config = {
        "backbone": values["backbone"],
        "weights": values["weights"] or None,
        "epochs": int(values["epochs"]),
        "fine_tune_epochs": int(values["fine_tune_epochs"]),
        "fine_tune_blocks": int(values["fine_tune_blocks"]),
        "class_weight": values["class_weight"],
        "limit_train": int(values["max_train_images"]) or None,
        "as_of": as_of,
    }
    return {
        "run_key": key,
        "raw_root": raw_root,
        "data_root": data_root,
        "run_root": join_key(data_root, "runs", key) if data_root.startswith("s3://") else str(Path(data_root) / "runs" / key),
        "drops": selected,
        "new_drops": new,
        "as_of": as_of,
        "train_config": train_config,
        "threshold_strategy": values["threshold_strategy"],
        "target_sensitivity": float(values["target_sensitivity"]),
        "n_boot": int(values["n_boot"]),
        "external": [f"{raw_root}::{d}" for d in values["external_drops"]],
    }


def storage_env(conn_id: str = S3_CONN_ID) -> dict[str, str]:
    """Environment variables for boto3, from the Airflow connection when it exists."""
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - no such connection: the environment's own settings apply
        return {}
    env = {}
    if conn.login:
        env["AWS_ACCESS_KEY_ID"] = conn.login
    if conn.password:
        env["AWS_SECRET_ACCESS_KEY"] = conn.password
    extra = conn.extra_dejson or {}
    if extra.get("endpoint_url"):
        env["MELANOMA_S3_ENDPOINT_URL"] = extra["endpoint_url"]
    if extra.get("region_name"):
        env["AWS_DEFAULT_REGION"] = extra["region_name"]
    return env


def parse_result(output: str) -> dict:
    """The JSON after the last ``RESULT `` line of a training CLI's output."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError("the training CLI printed no RESULT line; see the task log above for its error")


def run_cli_locally(cli_args: list[str], env: dict[str, str] | None = None, log=print) -> dict:
    """Run ``python -m training ...`` as a subprocess, streaming its output into the task log."""
    command = [sys.executable, "-m", "training", *cli_args]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=PROJECT_ROOT)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        log(line.rstrip("\n"))
    if process.wait() != 0:
        tail = "\n".join(lines[-5:])
        raise RuntimeError(f"training CLI {cli_args[0]!r} failed with exit code {process.returncode}:\n{tail}")
    return parse_result("\n".join(lines))


def run_training_cli(cli_args: list[str], context: dict | None = None, *, runner: str | None = None) -> dict:
    """Run one training-CLI command with the configured runner and return its RESULT.

    ``local`` (default): a subprocess of this worker's Python. ``docker``: the training
    image through ``DockerOperator`` (image from ``melanoma_training_image``), the same
    CLI, with the object-store settings passed as container environment.
    """
    runner = runner or setting("runner", "local")
    env = storage_env()
    if runner == "local":
        return run_cli_locally(cli_args, env)
    if runner == "docker":
        from airflow.providers.docker.operators.docker import DockerOperator

        container = DockerOperator(
            task_id=f"container_{cli_args[0]}",
            image=setting("training_image", "melanoma-training:latest"),
            command=["python", "-m", "training", *cli_args],
            environment={**env, "MELANOMA_RUNNER": "docker"},
            docker_url=setting("docker_url", "unix://var/run/docker.sock"),
            network_mode=setting("docker_network", "bridge"),
            auto_remove="success",
            do_xcom_push=True,
            xcom_all=False,
            mount_tmp_dir=False,
            # Run inside this task on purpose: one task, one result, whichever runner.
            allow_nested_operators=True,
        )
        return parse_result(str(container.execute(context or {})))
    raise ValueError(f"unknown runner {runner!r}: use 'local' or 'docker'")
