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
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from melanoma.settings import PARAM_DEFAULTS, RESULT_PREFIX, SETTINGS, apply_recipe, config_fields

PROJECT_ROOT = Path(__file__).resolve().parents[1]
S3_CONN_ID = "melanoma_s3"


def setting(name: str, default: str) -> str:
    """An Airflow Variable (``melanoma_<name>``), else the environment (``MELANOMA_<NAME>``), else ``default``."""
    env_value = os.environ.get(f"MELANOMA_{name.upper()}")
    try:
        from airflow.sdk import Variable

        return Variable.get(f"melanoma_{name}", default=env_value or default)
    except Exception:  # noqa: BLE001 - outside a running task (tests, CLI) there is no Variable backend
        return env_value or default


#: Run-id prefixes Airflow generates (``<type>__<timestamp>``); see :func:`run_key`.
_RUN_TYPES = ("manual", "scheduled", "backfill", "asset_triggered", "asset_materialization")
#: The per-run record ``plan`` keeps under ``runs/<run_key>/`` (see :func:`resolve_run`).
PLAN_RECORD = "plan.json"
#: Written last by the ``promote`` task (the registry's decision): its presence means the run finished.
RUN_DONE = "promotion.json"


def _utc(moment: dt.datetime) -> dt.datetime:
    """``moment`` as an aware UTC datetime (naive values are taken to be UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc)


def run_key(run_id: str, logical_date: dt.datetime | None) -> str:
    """A storage-safe name for one Airflow run: retries and reruns of it share it, other runs never do.

    With a logical date it is ``<type>__<logical date>`` (``scheduled__20260301T000000Z``),
    the type read from the run id's prefix: the run id (unlike ``run_type``) survives a
    backfill re-running an existing run, and ``airflow dags test`` repeated on one date
    replaces that date's run, so both keep writing to the same folder. Airflow allows one
    run per logical date and DAG, so two live runs never share a key. Without a logical
    date (a manual run triggered without one) it is the run id itself, made safe.
    """
    prefix, sep, _ = run_id.partition("__")
    if logical_date is not None:
        stamp = _utc(logical_date).strftime("%Y%m%dT%H%M%SZ")
        return f"{prefix if sep and prefix in _RUN_TYPES else 'run'}__{stamp}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("._") or "run"
    if safe != run_id:  # two ids differing only in unsafe characters must not collide
        safe += "-" + hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return safe


def drops_in_interval(drop_ids: list[str], start: dt.datetime | None, end: dt.datetime | None) -> list[str]:
    """Drops whose id carries a date D with ``start <= D 00:00 UTC < end``: what a scheduled run owns.

    A drop dated D counts as arrived at the start of D (UTC), so consecutive data intervals
    (``[start, end)``, any length) share no drop and miss none; with the DAG's daily
    ``CronDataIntervalTimetable`` the run of logical date D owns exactly the drops dated D.
    Drops without a date in their id are never selected by an interval (a manual run, or
    ``drops``, takes them). A zero-width interval (trigger timetables) owns nothing.
    """
    from melanoma.drops import drop_date

    if start is None or end is None:
        return []
    start, end = _utc(start), _utc(end)
    selected = []
    for drop_id in drop_ids:
        day = drop_date(drop_id)
        if (
            day is not None
            and start <= dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc) < end
        ):
            selected.append(drop_id)
    return selected


class HistoryOrderError(ValueError):
    """Processing these drops now would rewrite the data history the manifests record."""


def check_history_order(latest: dict | None, as_of: str | None, new_drops: list[str]) -> None:
    """Refuse to commit drops under a date earlier than the newest manifest's.

    Manifests are cumulative and training picks "the newest manifest dated <= as_of", which
    is only the data set as it stood on that date while manifests are committed in date
    order. A run dated before the newest manifest that brought new drops would make its
    manifest hold later drops too, and the duplicate-image checks would see the drops in
    another order than the schedule did.
    """
    newest = (latest or {}).get("logical_date")
    if new_drops and newest and as_of and as_of < newest:
        raise HistoryOrderError(
            f"this run is dated {as_of} but the newest manifest (version {latest.get('version')}) was committed "
            f"for {newest}: processing {new_drops} now would put later data in a manifest dated {as_of}. "
            "Process drops in date order (backfill earlier dates before later runs), or process these drops "
            "in a run dated today (trigger a manual run with Params drops=[...]), or rebuild from an empty data root."
        )


def select_drops(
    requested: list[str],
    available: list[str],
    *,
    run_type: str,
    interval_start: dt.datetime | None,
    interval_end: dt.datetime | None,
    raw_root: str = "",
) -> list[str]:
    """The drops a run is about: ``requested`` (checked), else its interval's (scheduled, backfill), else all."""
    if requested:
        unknown = [d for d in requested if d not in available]
        if unknown:
            raise ValueError(
                f"drops {unknown} not found under {raw_root or 'the raw root'}; available: {available}"
            )
        return list(dict.fromkeys(requested))
    if run_type in ("scheduled", "backfill"):
        return drops_in_interval(available, interval_start, interval_end)
    return list(available)  # a manual (or asset-triggered) run without a choice takes every drop


def checked_params(params: dict, defaults: dict) -> dict:
    """The run's Params over ``defaults``; unknown names and numbers that are NaN or infinite are refused."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown Params {unknown}; this DAG's Params are {sorted(defaults)}")
    values = {**defaults, **params}
    not_finite = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
    if not_finite:  # the Param schema refuses them too; a run triggered around it must not train on NaN
        raise ValueError(f"Params {not_finite} must be finite numbers, not NaN or infinity")
    return values


def storage_roots() -> tuple[str, str]:
    """``(data_root, raw_root)``: the Variables/env settings, else ``output/data`` and ``output/raw`` here."""
    data_root = setting("data_root", str(PROJECT_ROOT / "output" / "data"))
    raw_root = setting("raw_root", str(PROJECT_ROOT / "output" / "raw"))
    return data_root, raw_root


def run_date(logical_date: dt.datetime | None, run_after: dt.datetime | None) -> str | None:
    """The run's date (UTC, ISO): its logical date, else the day it ran; None when it has neither."""
    dated = logical_date or run_after
    return _utc(dated).date().isoformat() if dated is not None else None


def under_data_root(data_root: str, *parts: str) -> str:
    """A folder under the data root (an ``s3://`` URI or a local path)."""
    from melanoma.storage import join_key

    if data_root.startswith("s3://"):
        return join_key(data_root, *parts)
    return str(Path(data_root).joinpath(*parts))


def run_root(data_root: str, key: str) -> str:
    """The run's folder ``runs/<key>`` under the data root."""
    return under_data_root(data_root, "runs", key)


def read_record(processed, key: str) -> dict | None:
    """The JSON record stored at ``key`` (a run's ``plan.json``, say), None when there is none."""
    return json.loads(processed.read_bytes(key)) if processed.exists(key) else None


def write_record(processed, key: str, record: dict) -> None:
    """``record`` as indented, key-sorted JSON at ``key``."""
    processed.write_bytes(key, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def _check_external_drops(external: list[str], available: list[str], raw_root: str) -> None:
    """Refuse a run whose ``external_drops`` are not all under the raw root."""
    missing = [d for d in external if d not in available]
    if missing:
        raise ValueError(f"external_drops {missing} not found under {raw_root}; available: {available}")


def _pin_new_drops(
    processed,
    key: str,
    fresh: list[str],
    *,
    latest: dict | None,
    as_of: str | None,
    run_id: str,
    drops: list[str],
) -> list[str]:
    """The drops run ``key`` brings into the data set: those pinned in its ``plan.json``, then ``fresh``.

    ``fresh`` (selected, not in the ``latest`` manifest) must keep the history order
    (:func:`check_history_order`). The first time the run sees a drop it pins it in the record,
    so a retry or a cleared rerun still owns it; a rerun writes nothing.
    """
    from melanoma.storage import join_key

    record_key = join_key("runs", key, PLAN_RECORD)
    previous = read_record(processed, record_key)
    pinned = previous.get("new_drops", []) if previous is not None else []
    check_history_order(latest, as_of, fresh)
    owned = list(dict.fromkeys([*pinned, *fresh]))
    if owned != pinned:  # first sight of these drops: pin them to this run (a rerun writes nothing)
        record = {"run_key": key, "run_id": run_id, "as_of": as_of, "drops": drops, "new_drops": owned}
        write_record(processed, record_key, record)
    return owned


def resolve_run(
    params: dict,
    *,
    run_type: str,
    run_id: str,
    logical_date: dt.datetime | None,
    interval_start: dt.datetime | None,
    interval_end: dt.datetime | None,
    run_after: dt.datetime | None = None,
    event_drops: list[str] | None = None,
    key_prefix: str = "",
    done_marker: str = RUN_DONE,
) -> dict:
    """Everything the run's tasks need, as small JSON (pushed to XCom by the ``plan`` task).

    ``drops``: the drops the run is about; ``new_drops``: those it brings into the data set,
    pinned in ``runs/<run_key>/plan.json`` the first time the run sees them, so a retry or a
    cleared rerun of a run that failed after ``preprocess`` still trains on them;
    ``proceed``: whether Spark and training run (False when nothing is new, or the run has
    already finished: its ``done_marker`` exists, ``promotion.json`` unless told otherwise);
    ``as_of``: the date the run's training data is taken at (its logical date, else the day it
    ran). ``event_drops``: the drops the triggering asset events name (an asset-triggered
    ingest run takes those when its ``drops`` Param is empty). ``key_prefix`` keeps the run
    folders of the ingest DAG apart from those of other DAGs (``runs/<prefix><run key>``).
    """
    from melanoma.drops import list_drops, report_late_files
    from melanoma.manifest import latest_manifest
    from melanoma.storage import join_key, open_storage

    values = checked_params(params, PARAM_DEFAULTS)
    data_root, raw_root = storage_roots()
    raw, processed = open_storage(raw_root), open_storage(data_root)
    available = list_drops(raw)
    selected = select_drops(
        list(values["drops"]) or list(event_drops or []),
        available,
        run_type=run_type,
        interval_start=interval_start,
        interval_end=interval_end,
        raw_root=raw_root,
    )
    _check_external_drops(values["external_drops"], available, raw_root)
    latest = latest_manifest(processed)
    done = set((latest or {}).get("drops", []))
    # Files that reached an ingested drop afterwards are not in the data set: say so on every run.
    late = report_late_files(raw, processed, latest, selected)
    key = key_prefix + run_key(run_id, logical_date)
    as_of = run_date(logical_date, run_after)
    fresh = [d for d in selected if d not in done]
    owned = _pin_new_drops(processed, key, fresh, latest=latest, as_of=as_of, run_id=run_id, drops=selected)
    finished = processed.exists(join_key("runs", key, done_marker))
    return {
        "run_key": key,
        "raw_root": raw_root,
        "data_root": data_root,
        "run_root": run_root(data_root, key),
        "drops": selected,
        "new_drops": owned,
        "pending_drops": fresh,
        "late_files": late,
        "finished": finished,
        "proceed": bool(fresh) or (bool(owned) and not finished),
        "as_of": as_of,
        **training_settings(values, as_of, raw_root=raw_root),
    }


def deployment_values(values: dict) -> dict:
    """``values`` with each empty deployment-decided Param (the recipe) from its Variable or env."""
    return {
        **values,
        **{
            name: setting(name, s.default)
            for name, s in SETTINGS.items()
            if s.from_deployment and values.get(name) is None
        },
    }


def training_settings(
    values: dict, as_of: str | None, *, raw_root: str | None = None, manifest_version: int | None = None
) -> dict:
    """The training steps' settings from a run's Params: ``train_config`` (the trainer's JSON) and evaluate's."""
    raw_root = raw_root or setting("raw_root", str(PROJECT_ROOT / "output" / "raw"))
    # Null recipe-controlled Params take the chosen recipe's value; the mapping to TrainConfig's
    # field names (max_train_images -> limit_train, ...) is declared in melanoma.settings.
    values = apply_recipe(deployment_values(values))
    train_config = {**config_fields(values), "as_of": as_of}
    if (
        manifest_version is not None
    ):  # only runs pinned to one manifest say so (older configs stay as they were)
        train_config["manifest_version"] = manifest_version
    return {
        "train_config": train_config,
        "threshold_strategy": values["threshold_strategy"],
        "target_sensitivity": float(values["target_sensitivity"]),
        "score_pooling": values["score_pooling"],
        "test_time_augmentation": bool(values["test_time_augmentation"]),
        "n_boot": int(values["n_boot"]),
        "promote_min_val_auroc": float(values["promote_min_val_auroc"]),
        "promote_margin": float(values["promote_margin"]),
        "external": [f"{raw_root}::{d}" for d in values["external_drops"]],
    }


def recheck_history_order(run: dict) -> None:
    """:func:`check_history_order` again just before ``preprocess`` commits (another run may have committed since ``plan``)."""
    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage

    latest = latest_manifest(open_storage(run["data_root"]))
    done = set((latest or {}).get("drops", []))
    check_history_order(latest, run["as_of"], [d for d in run["new_drops"] if d not in done])


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


def tracking_env() -> dict[str, str]:
    """``MLFLOW_TRACKING_URI`` for the training steps, from Variable ``melanoma_tracking_uri`` / env
    ``MELANOMA_TRACKING_URI`` (compose: the MLflow server); unset, a local data root's embedded store
    is used (:func:`training.tracking.tracking_uri`)."""
    uri = setting("tracking_uri", "")
    return {"MLFLOW_TRACKING_URI": uri} if uri else {}


def parse_result(output: str) -> dict:
    """The JSON after the last ``RESULT `` line of a training CLI's output."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError("the training CLI printed no RESULT line; see the task log above for its error")


def run_cli_locally(
    cli_args: list[str], env: dict[str, str] | None = None, log=logging.getLogger(__name__).info
) -> dict:
    """Run ``python -m training ...`` as a subprocess, streaming its output into the task log."""
    command = [sys.executable, "-m", "training", *cli_args]
    full_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=PROJECT_ROOT
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        log(line.rstrip("\n"))
    if process.wait() != 0:
        tail = "\n".join(lines[-5:])
        raise RuntimeError(
            f"training CLI {cli_args[0]!r} failed with exit code {process.returncode}:\n{tail}"
        )
    return parse_result("\n".join(lines))
