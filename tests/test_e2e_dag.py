"""End to end: `airflow dags test` over ~200 real HAM10000 images on a real S3 endpoint (moto).

Real Airflow (SQLite), real Spark (local[2]), real boto3 over HTTP, real images, the real
EfficientNet-Lite0 ImageNet weights. Asserts what each stage wrote and that the threshold
`evaluate` pushed to XCom is the one `gradcam` used.
"""

from __future__ import annotations

import json
import re
import sqlite3

import boto3
import pytest

from pipeline.demo import airflow_env, run_dag

from ham_drop import metadata_csv, metadata_rows, pick_images, upload_images

pytestmark = pytest.mark.e2e

DROP_ID = "ham-2026-01-01"


def upload_drop(s3, bucket: str, ham10000_dir) -> list[dict]:
    rows = metadata_rows(ham10000_dir)
    chosen = pick_images(rows)
    prefix = f"raw/{DROP_ID}"
    upload_images(s3, bucket, prefix, ham10000_dir, chosen)
    # Two bad inputs: a truncated JPEG with its row, and a row whose image never arrived.
    good = (ham10000_dir / "images" / f"{chosen[0]['image_id']}.jpg").read_bytes()
    s3.put_object(
        Bucket=bucket, Key=f"{prefix}/HAM10000_images_part_2/ISIC_9999999.jpg", Body=good[: len(good) // 3]
    )
    extra = [
        dict(chosen[0], lesion_id="HAM_9999999", image_id="ISIC_9999999"),
        dict(chosen[0], lesion_id="HAM_9999998", image_id="ISIC_9999998"),
    ]
    s3.put_object(Bucket=bucket, Key=f"{prefix}/HAM10000_metadata.csv", Body=metadata_csv(chosen + extra))
    return chosen


def read_json(s3, bucket: str, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_dag_end_to_end_on_s3(ham10000_dir, s3_env, s3_bucket, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_env["MELANOMA_S3_ENDPOINT_URL"])
    chosen = upload_drop(s3, s3_bucket, ham10000_dir)
    # Runs in a bucket need a tracking store of their own (SQLite cannot live in a bucket): a
    # deployment names its MLflow server; here, a SQLite file.
    tracking = {"MELANOMA_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    (tmp_path / "mlflow").mkdir()
    env = airflow_env(
        tmp_path / "airflow", f"s3://{s3_bucket}/data", f"s3://{s3_bucket}/raw", {**s3_env, **tracking}
    )
    conf = {"recipe": "quick", "backbone": "efficientnet_lite0", "epochs": 8, "n_boot": 100}
    result = run_dag(env, conf, logical_date="2026-01-01T00:00:00+00:00")
    (tmp_path / "dags_test.log").write_text(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:]
    # Each long step says where it is in the task log: count, rate, and an ETA or its duration.
    for step in (
        r"preprocess chunks: (\d+)/\1 \(100%\)",
        r"phase 1 epochs: \d+/8 .*ETA",
        r"evaluate: scoring test: (\d+)/\1 \(100%\), .*done in",
        r"gradcam heatmaps: (\d+)/\1 \(100%\), .*done in",
    ):
        assert re.search(step, result.stdout), f"no progress line {step!r} in the task logs"

    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", [])
    ]
    manifests = sorted(k for k in keys if k.startswith("data/processed/manifest-"))
    assert len(manifests) == 2, manifests  # preprocess, then augment
    manifest = read_json(s3, s3_bucket, manifests[-1])
    accounting = manifest["accounting"][DROP_ID]
    assert accounting["inputs"] == len(chosen) + 2
    assert accounting["written"] == len(chosen)
    assert accounting["quarantined"] == 2
    quarantine = [
        json.loads(line)
        for line in s3.get_object(Bucket=s3_bucket, Key=f"data/{accounting['quarantine_key']}")["Body"]
        .read()
        .splitlines()
    ]
    assert {(q["item"], q["reason"]) for q in quarantine} == {
        ("ISIC_9999999", "truncated"),
        ("ISIC_9999998", "missing-image"),
    }
    for shard in manifest["shards"]:
        assert f"data/{shard['key']}" in keys
    n_train_mel = manifest["counts"]["train"]["1"]
    assert manifest["augmented_counts"]["train"]["1"] == 2 * n_train_mel > 0
    assert manifest["augmented_counts"]["val"] == {"0": 0, "1": 0} and manifest["augmented_counts"][
        "test"
    ] == {"0": 0, "1": 0}

    run_prefix = "data/runs/manual__20260101T000000Z"
    for key in [
        "model/model.keras",
        "model/history.json",
        "model/config.json",
        "model/provenance.json",
        "eval/metrics.json",
        "eval/predictions.csv",
        "gradcam/gradcam_summary.json",
        "report.html",
        "promotion.json",
        "tracking.json",
    ]:
        assert f"{run_prefix}/{key}" in keys, key
    assert any(k.startswith(f"{run_prefix}/eval/") and k.endswith(".png") for k in keys)
    assert any(k.startswith(f"{run_prefix}/gradcam/overlays/") for k in keys)
    metrics = read_json(s3, s3_bucket, f"{run_prefix}/eval/metrics.json")
    provenance = read_json(s3, s3_bucket, f"{run_prefix}/model/provenance.json")
    assert provenance["backbone"] == "efficientnet_lite0" and provenance.get("weights_sha256")

    # The threshold travelled by XCom: read what evaluate pushed from Airflow's own database.
    db = sqlite3.connect(tmp_path / "airflow" / "airflow.db")
    xcoms = {
        task: json.loads(value)
        for task, value in db.execute(
            "select task_id, value from xcom where dag_id='melanoma_pipeline' and key='return_value'"
        )
    }
    pushed = xcoms["evaluate"]
    assert pushed["chosen_on"] == "val" and pushed["strategy"] == "youden"
    assert pushed["threshold"] == metrics["threshold"]["value"]
    summary = read_json(s3, s3_bucket, f"{run_prefix}/gradcam/gradcam_summary.json")
    assert summary["threshold"] == pushed["threshold"]
    assert xcoms["gradcam"]["threshold"] == pushed["threshold"]

    # promote registered the model and decided with its reasons (a quick model on ~200 images may
    # well stay under the default floor: either way the decision is in XCom, the run and the store).
    decision = xcoms["promote"]
    assert decision == read_json(s3, s3_bucket, f"{run_prefix}/promotion.json")
    assert decision["version"] == 1 and decision["champion_before"] is None and decision["reasons"]
    assert decision["promoted"] == (
        decision["challenger_val_auroc"] >= decision["min_val_auroc"] and decision["focus_on_lesion"] is True
    )
    import mlflow

    version = mlflow.MlflowClient(decision["tracking_uri"]).get_model_version("melanoma-classifier", "1")
    assert version.tags["run_root"] == f"s3://{s3_bucket}/{run_prefix}"
    assert version.tags["threshold"] == repr(pushed["threshold"])
