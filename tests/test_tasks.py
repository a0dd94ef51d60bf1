"""training.tasks.evaluate_run on real shards (built without Spark) with an external drop."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from melanoma import ingest
from melanoma.manifest import commit_manifest
from melanoma.storage import open_storage
from melanoma.synthetic import write_drop

pytestmark = pytest.mark.slow


def build_processed(raw_root: Path, data_root: Path, drop_id: str) -> dict:
    """The preprocess job's driver and executor steps, run in-process."""
    plan = ingest.plan_drop(str(raw_root), str(data_root), drop_id, {})
    results = [ingest.process_chunk(task) for task in plan.tasks]
    manifest = ingest.finish_drops(open_storage(data_root), None, [plan], results, logical_date="2026-01-01")
    commit_manifest(open_storage(data_root), manifest)
    return manifest


def test_evaluate_run_reports_external_set_and_unscorable_images(tmp_path):
    import keras

    from training.model import build_classifier
    from training.tasks import evaluate_run

    raw, data, run = tmp_path / "raw", tmp_path / "data", tmp_path / "data" / "runs" / "r1"
    drop = write_drop(raw, n_images=120, seed=1)
    build_processed(raw, data, drop.name)
    external = write_drop(tmp_path / "external_raw", n_images=30, seed=2)
    # One external image is cut short: it must be reported as unscorable, not dropped.
    victim = sorted((external / "images").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    keras.utils.set_random_seed(0)
    model = build_classifier("efficientnet_lite0", None)
    (run / "model").mkdir(parents=True)
    model.save(run / "model" / "model.keras")

    payload = evaluate_run(
        str(data), str(run), n_boot=100, external=[f"{tmp_path / 'external_raw'}::{external.name}"]
    )

    assert payload["chosen_on"] == "val" and 0.0 <= payload["threshold"] <= 1.0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["external"][external.name]["n_images"] == 29
    assert metrics["external_unscored"][external.name] == {"count": 1, "reasons": ["truncated"]}
    unscored = [
        json.loads(line)
        for line in (run / "eval" / f"external-{external.name}-unscored.jsonl").read_text().splitlines()
    ]
    assert [u["item"] for u in unscored] == [victim.stem]
    rows = list(csv.DictReader(io.StringIO((run / "eval" / "predictions.csv").read_text())))
    assert {r["split"] for r in rows} == {"val", "test", "external"}
    assert sum(r["split"] == "external" for r in rows) == 29
    assert (run / "eval" / "roc_test.png").stat().st_size > 1000


def test_gradcam_outcomes_use_the_pooled_scores_evaluate_thresholded(tmp_path):
    import keras

    from training.metrics import lesion_pooled_scores
    from training.model import build_classifier
    from training.tasks import evaluate_run, gradcam_run

    raw, data, run = tmp_path / "raw", tmp_path / "data", tmp_path / "data" / "runs" / "r1"
    drop = write_drop(raw, n_images=120, seed=3)
    build_processed(raw, data, drop.name)
    keras.utils.set_random_seed(1)
    (run / "model").mkdir(parents=True)
    build_classifier("efficientnet_lite0", None).save(run / "model" / "model.keras")

    payload = evaluate_run(str(data), str(run), n_boot=100, pooling="lesion")
    assert payload["pooling"] == "lesion"
    gradcam_run(str(data), str(run), payload)

    test = [
        r
        for r in csv.DictReader(io.StringIO((run / "eval" / "predictions.csv").read_text()))
        if r["split"] == "test"
    ]
    lesions = [r["lesion_id"] for r in test]
    assert len(set(lesions)) < len(lesions), (
        "the synthetic test split should hold a lesion with several images"
    )
    pooled = dict(
        zip(
            (r["image_id"] for r in test),
            lesion_pooled_scores([float(r["probability"]) for r in test], lesions),
        )
    )
    focus = list(csv.DictReader(io.StringIO((run / "gradcam" / "lesion_focus.csv").read_text())))
    assert {r["image_id"] for r in focus} == set(pooled)
    for row in focus:
        assert float(row["probability"]) == pytest.approx(pooled[row["image_id"]])
    # Grad-CAM's outcomes are exactly the confusion matrix evaluate reported.
    counts = {k: sum(r["outcome"] == k.upper() for r in focus) for k in ("tp", "fp", "fn", "tn")}
    at_threshold = json.loads((run / "eval" / "metrics.json").read_text())["test"]["at_threshold"]
    assert counts == {k: at_threshold[k] for k in counts}
    summary = json.loads((run / "gradcam" / "gradcam_summary.json").read_text())
    assert summary["pooling"] == "lesion" and summary["threshold"] == payload["threshold"]


def test_test_time_augmentation_is_chosen_at_evaluate_and_followed_by_predict(tmp_path):
    import keras
    import numpy as np

    from melanoma.manifest import load_split
    from training.model_io import load_model
    from training.predict import predict_folder, predict_probabilities
    from training.tasks import evaluate_run

    raw, data, run = tmp_path / "raw", tmp_path / "data", tmp_path / "data" / "runs" / "r1"
    drop = write_drop(raw, n_images=120, seed=4)
    manifest = build_processed(raw, data, drop.name)
    # A real Keras model whose score depends on where the brightness lies in the frame (8x8
    # blocks, random weights), so on the image's orientation.
    images = keras.Input((224, 224, 3))
    x = keras.layers.AveragePooling2D(28)(keras.layers.Rescaling(1 / 255)(images))
    head = keras.layers.Dense(1, activation="sigmoid")
    classifier = keras.Model(images, head(keras.layers.Flatten()(x)))
    rng = np.random.default_rng(0)
    head.set_weights([rng.normal(0, 3.0, (192, 1)).astype("float32"), np.zeros(1, "float32")])
    (run / "model").mkdir(parents=True)
    classifier.save(run / "model" / "model.keras")

    payload = evaluate_run(str(data), str(run), n_boot=100, pooling="none", test_time_augmentation=True)

    assert payload["views"] == 8
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["scores"]["views"] == 8
    model = load_model(str(run / "model" / "model.keras"))
    test = load_split(open_storage(data), manifest, ["test"])
    eight, one = predict_probabilities(model, test.images, views=8), predict_probabilities(model, test.images)
    assert not np.allclose(eight, one, atol=1e-3), "the model should score the views differently"
    recorded = {
        r["image_id"]: float(r["probability"])
        for r in csv.DictReader(io.StringIO((run / "eval" / "predictions.csv").read_text()))
        if r["split"] == "test"
    }
    ids = [r["image_id"] for r in test.records]
    assert [recorded[i] for i in ids] == pytest.approx(eight.tolist(), abs=1e-6)

    # predict reads the views from the run, so the run's threshold meets the scores it was chosen for.
    predict_folder(str(run / "model" / "model.keras"), str(drop), str(tmp_path / "scored"))
    predicted = {
        r["image_id"]: float(r["probability"])
        for r in csv.DictReader(io.StringIO((tmp_path / "scored" / "predictions.csv").read_text()))
    }
    assert [predicted[i] for i in ids] == pytest.approx(eight.tolist(), abs=1e-5)
