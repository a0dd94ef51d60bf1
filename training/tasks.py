"""The pipeline's model-side steps (evaluate, Grad-CAM, report), as functions of URIs.

Each returns the small JSON dict its Airflow task pushes to XCom. They run in the training
runtime (local subprocess or container) through :mod:`training.cli`.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from melanoma.colour_constancy import colour_constancy_of
from melanoma.drop_scan import scan_drop
from melanoma.image_decode import decode_mask
from melanoma.image_header import RejectedImage
from melanoma.imaging import preprocess_image_bytes
from melanoma.manifest import load_split, require_manifest
from melanoma.records import Shard
from melanoma.storage import open_storage
from training.ensemble import gradcam_layer_names
from training.evaluation import decision_scores, evaluate_predictions, write_evaluation, xcom_payload
from training.gradcam import gradcam_heatmaps
from training.lesion_focus import focus_rows, lesion_focus_check, run_gradcam, summarise_focus
from training.model_io import load_model
from training.predict import MODEL_KEY, predict_probabilities, prediction_rows, rows_to_csv
from training.report import build_report_from_run
from training.shift import calibrate_site, save_site, score_shift, site_key
from training.tta import views_of


def _load_external(spec: str, colour_constancy: str, *, with_masks: bool = False):
    """An external drop (``raw_root::drop_id``) through the same scan and preprocessing as ingestion.

    Returns (Shard of the scorable images, unscorable inputs with their reasons): the scan's
    quarantine and images that fail to decode are reported, never dropped silently. Masks
    (all-zero where the drop has none) are decoded only ``with_masks``.
    """
    raw_root, _, drop_id = spec.rpartition("::")
    if not raw_root or not drop_id:
        raise ValueError(f"external set must be given as RAW_ROOT::DROP_ID, got {spec!r}")
    raw = open_storage(raw_root)
    scan = scan_drop(raw, drop_id)
    records, images, masks = [], [], []
    unscored = [q.to_json() for q in scan.quarantined]
    for item in scan.inputs:
        try:
            images.append(
                preprocess_image_bytes(raw.read_bytes(item.image_key), colour_constancy=colour_constancy)[0]
            )
        except RejectedImage as rejected:
            unscored.append(
                {
                    "drop_id": drop_id,
                    "item": item.image_id,
                    "reason": rejected.reason,
                    "detail": str(rejected),
                }
            )
            continue
        mask = np.zeros((224, 224), np.uint8)
        if with_masks and item.mask_key:
            try:
                mask = decode_mask(raw.read_bytes(item.mask_key))
            except (RejectedImage, ValueError):
                pass  # counted as "without mask" by the focus summary, like ingestion's unusable masks
        masks.append(mask)
        records.append(
            {
                "image_id": item.image_id,
                "lesion_id": item.lesion_id,
                "label": item.label,
                "dx": item.dx,
                "age": item.age,
                "sex": item.sex,
                "localization": item.localization,
                "has_mask": bool(mask.any()),
            }
        )
    batch = np.stack(images) if images else np.zeros((0, 224, 224, 3), np.uint8)
    stacked_masks = np.stack(masks) if masks else np.zeros((0, 224, 224), np.uint8)
    return Shard(batch, stacked_masks, records), unscored


def _external_rows(model, spec: str, colour_constancy: str, views: int) -> tuple[list[dict], list[dict]]:
    """Prediction rows of an external drop, and its unscorable inputs (see :func:`_load_external`)."""
    shard, unscored = _load_external(spec, colour_constancy)
    drop_id = spec.rpartition("::")[2]
    probabilities = predict_probabilities(
        model, shard.images, what=f"scoring external {drop_id}", views=views
    )
    return prediction_rows(shard.records, probabilities, split="external", source=drop_id), unscored


def external_focus_run(processed_root: str, run_root: str, spec: str, *, as_of: str | None = None) -> dict:
    """Grad-CAM lesion focus on an external drop with lesion masks, at the run's validation threshold.

    Writes ``eval/external-<drop>-focus.json`` (the summary of :func:`training.lesion_focus.summarise_focus`
    and its lesion-focus check) and returns it.
    """
    storage, run = open_storage(processed_root), open_storage(run_root)
    manifest = require_manifest(storage, as_of=as_of)
    metrics = json.loads(run.read_bytes("eval/metrics.json"))
    model = load_model(run.uri(MODEL_KEY))
    shard, unscored = _load_external(
        spec, colour_constancy_of(manifest.get("preprocessing")), with_masks=True
    )
    probabilities = predict_probabilities(model, shard.images, views=views_of(metrics))
    ids = [r["image_id"] for r in shard.records]
    scores = decision_scores(
        ids,
        probabilities.tolist(),
        [str(r["lesion_id"]) for r in shard.records],
        metrics["scores"]["pooling"],
    )
    threshold = metrics["threshold"]["value"]
    rows = focus_rows(
        shard, gradcam_heatmaps(model, shard.images, gradcam_layer_names(model)), scores, threshold
    )
    focus = summarise_focus(rows)
    summary = {
        "drop": spec.rpartition("::")[2],
        "threshold": threshold,
        "unscored": len(unscored),
        "focus": focus,
        "check": lesion_focus_check(focus),
    }
    run.write_bytes(
        f"eval/external-{summary['drop']}-focus.json", json.dumps(summary, indent=2, allow_nan=False).encode()
    )
    return summary


def evaluate_run(
    processed_root: str,
    run_root: str,
    *,
    strategy: str = "youden",
    target_sensitivity: float = 0.95,
    n_boot: int = 1000,
    as_of: str | None = None,
    external: list[str] | None = None,
    pooling: str = "lesion",
    manifest_version: int | None = None,
    test_time_augmentation: bool = False,
) -> dict:
    """Score val and test, choose the threshold on val, write eval/ and return the XCom payload.

    With ``test_time_augmentation`` every probability is the mean over the image's 8 dihedral
    views (:mod:`training.tta`), validation's included, so the threshold is chosen for such
    scores; ``eval/metrics.json`` records it and the model's later scorers follow it.

    ``eval/predictions.csv`` keeps the model's per-image probabilities; with ``pooling="lesion"``
    the metrics, the threshold and Grad-CAM's outcomes use the lesion-pooled scores
    (:func:`training.metrics.lesion_pooled_scores`).
    """
    storage, run = open_storage(processed_root), open_storage(run_root)
    manifest = require_manifest(storage, as_of=as_of, version=manifest_version)
    model = load_model(run.uri(MODEL_KEY))
    views = 8 if test_time_augmentation else 1
    rows: list[dict] = []
    for split in ("val", "test"):
        shard = load_split(storage, manifest, [split])
        probabilities = predict_probabilities(
            model, shard.images, what=f"evaluate: scoring {split}", views=views
        )
        rows += prediction_rows(shard.records, probabilities, split=split)
    external_sets, unscored = {}, {}
    for spec in external or []:
        name = spec.rpartition("::")[2]
        # External images get the preprocessing the model's training data had.
        colour = colour_constancy_of(manifest.get("preprocessing"))
        external_sets[name], unscored[name] = _external_rows(model, spec, colour, views)
        rows += external_sets[name]
    run.write_bytes("eval/predictions.csv", rows_to_csv(rows))
    internal = [r for r in rows if r["split"] in ("val", "test")]
    metrics = evaluate_predictions(
        internal,
        strategy=strategy,
        target_sensitivity=target_sensitivity,
        n_boot=n_boot,
        external=external_sets or None,
        pooling=pooling,
        views=views,
    )
    metrics["manifest_version"] = manifest["version"]
    if unscored:
        metrics["external_unscored"] = {
            name: {"count": len(items), "reasons": sorted({i["reason"] for i in items})}
            for name, items in unscored.items()
        }
        for name, items in unscored.items():
            run.write_bytes(
                f"eval/external-{name}-unscored.jsonl",
                "".join(json.dumps(i, sort_keys=True) + "\n" for i in items).encode(),
            )
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_evaluation(metrics, Path(tmp), rows=internal):
            run.write_bytes(f"eval/{path.name}", path.read_bytes())
    return xcom_payload(metrics, run.uri("eval/metrics.json"))


def calibrate_site_run(
    processed_root: str,
    run_root: str,
    site: str,
    labelled_drop: str,
    *,
    strategy: str | None = None,
    target_sensitivity: float = 0.85,
    n_boot: int = 1000,
    as_of: str | None = None,
) -> dict:
    """Re-choose the run's threshold for one site on a labelled drop of it (``RAW_ROOT::DROP_ID``).

    The drop goes through the same scan and preprocessing as an external set; scores are pooled
    as the run's evaluation pooled them, and the strategy defaults to the run's. The record
    (threshold, its lesion-bootstrap interval, out-of-fold sensitivity/specificity, the shift
    against validation) is kept as ``sites/<site>.json`` in the run, where ``predict --site``
    reads it.
    """
    site_key(site)  # a bad name fails before any scoring
    storage, run = open_storage(processed_root), open_storage(run_root)
    manifest = require_manifest(storage, as_of=as_of)
    metrics = json.loads(run.read_bytes("eval/metrics.json"))
    pooling, strategy = metrics["scores"]["pooling"], strategy or metrics["threshold"]["strategy"]
    model = load_model(run.uri(MODEL_KEY))
    rows, unscored = _external_rows(
        model,
        labelled_drop,
        colour_constancy_of(manifest.get("preprocessing")),
        views_of(metrics),  # validation's threshold was chosen on such scores
    )
    if not rows:
        raise ValueError(f"{labelled_drop}: no scorable image ({len(unscored)} unscorable)")
    ids, lesions = [r["image_id"] for r in rows], [str(r["lesion_id"]) for r in rows]
    pooled = decision_scores(ids, [r["probability"] for r in rows], lesions, pooling)
    scores = [pooled[i] for i in ids]
    record = calibrate_site(
        [int(r["label"]) for r in rows],
        scores,
        lesions,
        strategy=strategy,
        target_sensitivity=target_sensitivity,
        n_boot=n_boot,
    )
    validation = [
        float(r["probability"])
        for r in csv.DictReader(io.StringIO(run.read_bytes("eval/predictions.csv").decode()))
        if r["split"] == "val"
    ]
    record.update(
        drop=labelled_drop.rpartition("::")[2],
        pooling=pooling,
        unscored=len(unscored),
        run_threshold=metrics["threshold"]["value"],
        score_shift=score_shift(validation, [r["probability"] for r in rows], metrics["threshold"]["value"]),
    )
    return {
        "site": site,
        "site_uri": save_site(run, site, record),
        "threshold": record["threshold"],
        "threshold_ci": record["threshold_ci"],
        "held_out": record["held_out"],
        "run_threshold": record["run_threshold"],
    }


def gradcam_run(
    processed_root: str,
    run_root: str,
    threshold_payload: dict,
    *,
    as_of: str | None = None,
    layer_name: str | None = None,
    plusplus: bool = False,
    manifest_version: int | None = None,
) -> dict:
    """Grad-CAM over the test split with the threshold ``evaluate`` chose (passed via XCom)."""
    storage, run = open_storage(processed_root), open_storage(run_root)
    manifest = require_manifest(storage, as_of=as_of, version=manifest_version)
    model = load_model(run.uri(MODEL_KEY))
    test = load_split(storage, manifest, ["test"])
    test_rows = [
        row
        for row in csv.DictReader(io.StringIO(run.read_bytes("eval/predictions.csv").decode()))
        if row["split"] == "test"
    ]
    # The threshold was chosen on the scores evaluate pooled (or not): compare like with like.
    predictions = decision_scores(
        [row["image_id"] for row in test_rows],
        [float(row["probability"]) for row in test_rows],
        [row["lesion_id"] for row in test_rows],
        threshold_payload.get("pooling", "none"),
    )
    return run_gradcam(
        model, test, predictions, threshold_payload, run, "gradcam", layer_name=layer_name, plusplus=plusplus
    )


def report_run(run_root: str, threshold_payload: dict) -> dict:
    """Assemble ``report.html`` from the run's metrics, plots and Grad-CAM outputs."""
    run = open_storage(run_root)
    html = build_report_from_run(run, threshold_payload)
    run.write_bytes("report.html", html.encode())
    return {"report_uri": run.uri("report.html"), "bytes": len(html)}


def dumps_result(result: dict) -> str:
    return json.dumps(result, sort_keys=True, default=str)
