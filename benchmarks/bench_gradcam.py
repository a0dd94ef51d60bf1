"""Grad-CAM benchmark: heatmaps per second and lesion focus on the HAM10000 test split.

    make bench-gradcam                      # = python benchmarks/bench_gradcam.py
    python benchmarks/bench_gradcam.py --speed-only [--images 320]

The real run needs the quality benchmark's outputs (``make bench-quality``): its trained
model (``model_uri`` in ``benchmarks/results/quality.json``) and its processed HAM10000
(``benchmarks/work/quality/data``). It runs :func:`training.lesion_focus.run_gradcam`, the
pipeline's own step, over the whole test split at the threshold chosen on validation, and
writes ``benchmarks/results/gradcam.json`` and ``gradcam.md``: heatmaps/s next to the
forward-only ceiling (``model.predict`` and a compiled forward pass on the same images and
machine), and the lesion-focus summary (energy share inside the lesion against the lesion's
area share, pointing-game hit rate) overall, per class and per outcome. Without those
inputs it says what is missing and exits with status 2: it never stands in a model of its own.

``--speed-only`` measures speed alone, for work on the Grad-CAM code before a trained model
exists: the EfficientNet-Lite0 classifier with its ImageNet backbone and an untrained head
(the head does not change the cost) on HAM10000 test images preprocessed here with the Spark
job's functions. Its focus numbers mean nothing, so it writes no result file; it prints JSON.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training.machine import cpu_model  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = ROOT / "benchmarks" / "results"
QUALITY_JSON = RESULTS / "quality.json"
PROCESSED_ROOT = ROOT / "benchmarks" / "work" / "quality" / "data"
WORK = ROOT / "benchmarks" / "work" / "gradcam"
HAM10000 = Path(os.environ.get("MELANOMA_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ham10000"
TARGET_PER_S = 20.0
BATCH = 32


class MissingInput(RuntimeError):
    pass


# --------------------------------------------------------------------------- inputs


def _find_key(document, key: str):
    """The first value stored under ``key`` anywhere in a JSON document (depth first), or None."""
    if isinstance(document, dict):
        if key in document:
            return document[key]
        values = document.values()
    elif isinstance(document, list):
        values = document
    else:
        return None
    for value in values:
        found = _find_key(value, key)
        if found is not None:
            return found
    return None


def _rel(path) -> str:
    """A path relative to the project root when it lies inside it (for messages and results)."""
    if "://" in str(path):
        return str(path)
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _resolve(uri: str) -> str:
    """A relative path in quality.json is relative to the project root."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return str(ROOT / uri)


def _recorded_threshold(quality: dict) -> dict | None:
    """The threshold payload quality.json records, for a run folder without eval/metrics.json."""
    payload = None
    threshold = _find_key(quality, "threshold")
    if isinstance(threshold, dict):
        payload = {
            "threshold": threshold.get("value", threshold.get("threshold")),
            "strategy": threshold.get("strategy"),
            "chosen_on": threshold.get("chosen_on"),
        }
    elif isinstance(threshold, (int, float)):
        payload = {
            "threshold": float(threshold),
            "strategy": _find_key(quality, "strategy"),
            "chosen_on": _find_key(quality, "chosen_on"),
        }
    if payload is not None:
        payload["pooling"] = quality.get("pooling", "none")
    return payload


def _test_predictions(run, pooling: str):
    """The test split's decision scores from the run's eval/predictions.csv."""
    from training.evaluation import decision_scores

    rows = [
        row
        for row in csv.DictReader(io.StringIO(run.read_bytes("eval/predictions.csv").decode()))
        if row["split"] == "test"
    ]
    # Scored as evaluate scored them (lesion-pooled or not): the threshold applies to those.
    return decision_scores(
        [r["image_id"] for r in rows],
        [float(r["probability"]) for r in rows],
        [r["lesion_id"] for r in rows],
        pooling,
    )


def real_inputs() -> dict:
    """The quality benchmark's model, run folder, threshold and processed data; MissingInput if absent."""
    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage, split_uri

    if not QUALITY_JSON.is_file():
        raise MissingInput(f"{_rel(QUALITY_JSON)} does not exist: run `make bench-quality` first")
    quality = json.loads(QUALITY_JSON.read_text())
    model_uri = _find_key(quality, "model_uri")
    if not isinstance(model_uri, str) or not model_uri:
        raise MissingInput(f"{_rel(QUALITY_JSON)} names no model_uri")
    model_uri = _resolve(model_uri)
    model_storage, model_name = split_uri(model_uri)
    if not model_storage.exists(model_name):
        raise MissingInput(f"the model {model_uri} named by quality.json does not exist")
    processed = open_storage(PROCESSED_ROOT)
    manifest = latest_manifest(processed) if PROCESSED_ROOT.is_dir() else None
    if manifest is None:
        raise MissingInput(
            f"no processed data (no manifest) under {_rel(PROCESSED_ROOT)}: run `make bench-quality`"
        )

    # The run folder is the model's grandparent (runs/<key>/model/model.keras); its
    # eval/metrics.json holds the threshold chosen on validation and eval/predictions.csv
    # the test probabilities, as the pipeline's gradcam task reads them.
    run_uri = model_uri.rsplit("/", 2)[0] if model_uri.endswith("/model/model.keras") else None
    run = open_storage(run_uri) if run_uri else None
    payload, source = None, None
    if run is not None and run.exists("eval/metrics.json"):
        from training.evaluation import xcom_payload

        payload = xcom_payload(json.loads(run.read_bytes("eval/metrics.json")), run.uri("eval/metrics.json"))
        source = run.uri("eval/metrics.json")
    else:
        payload, source = _recorded_threshold(quality), str(_rel(QUALITY_JSON))
    if payload is None or payload.get("threshold") is None:
        raise MissingInput("no validation threshold in the run's eval/metrics.json nor in quality.json")
    if payload.get("chosen_on") not in (None, "val"):
        raise MissingInput(
            f"the threshold was chosen on {payload['chosen_on']!r}, not on the validation split"
        )
    predictions = None
    if run is not None and run.exists("eval/predictions.csv"):
        predictions = _test_predictions(run, payload.get("pooling", "none"))
    return {
        "model_uri": model_uri,
        "run_uri": run_uri,
        "payload": payload,
        "threshold_source": source,
        "processed": processed,
        "manifest": manifest,
        "predictions": predictions,
    }


def speed_inputs(n_images: int):
    """(Shard of ``n_images`` HAM10000 test images with masks, model) for --speed-only."""
    import numpy as np

    from melanoma.image_decode import decode_mask
    from melanoma.imaging import preprocess_image_bytes
    from melanoma.records import Shard
    from melanoma.splits import assign_split
    from training.model import build_classifier

    metadata = HAM10000 / "HAM10000_metadata.csv"
    if not metadata.is_file():
        raise MissingInput(f"HAM10000 not found at {HAM10000}")
    rows = sorted(
        (r for r in csv.DictReader(metadata.open()) if assign_split(r["lesion_id"]) == "test"),
        key=lambda r: r["image_id"],
    )[:n_images]
    images, masks, records = [], [], []
    for row in rows:
        images.append(
            preprocess_image_bytes((HAM10000 / "images" / f"{row['image_id']}.jpg").read_bytes())[0]
        )
        mask_path = HAM10000 / "masks" / f"{row['image_id']}_segmentation.png"
        masks.append(
            decode_mask(mask_path.read_bytes()) if mask_path.is_file() else np.zeros((224, 224), np.uint8)
        )
        records.append(
            {
                "image_id": row["image_id"],
                "lesion_id": row["lesion_id"],
                "dx": row["dx"],
                "label": int(row["dx"] == "mel"),
                "has_mask": mask_path.is_file(),
            }
        )
    shard = Shard(np.stack(images), np.stack(masks), records)
    return shard, build_classifier("efficientnet_lite0", "imagenet")


# --------------------------------------------------------------------------- measurements


def machine() -> dict:
    import keras
    import tensorflow as tf

    return {
        "cpu": cpu_model(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": bool(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("nan")


def forward_ceilings(model, images) -> dict:
    """Forward-only throughput on the same images: what a heatmap (forward + a tiny backward) can at best reach."""
    import numpy as np
    import tensorflow as tf

    model.predict(images[:BATCH], batch_size=BATCH, verbose=0)  # warm-up (builds the predict function)
    start = time.perf_counter()
    model.predict(images, batch_size=BATCH, verbose=0)
    predict_s = time.perf_counter() - start

    @tf.function(input_signature=[tf.TensorSpec((BATCH, *images.shape[1:]), tf.uint8)])
    def forward(batch):
        return model(tf.cast(batch, tf.float32), training=False)

    def padded(chunk):
        return (
            np.concatenate([chunk, np.zeros((BATCH - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            if len(chunk) < BATCH
            else chunk
        )

    forward(tf.constant(padded(images[:BATCH])))  # trace
    start = time.perf_counter()
    for i in range(0, len(images), BATCH):
        forward(tf.constant(padded(images[i : i + BATCH]))).numpy()
    compiled_s = time.perf_counter() - start
    return {
        "model_predict_images_per_s": _rate(len(images), predict_s),
        "compiled_forward_images_per_s": _rate(len(images), compiled_s),
        "batch_size": BATCH,
    }


def timed_gradcam(model, shard, predictions, payload, out_root: Path) -> tuple[dict, dict, float]:
    """run_gradcam over the shard; returns (its XCom result, its summary document, wall seconds)."""
    from melanoma.storage import LocalStorage
    from training.lesion_focus import run_gradcam

    storage = LocalStorage(out_root)
    start = time.perf_counter()
    result = run_gradcam(model, shard, predictions, payload, storage, "gradcam")
    wall = time.perf_counter() - start
    summary = json.loads(storage.read_bytes("gradcam/gradcam_summary.json"))
    return result, summary, wall


def _focus_table(focus: dict) -> list[dict]:
    groups = [("all", focus["overall"])]
    groups += [(f"class: {k}", v) for k, v in focus["by_class"].items()]
    groups += [(f"outcome: {k}", focus["by_outcome"][k]) for k in ("TP", "FP", "FN", "TN")]
    keys = (
        "n",
        "n_scored",
        "n_without_mask",
        "energy_inside_mean",
        "energy_inside_median",
        "lesion_area_share_mean",
        "pointing_hit_rate",
    )
    return [{"group": name, **{k: stats.get(k) for k in keys}} for name, stats in groups]


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(doc: dict) -> str:
    speed, ceil = doc["speed"], doc["speed"]["ceiling"]
    lines = [
        "## Grad-CAM (`make bench-gradcam`)",
        "",
        f"`{doc['command']}` on {doc['date']}: {doc['machine']['cpu']}, {doc['machine']['cores_usable']} usable cores, "
        f"{'a GPU' if doc['machine']['gpu'] else 'no GPU'}, TensorFlow {doc['machine']['tensorflow']}, Keras {doc['machine']['keras']}; "
        f"load average before timing {doc['load_average_before'][0]:.2f}.",
        "",
        f"Model: `{doc['model_uri']}` ({doc['backbone']}, layer `{doc['layer_name']}`), "
        f"{doc['n_images']} HAM10000 test images (manifest v{doc['manifest_version']}), "
        f"threshold {doc['threshold']['threshold']:.4f} ({doc['threshold'].get('strategy')} on "
        f"{doc['threshold'].get('chosen_on')}, from `{doc['threshold_source']}`), applied to "
        f"{'lesion-pooled scores' if doc.get('pooling') == 'lesion' else 'per-image scores'}.",
        "",
        "| | images/s |",
        "|---|---:|",
        f"| forward only, `model.predict` (batch {ceil['batch_size']}) | {ceil['model_predict_images_per_s']:.1f} |",
        f"| forward only, compiled fixed-shape batch | {ceil['compiled_forward_images_per_s']:.1f} |",
        f"| **Grad-CAM heatmaps** (`gradcam_heatmaps`, target ≥ {TARGET_PER_S:.0f}) | **{speed['heatmaps_per_s']:.1f}** |",
        f"| whole `run_gradcam` step (heatmaps, lesion focus, overlays, files) | {speed['run_gradcam_images_per_s']:.1f} |",
        "",
        "Lesion focus (energy inside: share of the heatmap's mass on the segmented lesion; a uniform "
        "map would score the lesion's area share; pointing hit: the hottest pixel is on the lesion):",
        "",
        "| group | images | scored | energy inside (mean) | (median) | lesion area (mean) | pointing hit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in doc["focus_table"]:
        lines.append(
            f"| {row['group']} | {row['n']} | {row['n_scored']} | {_pct(row['energy_inside_mean'])} | "
            f"{_pct(row['energy_inside_median'])} | {_pct(row['lesion_area_share_mean'])} | {_pct(row['pointing_hit_rate'])} |"
        )
    check = doc.get("lesion_focus_check")
    if check and check["on_lesion"] is not None:
        lines += [
            "",
            f"Lesion focus check (the melanomas' maps on the lesion more than a uniform map's): "
            f"**{'passed' if check['on_lesion'] else 'failed'}** ({_pct(check['energy_inside_mean'])} against "
            f"{_pct(check['lesion_area_share_mean'])}).",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def run_real(args) -> int:
    try:
        inputs = real_inputs()
    except MissingInput as missing:
        print(f"bench-gradcam: cannot run: {missing}. No result written.", file=sys.stderr)
        return 2
    from melanoma.manifest import load_split
    from training.ensemble import ensemble_backbones, gradcam_layer_names
    from training.evaluation import decision_scores
    from training.model import backbone_name
    from training.model_io import load_model
    from training.predict import predict_probabilities

    model = load_model(inputs["model_uri"])
    test = load_split(inputs["processed"], inputs["manifest"], ["test"])
    if len(test) == 0:
        print("bench-gradcam: the processed data has no test split. No result written.", file=sys.stderr)
        return 2
    predictions = inputs["predictions"]
    predictions_source = "eval/predictions.csv"
    if predictions is None or any(r["image_id"] not in predictions for r in test.records):
        predictions = decision_scores(
            [r["image_id"] for r in test.records],
            predict_probabilities(model, test.images),
            [r["lesion_id"] for r in test.records],
            inputs["payload"].get("pooling", "none"),
        )
        predictions_source = "scored here with the model"

    load_before = os.getloadavg()
    ceiling = forward_ceilings(model, test.images)
    result, summary, wall = timed_gradcam(model, test, predictions, inputs["payload"], WORK)
    load_after = os.getloadavg()

    doc = {
        "command": "make bench-gradcam",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "model_uri": _rel(inputs["model_uri"]),
        "backbone": (f"ensemble of {len(ensemble_backbones(model))}: " + ", ".join(ensemble_backbones(model)))
        if ensemble_backbones(model)
        else backbone_name(model),
        "layer_name": " + ".join(gradcam_layer_names(model)),
        "pooling": inputs["payload"].get("pooling", "none"),
        "processed_root": str(_rel(PROCESSED_ROOT)),
        "manifest_version": inputs["manifest"]["version"],
        "n_images": len(test),
        "threshold": {
            k: inputs["payload"].get(k) for k in ("threshold", "strategy", "chosen_on", "target_sensitivity")
        },
        "threshold_source": inputs["threshold_source"],
        "predictions_source": predictions_source,
        "method": summary["method"],
        "speed": {
            "heatmaps_per_s": round(summary["heatmaps_per_s"], 2),
            "run_gradcam_wall_s": round(wall, 2),
            "run_gradcam_images_per_s": _rate(len(test), wall),
            "target_heatmaps_per_s": TARGET_PER_S,
            "meets_target": summary["heatmaps_per_s"] >= TARGET_PER_S,
            "ceiling": ceiling,
        },
        "focus": summary["focus"],
        "focus_table": _focus_table(summary["focus"]),
        "lesion_focus_check": summary["lesion_focus_check"],
        "outputs": _rel(WORK / "gradcam"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gradcam.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "gradcam.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {_rel(RESULTS)}/gradcam.json and gradcam.md")
    return 0


def run_speed_only(args) -> int:
    try:
        shard, model = speed_inputs(args.images)
    except MissingInput as missing:
        print(f"bench-gradcam --speed-only: cannot run: {missing}", file=sys.stderr)
        return 2
    from training.predict import predict_probabilities

    predictions = dict(
        zip((r["image_id"] for r in shard.records), predict_probabilities(model, shard.images))
    )
    load_before = os.getloadavg()
    ceiling = forward_ceilings(model, shard.images)
    with tempfile.TemporaryDirectory() as tmp:
        _, summary, wall = timed_gradcam(
            model, shard, predictions, {"threshold": 0.5, "strategy": "none (speed only)"}, Path(tmp)
        )
    print(
        json.dumps(
            {
                "mode": "speed only: Lite0 ImageNet backbone, untrained head; focus numbers not meaningful, nothing written",
                "machine": machine(),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "n_images": len(shard),
                "heatmaps_per_s": round(summary["heatmaps_per_s"], 2),
                "run_gradcam_images_per_s": _rate(len(shard), wall),
                "ceiling": ceiling,
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--speed-only", action="store_true", help="speed alone, untrained head, nothing written"
    )
    parser.add_argument("--images", type=int, default=320, help="--speed-only: how many HAM10000 test images")
    args = parser.parse_args(argv)
    return run_speed_only(args) if args.speed_only else run_real(args)


if __name__ == "__main__":
    sys.exit(main())
