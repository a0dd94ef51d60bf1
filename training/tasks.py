"""The pipeline's model-side steps (evaluate, Grad-CAM, report), as functions of URIs.

Each returns the small JSON dict its Airflow task pushes to XCom. They run in the training
runtime (local subprocess or container) through :mod:`training.cli`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from melanoma.manifest import load_split, require_manifest
from melanoma.storage import open_storage
from training.predict import load_model, predict_probabilities, prediction_rows, rows_to_csv

MODEL_KEY = "model/model.keras"


def _external_rows(model, spec: str) -> tuple[list[dict], list[dict]]:
    """Score an external drop (``raw_root::drop_id``) through the same scan and preprocessing.

    Returns (prediction rows, unscorable inputs with their reasons): the scan's quarantine
    and images that fail to decode are reported, never dropped silently.
    """
    import numpy as np

    from melanoma.drops import scan_drop
    from melanoma.imaging import RejectedImage, preprocess_image_bytes

    raw_root, _, drop_id = spec.rpartition("::")
    if not raw_root or not drop_id:
        raise ValueError(f"external set must be given as RAW_ROOT::DROP_ID, got {spec!r}")
    raw = open_storage(raw_root)
    scan = scan_drop(raw, drop_id)
    records, images = [], []
    unscored = [q.to_json() for q in scan.quarantined]
    for item in scan.inputs:
        try:
            images.append(preprocess_image_bytes(raw.read_bytes(item.image_key))[0])
        except RejectedImage as rejected:
            unscored.append({"drop_id": drop_id, "item": item.image_id, "reason": rejected.reason, "detail": str(rejected)})
            continue
        records.append({"image_id": item.image_id, "lesion_id": item.lesion_id, "label": item.label, "dx": item.dx,
                        "age": item.age, "sex": item.sex, "localization": item.localization})
    batch = np.stack(images) if images else np.zeros((0, 224, 224, 3), np.uint8)
    return prediction_rows(records, predict_probabilities(model, batch), split="external", source=drop_id), unscored


def evaluate_run(processed_root: str, run_root: str, *, strategy: str = "youden", target_sensitivity: float = 0.95,
                 n_boot: int = 1000, as_of: str | None = None, external: list[str] | None = None,
                 pooling: str = "lesion", manifest_version: int | None = None) -> dict:
    """Score val and test, choose the threshold on val, write eval/ and return the XCom payload.

    ``eval/predictions.csv`` keeps the model's per-image probabilities; with ``pooling="lesion"``
    the metrics, the threshold and Grad-CAM's outcomes use the lesion-pooled scores
    (:func:`training.metrics.lesion_pooled_scores`).
    """
    from training.evaluation import evaluate_predictions, write_evaluation, xcom_payload

    storage, run = open_storage(processed_root), open_storage(run_root)
    manifest = require_manifest(storage, as_of=as_of, version=manifest_version)
    model = load_model(run.uri(MODEL_KEY))
    rows: list[dict] = []
    for split in ("val", "test"):
        shard = load_split(storage, manifest, [split])
        rows += prediction_rows(shard.records, predict_probabilities(model, shard.images), split=split)
    external_sets, unscored = {}, {}
    for spec in external or []:
        name = spec.rpartition("::")[2]
        external_sets[name], unscored[name] = _external_rows(model, spec)
        rows += external_sets[name]
    run.write_bytes("eval/predictions.csv", rows_to_csv(rows))
    internal = [r for r in rows if r["split"] in ("val", "test")]
    metrics = evaluate_predictions(internal, strategy=strategy, target_sensitivity=target_sensitivity, n_boot=n_boot,
                                   external=external_sets or None, pooling=pooling)
    metrics["manifest_version"] = manifest["version"]
    if unscored:
        metrics["external_unscored"] = {name: {"count": len(items), "reasons": sorted({i["reason"] for i in items})} for name, items in unscored.items()}
        for name, items in unscored.items():
            run.write_bytes(f"eval/external-{name}-unscored.jsonl", "".join(json.dumps(i, sort_keys=True) + "\n" for i in items).encode())
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_evaluation(metrics, Path(tmp), rows=internal):
            run.write_bytes(f"eval/{path.name}", path.read_bytes())
    return xcom_payload(metrics, run.uri("eval/metrics.json"))


def gradcam_run(processed_root: str, run_root: str, threshold_payload: dict, *, as_of: str | None = None,
                layer_name: str | None = None, plusplus: bool = False, manifest_version: int | None = None) -> dict:
    """Grad-CAM over the test split with the threshold ``evaluate`` chose (passed via XCom)."""
    import csv
    import io

    from training.evaluation import decision_scores
    from training.gradcam import run_gradcam

    storage, run = open_storage(processed_root), open_storage(run_root)
    manifest = require_manifest(storage, as_of=as_of, version=manifest_version)
    model = load_model(run.uri(MODEL_KEY))
    test = load_split(storage, manifest, ["test"])
    test_rows = [row for row in csv.DictReader(io.StringIO(run.read_bytes("eval/predictions.csv").decode())) if row["split"] == "test"]
    # The threshold was chosen on the scores evaluate pooled (or not): compare like with like.
    predictions = decision_scores([row["image_id"] for row in test_rows], [float(row["probability"]) for row in test_rows],
                                  [row["lesion_id"] for row in test_rows], threshold_payload.get("pooling", "none"))
    return run_gradcam(model, test, predictions, threshold_payload, run, "gradcam", layer_name=layer_name, plusplus=plusplus)


def report_run(run_root: str, threshold_payload: dict) -> dict:
    """Assemble ``report.html`` from the run's metrics, plots and Grad-CAM outputs."""
    from training.report import build_report_from_run

    run = open_storage(run_root)
    html = build_report_from_run(run, threshold_payload)
    run.write_bytes("report.html", html.encode())
    return {"report_uri": run.uri("report.html"), "bytes": len(html)}


def dumps_result(result: dict) -> str:
    return json.dumps(result, sort_keys=True, default=str)
