"""Every pipeline run recorded in MLflow: its config, per-epoch metrics, evaluation, Grad-CAM, report, model.

One MLflow run per pipeline run folder (``runs/<key>``): the training CLI's steps each add what
they wrote (:func:`record_step`), reading it back from the run folder, which stays the source of
truth the later steps and ``predict`` use. The MLflow run's id is kept in the folder
(``tracking.json``), so a step in another process (or container, or a retry) adds to the same
MLflow run.

Where the store is (:func:`tracking_uri`): ``MLFLOW_TRACKING_URI`` when set (compose: the MLflow
server), else the embedded default beside the data: ``sqlite:///<data root>/mlflow/mlflow.db``
with artifacts under ``<data root>/mlflow/artifacts`` (no server to start; ``mlflow ui
--backend-store-uri <that URI>`` shows it). A run folder in object storage needs a server:
SQLite cannot live in a bucket.

Keras autologging does not fit (training calls ``fit`` one epoch at a time, and Keras 3.15 is
past its supported range), so everything is logged explicitly from the run folder's files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from melanoma.storage import open_storage

__all__ = [
    "EXPERIMENT",
    "tracking_uri",
    "store_of_data_root",
    "local_store",
    "tracking_client",
    "tracking_run",
    "record_step",
    "record_document",
]

log = logging.getLogger(__name__)
EXPERIMENT = "melanoma"
RUN_FILE = "tracking.json"
#: MLflow caps a param value at 6000 characters; a longer config value is cut there.
_PARAM_MAX = 6000


def local_store(data_root: str | Path) -> str:
    """The tracking URI of the embedded store under a local data root (its artifacts: see _experiment_id)."""
    return f"sqlite:///{Path(data_root).resolve() / 'mlflow' / 'mlflow.db'}"


def _data_root_of(run_root: str) -> Path | None:
    """The local data root a run folder sits in (``<data>/runs/<key>``), None for object storage."""
    parsed = urlparse(run_root)
    if parsed.scheme not in ("", "file"):
        return None
    folder = Path(parsed.path if parsed.scheme == "file" else run_root).resolve()
    return folder.parent.parent if folder.parent.name == "runs" else folder.parent


def store_of_data_root(data_root: str | Path | None, what: str = "") -> str:
    """The tracking store: ``MLFLOW_TRACKING_URI``, else the embedded one under a local data root."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    parsed = urlparse(str(data_root or ""))
    if not data_root or parsed.scheme not in ("", "file"):
        where = what or (f"the data root {data_root} is in object storage" if data_root else "no data root")
        raise ValueError(
            f"no tracking store: {where}; set MLFLOW_TRACKING_URI (the MLflow server: compose's "
            "http://mlflow:5000; or sqlite:///<data root>/mlflow/mlflow.db for the embedded store)"
        )
    return local_store(parsed.path if parsed.scheme == "file" else data_root)


def tracking_uri(run_root: str | None = None) -> str:
    """The tracking store of a run folder: ``MLFLOW_TRACKING_URI``, else the embedded one of its data root."""
    data_root = _data_root_of(run_root) if run_root else None
    return store_of_data_root(
        data_root, "" if data_root else f"the run folder {run_root} is in object storage"
    )


def tracking_client(uri: str):
    """An MLflow client of the store at ``uri`` (MLflow imported here: seconds, only where tracking runs)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client, uri: str) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # the embedded store keeps artifacts beside its database
        artifacts = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=artifacts)


def tracking_run(run_root: str) -> tuple[object, str]:
    """``(client, MLflow run id)`` of this run folder's MLflow run, created on first use."""
    run, uri = open_storage(run_root), tracking_uri(run_root)
    client = tracking_client(uri)
    if run.exists(RUN_FILE):
        known = json.loads(run.read_bytes(RUN_FILE))
        if known.get("tracking_uri") == uri:
            return client, known["run_id"]
    key = run_root.rstrip("/").rsplit("/", 1)[-1]
    created = client.create_run(
        _experiment_id(client, uri),
        run_name=key,
        tags={"melanoma.run_root": run.root_uri, "melanoma.run_key": key},
    )
    run.write_bytes(RUN_FILE, json.dumps({"tracking_uri": uri, "run_id": created.info.run_id}).encode())
    log.info("tracking: run %s in %s (MLflow run %s)", key, uri, created.info.run_id)
    return client, created.info.run_id


def _flat(prefix: str, value, out: dict) -> dict:
    """Nested dicts as ``a.b`` keys (MLflow params and tags are flat)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _log(client, run_id: str, *, params=None, metrics=None, steps=None, tags=None) -> None:
    """One batch: params (str, cut at MLflow's limit), metrics (finite numbers only), per-step metrics."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    batch_metrics = [Metric(k, v, now, 0) for k, v in (metrics or {}).items() if _number(v) is not None]
    for name, values in (steps or {}).items():
        batch_metrics += [
            Metric(name, float(v), now, i) for i, v in enumerate(values) if _number(v) is not None
        ]
    batch_params = [Param(k, str(v)[:_PARAM_MAX]) for k, v in (params or {}).items()]
    batch_tags = [RunTag(k, str(v)[:_PARAM_MAX]) for k, v in (tags or {}).items()]
    for start in range(0, max(len(batch_metrics), 1), 1000):  # MLflow's batch limit
        client.log_batch(
            run_id,
            metrics=batch_metrics[start : start + 1000],
            params=batch_params if start == 0 else [],
            tags=batch_tags if start == 0 else [],
        )


def _log_files(client, run_id: str, run, keys: list[str]) -> None:
    """Copy run-folder objects into the MLflow run's artifacts, under their folder names."""
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            if not run.exists(key):
                continue
            local = Path(tmp) / key
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(run.read_bytes(key))
            client.log_artifact(run_id, str(local), str(Path(key).parent) if "/" in key else None)


def _record_train(client, run_id: str, run, result: dict) -> None:
    config = json.loads(run.read_bytes("model/config.json"))
    history = json.loads(run.read_bytes("model/history.json"))
    # Per epoch: phase1.val_auroc etc. (an ensemble's history is its members' best val AUROC).
    steps = {
        f"{phase}.{name}": values
        for phase, metrics in history.items()
        if isinstance(metrics, dict)
        for name, values in metrics.items()
        if isinstance(values, list)
    }
    best = {f"best_val_auroc.{k}": v for k, v in (result.get("best_val_auroc") or {}).items()}
    tags = {"manifest_version": result.get("manifest_version"), "backbone": result.get("backbone")}
    _log(client, run_id, params=_flat("", config, {}), metrics=best, steps=steps, tags=tags)
    _log_files(client, run_id, run, ["model/model.keras", "model/provenance.json", "model/history.json"])


def _ci_metrics(prefix: str, block: dict) -> dict:
    """``{"auroc": {"value", "ci_low", "ci_high"}}`` -> ``test.auroc``, ``test.auroc.ci_low``, ..."""
    out = {}
    for name, estimate in block.items():
        if isinstance(estimate, dict) and "value" in estimate:
            out[f"{prefix}.{name}"] = estimate["value"]
            out[f"{prefix}.{name}.ci_low"] = estimate.get("ci_low")
            out[f"{prefix}.{name}.ci_high"] = estimate.get("ci_high")
    return out


def _record_evaluate(client, run_id: str, run, result: dict) -> None:
    from training.tta import views_of  # numpy and scikit-learn: not at this module's import

    metrics = json.loads(run.read_bytes("eval/metrics.json"))
    choice = metrics["threshold"]
    values = {f"val.{k}": choice["val"].get(k) for k in ("auroc", "auprc", "sensitivity", "specificity")}
    values.update(_ci_metrics("test", metrics["test"]), threshold=choice["value"])
    for name, block in (metrics.get("external") or {}).items():
        values.update(_ci_metrics(f"external.{name}", block))
    tags = {
        "threshold.strategy": choice["strategy"],
        "pooling": metrics["scores"]["pooling"],
        "views": str(views_of(metrics)),
    }
    _log(client, run_id, metrics=values, tags=tags)
    plots = [key for key in run.list_keys("eval/") if key.endswith(".png")]
    _log_files(client, run_id, run, ["eval/metrics.json", *plots])
    client.log_text(run_id, json.dumps(result, indent=2, sort_keys=True), "threshold.json")


def _record_gradcam(client, run_id: str, run, result: dict) -> None:
    summary_key = (result.get("keys") or {}).get("summary", "gradcam/gradcam_summary.json")
    check = json.loads(run.read_bytes(summary_key)).get("lesion_focus_check") or {}
    values = {
        f"focus.{k}": check.get(k) for k in ("energy_inside_mean", "lesion_area_share_mean", "n_scored")
    }
    _log(client, run_id, metrics=values, tags={"focus.on_lesion": check.get("on_lesion")})
    _log_files(client, run_id, run, [summary_key])


def _record_report(client, run_id: str, run, result: dict) -> None:
    _log_files(client, run_id, run, ["report.html"])


_RECORDERS = {
    "train": _record_train,
    "evaluate": _record_evaluate,
    "gradcam": _record_gradcam,
    "report": _record_report,
}


def record_step(step: str, run_root: str, result: dict) -> dict:
    """Add what ``step`` wrote in the run folder to its MLflow run; returns where it went."""
    client, run_id = tracking_run(run_root)
    _RECORDERS[step](client, run_id, open_storage(run_root), result)
    client.set_terminated(run_id)  # FINISHED after each step; a later step may still add to it
    return {"tracking_uri": tracking_uri(run_root), "mlflow_run_id": run_id}


def record_document(run_root: str, name: str, document: dict, tags: dict | None = None) -> str:
    """A JSON document (a benchmark's result, say) and tags on the run folder's MLflow run; its run id."""
    client, run_id = tracking_run(run_root)
    client.log_text(run_id, json.dumps(document, indent=2, sort_keys=True, default=str), name)
    _log(client, run_id, tags=tags)
    return run_id
