"""The model lifecycle through the training CLI: tracking, the promotion gate, champion, predict, rollback.

Two real models on one synthetic manifest, one trained well and one barely trained on purpose;
the MLflow store is the embedded default (SQLite and a folder under the data root).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
from test_tasks import build_processed

from melanoma.synthetic import write_drop
from training.cli import main
from training.registry import gate

pytestmark = pytest.mark.slow


def cli(*args: str) -> dict:
    """Run ``python -m training <args>`` in-process; its RESULT line as a dict (exit 0 required)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, err.getvalue()[-3000:]
    return json.loads(out.getvalue().strip().splitlines()[-1].removeprefix("RESULT "))


def pipeline_run(data, run_root, config: dict, gate_args: list[str]) -> dict:
    """train -> evaluate -> gradcam -> report -> promote, as the DAG's tasks run them."""
    roots = ["--processed-root", data, "--run-root", run_root]
    cli("train", *roots, "--config", json.dumps(config))
    threshold = cli("evaluate", *roots, "--n-boot", "100")
    threshold.pop("tracking")
    cli("gradcam", *roots, "--threshold", json.dumps(threshold))
    cli("report", "--run-root", run_root, "--threshold", json.dumps(threshold))
    return cli("promote", *roots, "--threshold", json.dumps(threshold), *gate_args)


def test_the_gate_needs_the_floor_the_focus_check_and_the_champion():
    assert gate(0.9, True, min_val_auroc=0.85, margin=0.0) == (True, [])
    assert gate(0.9, True, min_val_auroc=0.85, margin=0.0, champion_auc=0.9)[0]  # as good: the newer
    promoted, reasons = gate(0.9, True, min_val_auroc=0.85, margin=0.01, champion_auc=0.895)
    assert not promoted and "champion's 0.8950 + margin 0.0100" in reasons[0]
    promoted, reasons = gate(0.8, None, min_val_auroc=0.85, margin=0.0)
    assert not promoted and len(reasons) == 2
    assert "below the floor" in reasons[0] and "not assessable" in reasons[1]
    assert gate(0.95, False, min_val_auroc=0.85, margin=0.0)[1] == [
        "lesion-focus check failed: melanoma Grad-CAMs do not sit on the lesions"
    ]
    assert not gate(float("nan"), True, min_val_auroc=0.85, margin=0.0)[0]  # NaN never passes


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A data set with two pipeline runs on it: v1 trained well (the champion), v2 barely trained."""
    root = tmp_path_factory.mktemp("lifecycle")
    raw, data = root / "raw", root / "data"
    drop = write_drop(raw, n_images=160, seed=5)
    build_processed(raw, data, drop.name)
    base = {"backbone": "efficientnet_lite0", "weights": "imagenet", "cache_dtype": "float32"}
    gate_args = ["--min-val-auroc", "0.6", "--margin", "0.0"]
    good_root, bad_root = data / "runs" / "good", data / "runs" / "bad"
    good = pipeline_run(data, good_root, {**base, "epochs": 12, "learning_rate": 1e-3}, gate_args)
    # The worse model: one epoch at a learning rate that leaves the head where it started.
    bad = pipeline_run(data, bad_root, {**base, "epochs": 1, "learning_rate": 1e-9}, gate_args)
    return {"root": root, "data": data, "drop": drop, "good": good, "bad": bad}


def test_better_model_becomes_champion_worse_is_rejected_predict_and_rollback(registry, tmp_path):
    import mlflow

    data, drop, good, bad = (registry[k] for k in ("data", "drop", "good", "bad"))
    good_root, bad_root = data / "runs" / "good", data / "runs" / "bad"
    assert good["promoted"], good["reasons"]
    assert good["version"] == 1 and good["champion_before"] is None
    assert not bad["promoted"] and bad["version"] == 2 and bad["champion_before"] == 1
    # The champion was re-scored on the same validation split: its own evaluation's AUROC.
    assert bad["champion_val_auroc"] == pytest.approx(good["challenger_val_auroc"], abs=1e-3)
    assert any("does not reach the champion's" in reason for reason in bad["reasons"]), bad["reasons"]
    assert "not promoted" in (bad_root / "report.html").read_text()
    assert json.loads((bad_root / "promotion.json").read_text())["reasons"] == bad["reasons"]

    # Tracked: the rejected run is kept, with its config, per-epoch metrics, evaluation and decision.
    store = f"sqlite:///{data / 'mlflow' / 'mlflow.db'}"
    assert good["tracking_uri"] == store
    client = mlflow.MlflowClient(store)
    bad_run = client.get_run(bad["mlflow_run_id"])
    assert bad_run.data.params["learning_rate"] == "1e-09"
    assert bad_run.data.tags["promotion"] == "rejected: v2"
    assert {"val.auroc", "test.auroc", "test.auroc.ci_low", "threshold", "focus.energy_inside_mean"} <= set(
        bad_run.data.metrics
    )
    epochs = client.get_metric_history(good["mlflow_run_id"], "phase1.val_auroc")
    assert [m.step for m in epochs] == list(range(len(epochs))) and len(epochs) >= 2
    artifacts = {a.path for a in client.list_artifacts(good["mlflow_run_id"])}
    assert {"model", "eval", "gradcam", "report.html", "threshold.json"} <= artifacts
    versions = cli("registry", "list", "--data-root", data)["versions"]
    assert [(v["version"], v["champion"], v["promotion"]) for v in versions] == [
        (2, False, "rejected"),
        (1, True, "promoted"),
    ]

    # predict --model champion: the champion's own threshold, its version in every row.
    images = drop / "images"
    scored = cli("predict", "--model", "champion", "--data-root", data, "--input", images,
                 "--output", tmp_path / "scores")  # fmt: skip
    good_threshold = json.loads((good_root / "eval" / "metrics.json").read_text())["threshold"]["value"]
    assert scored["model"] == "models:/melanoma-classifier/1" and scored["threshold"] == good_threshold
    rows = list(csv.DictReader((tmp_path / "scores" / "predictions.csv").open()))
    assert rows and {(r["model"], float(r["threshold"])) for r in rows} == {
        ("models:/melanoma-classifier/1", good_threshold)
    }

    # Force-promote the rejected model (audited), then roll back to v1.
    with pytest.raises(ValueError, match="never champion"):
        from training.registry import rollback

        rollback(store, 2, "not allowed: v2 was never champion")
    forced = cli("registry", "force-promote", "--version", 2, "--reason", "test", "--data-root", data)
    assert forced["champion_before"] == 1
    back = cli("registry", "rollback", "--version", 1, "--reason", "v2 was worse", "--data-root", data)
    assert back["champion_before"] == 2 and back["action"] == "rollback"
    assert int(client.get_model_version_by_alias("melanoma-classifier", "champion").version) == 1
    audit = client.get_registered_model("melanoma-classifier").tags
    assert sorted(json.loads(v)["action"] for k, v in audit.items() if k.startswith("audit.")) == [
        "force-promote",
        "rollback",
    ]


def test_a_bare_model_file_is_refused_without_a_threshold_and_an_unknown_model_is_a_clear_error(
    tmp_path, capsys
):
    assert main(["predict", "--model", "champion", "--data-root", str(tmp_path / "nothing"),
                 "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "melanoma-classifier" in capsys.readouterr().err


def test_new_images_in_the_inbox_are_scored_by_the_champion_through_the_dag(registry):
    """``airflow dags test melanoma_score``: the inbox folder scored by v1, an unreadable file quarantined."""
    from pipeline.demo import airflow_env, run_dag

    root, data = registry["root"], registry["data"]
    inbox = root / "inbox" / "clinic-2026-12-02"
    inbox.mkdir(parents=True)
    images = sorted((registry["drop"] / "images").glob("*.jpg"))[:6]
    for image in images:
        (inbox / image.name).write_bytes(image.read_bytes())
    (inbox / "cut-short.jpg").write_bytes(images[0].read_bytes()[:300])
    env = airflow_env(
        root / "airflow", str(data), str(root / "raw"), {"MELANOMA_INBOX_ROOT": str(root / "inbox")}
    )
    result = run_dag(env, {}, dag_id="melanoma_score")
    assert result.returncode == 0, result.stdout[-6000:]

    scores = data / "scores" / "clinic-2026-12-02"
    rows = list(csv.DictReader((scores / "predictions.csv").open()))
    threshold = json.loads((data / "runs" / "good" / "eval" / "metrics.json").read_text())["threshold"][
        "value"
    ]
    assert sorted(r["image_id"] for r in rows) == sorted(i.stem for i in images)
    assert {(r["model"], float(r["threshold"])) for r in rows} == {
        ("models:/melanoma-classifier/1", threshold)
    }
    assert all((scores / "overlays" / f"{r['image_id']}.png").stat().st_size > 1000 for r in rows)
    quarantined = [json.loads(line) for line in (scores / "quarantine.jsonl").read_text().splitlines()]
    assert quarantined == [
        {
            "drop_id": "clinic-2026-12-02",
            "item": "cut-short.jpg",
            "reason": "truncated",
            "detail": quarantined[0]["detail"],
        }
    ]
    page = (scores / "index.html").read_text()
    assert (
        "models:/melanoma-classifier/1" in page
        and "cut-short.jpg: truncated" in page
        and "<script" not in page
    )
    # Scored once: a second run finds nothing new and skips scoring.
    again = run_dag(env, {}, dag_id="melanoma_score", logical_date="2026-12-03T00:00:00+00:00")
    assert again.returncode == 0 and "folders to score: []" in again.stdout, again.stdout[-3000:]
