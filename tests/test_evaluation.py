"""Tests of training.evaluation (with its evaluation_* parts) and training.plots on synthetic prediction rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from training import evaluation as ev
from training import metrics as m
from training import plots
from training.calibration import expected_calibration_error
from training.evaluation_rows import read_predictions_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_rows(
    split: str,
    n_lesions: int,
    *,
    seed: int,
    melanoma_mean: float = 0.65,
    source: str = "ham10000",
    prefix: str | None = None,
) -> list[dict]:
    """Rows of one split: 1-3 images per lesion sharing the label, scores from a noisy model."""
    rng = np.random.default_rng(seed)
    prefix = prefix or split
    rows = []
    for lesion in range(n_lesions):
        label = int(rng.random() < 0.25)
        age = None if rng.random() < 0.1 else float(rng.choice([20, 35, 50, 65, 80]))
        sex = rng.choice(["male", "female", ""])
        site = rng.choice(["back", "face", "lower extremity", "trunk"])
        for image in range(int(rng.integers(1, 4))):
            mean = melanoma_mean if label else 0.3
            rows.append(
                {
                    "image_id": f"{prefix}_{lesion:04d}_{image}",
                    "lesion_id": f"{prefix}_L{lesion:04d}",
                    "split": split,
                    "label": label,
                    "dx": "mel" if label else "nv",
                    "probability": float(np.clip(rng.normal(mean, 0.18), 0.0, 1.0)),
                    "age": age,
                    "sex": sex or None,
                    "localization": site,
                    "source": source,
                }
            )
    return rows


def arrays(rows):
    return (
        np.array([r["label"] for r in rows]),
        np.array([r["probability"] for r in rows]),
    )


@pytest.fixture(scope="module")
def dataset():
    # The model separates test better than val, so the Youden points differ.
    return (
        make_rows("train", 30, seed=1)
        + make_rows("val", 150, seed=2, melanoma_mean=0.55)
        + make_rows("test", 150, seed=3, melanoma_mean=0.7)
    )


@pytest.fixture(scope="module")
def evaluated(dataset):
    return ev.evaluate_predictions(dataset, n_boot=100)


def test_threshold_is_chosen_on_val_and_reported_on_test(dataset, evaluated):
    val = [r for r in dataset if r["split"] == "val"]
    test = [r for r in dataset if r["split"] == "test"]
    val_threshold = m.choose_threshold(*arrays(val), "youden")
    test_threshold = m.choose_threshold(*arrays(test), "youden")
    assert val_threshold != test_threshold

    choice = evaluated["threshold"]
    assert choice["value"] == val_threshold
    assert (choice["strategy"], choice["chosen_on"], choice["target_sensitivity"]) == ("youden", "val", None)
    assert choice["val"]["sensitivity"] == m.binary_metrics(*arrays(val), val_threshold)["sensitivity"]
    assert choice["val"]["n_images"] == len(val)

    block = evaluated["test"]
    assert block["at_threshold"] == m.binary_metrics(*arrays(test), val_threshold)
    assert block["at_0.5"] == m.binary_metrics(*arrays(test), 0.5)
    assert block["sensitivity"]["value"] == block["at_threshold"]["sensitivity"]
    assert block["auroc"]["value"] == pytest.approx(roc_auc_score(*arrays(test)))
    assert block["auprc"]["value"] == pytest.approx(average_precision_score(*arrays(test)))
    for key in ("auroc", "auprc", "sensitivity", "specificity"):
        estimate = block[key]
        assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"], key
    assert block["bootstrap"]["n_boot"] == 100
    assert block["n_images"] == len(test)
    assert block["n_lesions"] == len({r["lesion_id"] for r in test})


def test_optimistic_block_is_marked_and_test_picked(dataset, evaluated):
    test = [r for r in dataset if r["split"] == "test"]
    optimistic = evaluated["optimistic_test_youden"]
    assert optimistic["optimistic"] is True
    assert optimistic["chosen_on"] == "test"
    assert "optimistic" in optimistic["warning"].lower()
    assert optimistic["threshold"] == m.choose_threshold(*arrays(test), "youden")
    assert optimistic["threshold"] != evaluated["threshold"]["value"]

    # Picking on test can only flatter Youden's J on test.
    def youden(binary):
        return binary["sensitivity"] + binary["specificity"] - 1

    assert youden(optimistic["at_threshold"]) > youden(evaluated["test"]["at_threshold"])


def test_counts_calibration_and_subgroups(dataset, evaluated):
    for split in ("train", "val", "test"):
        rows = [r for r in dataset if r["split"] == split]
        assert evaluated["counts"][split] == {
            "images": len(rows),
            "lesions": len({r["lesion_id"] for r in rows}),
            "melanoma": sum(r["label"] for r in rows),
        }
    assert evaluated["lesions_in_multiple_splits"] == 0 and evaluated["warnings"] == []
    calibration = evaluated["test"]["calibration"]
    test = [r for r in dataset if r["split"] == "test"]
    assert calibration["ece"] == pytest.approx(expected_calibration_error(*arrays(test)))
    assert sum(calibration["curve"]["count"]) == len(test)
    subgroups = evaluated["test"]["subgroups"]
    assert set(subgroups) == {"sex", "age_band", "localization"}
    assert "unknown" in subgroups["sex"] and "unknown" in subgroups["age_band"]
    assert sum(g["n"] for g in subgroups["localization"].values()) == len(test)


def test_strategy_sensitivity(dataset):
    result = ev.evaluate_predictions(dataset, strategy="sensitivity", target_sensitivity=0.9, n_boot=10)
    assert result["threshold"]["target_sensitivity"] == 0.9
    assert result["threshold"]["val"]["sensitivity"] >= 0.9


def test_external_sets(dataset):
    from_rows = make_rows("external", 40, seed=4, source="ph2")
    derm = make_rows("test", 40, seed=5, prefix="derm")
    nevi_only = [dict(r, label=0, dx="nv") for r in make_rows("test", 10, seed=6, prefix="nevi")]
    result = ev.evaluate_predictions(
        dataset + from_rows, n_boot=20, external={"derm7pt": derm, "nevi_only": nevi_only}
    )
    assert set(result["external"]) == {"ph2", "derm7pt", "nevi_only"}
    threshold = result["threshold"]["value"]
    for name, rows in (("ph2", from_rows), ("derm7pt", derm)):
        block = result["external"][name]
        assert block["at_threshold"] == m.binary_metrics(*arrays(rows), threshold)
        assert block["auroc"]["value"] == pytest.approx(roc_auc_score(*arrays(rows)))
        assert "curves" not in block
    one_class = result["external"]["nevi_only"]
    assert one_class["auroc"] == {"value": None, "ci_low": None, "ci_high": None}
    assert one_class["sensitivity"]["value"] is None
    assert one_class["specificity"]["value"] is not None
    assert "only class 0" in one_class["note"]
    assert result["counts"]["external"]["nevi_only"]["melanoma"] == 0
    json.dumps(result, allow_nan=False)
    with pytest.raises(ValueError, match="both in rows"):
        ev.evaluate_predictions(dataset + from_rows, n_boot=5, external={"ph2": derm})


def test_evaluation_refuses_bad_input(dataset):
    val_one_class = [dict(r, label=0) if r["split"] == "val" else r for r in dataset]
    with pytest.raises(ValueError, match="val split: .*needs both classes"):
        ev.evaluate_predictions(val_one_class, n_boot=5)
    with pytest.raises(ValueError, match="unknown split"):
        ev.evaluate_predictions(dataset + [dict(dataset[0], split="holdout")], n_boot=5)
    nan_row = dict(dataset[-1], probability=float("nan"))
    with pytest.raises(ValueError, match=f"non-finite probability, e.g. {nan_row['image_id']}"):
        ev.evaluate_predictions(dataset[:-1] + [nan_row], n_boot=5)
    no_lesion = dict(dataset[-1], lesion_id="")
    with pytest.raises(ValueError, match=f"lack a lesion_id, e.g. {no_lesion['image_id']}"):
        ev.evaluate_predictions(dataset[:-1] + [no_lesion], n_boot=5)
    with pytest.raises(ValueError, match="image_id repeated"):
        ev.evaluate_predictions(dataset + [dataset[-1]], n_boot=5)
    with pytest.raises(ValueError, match="need val and test rows"):
        ev.evaluate_predictions([r for r in dataset if r["split"] != "val"], n_boot=5)


def test_lesion_in_two_splits_is_reported(dataset):
    test_row = next(r for r in dataset if r["split"] == "test")
    val_row = next(r for r in dataset if r["split"] == "val")
    leaked = dict(test_row, image_id="leak", lesion_id=val_row["lesion_id"])
    result = ev.evaluate_predictions(dataset + [leaked], n_boot=5)
    assert result["lesions_in_multiple_splits"] == 1
    assert val_row["lesion_id"] in result["warnings"][0]


def test_read_predictions_csv(tmp_path):
    text = (
        "image_id,lesion_id,split,label,dx,probability,age,sex,localization,source\n"
        "ISIC_1,L1,val,1,mel,0.83,55,male,back,ham10000\n"
        "ISIC_2,L1,val,1,mel,0.61,,,,ham10000\n"
    )
    rows = read_predictions_csv(text.encode())
    assert rows[0] == {
        "image_id": "ISIC_1",
        "lesion_id": "L1",
        "split": "val",
        "label": 1,
        "dx": "mel",
        "probability": 0.83,
        "age": 55.0,
        "sex": "male",
        "localization": "back",
        "source": "ham10000",
    }
    assert (rows[1]["age"], rows[1]["sex"], rows[1]["localization"]) == (None, None, None)
    path = tmp_path / "predictions.csv"
    path.write_text(text)
    assert read_predictions_csv(path) == rows
    with pytest.raises(ValueError, match="lacks column"):
        read_predictions_csv(b"image_id,label\nx,1\n")
    with pytest.raises(ValueError, match="line 2: label must be 0 or 1"):
        read_predictions_csv(text.replace(",val,1,", ",val,2,", 1).encode())
    with pytest.raises(ValueError, match="line 3"):
        read_predictions_csv(text.replace("0.61", "high").encode())


def _strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_write_evaluation(evaluated, tmp_path):
    paths = ev.write_evaluation(evaluated, tmp_path / "eval")
    assert paths[0] == tmp_path / "eval" / "metrics.json"
    assert _strict_json(paths[0]) == json.loads(json.dumps(evaluated))
    pngs = [p for p in paths if p.suffix == ".png"]
    assert sorted(p.name for p in pngs) == sorted(plots.FILENAMES.values())
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_xcom_payload(evaluated):
    payload = ev.xcom_payload(evaluated, "s3://bucket/runs/1/metrics.json")
    assert payload == {
        "threshold": evaluated["threshold"]["value"],
        "strategy": "youden",
        "target_sensitivity": None,
        "chosen_on": "val",
        "pooling": "none",
        "views": 1,
        "val": {
            "sensitivity": evaluated["threshold"]["val"]["sensitivity"],
            "specificity": evaluated["threshold"]["val"]["specificity"],
        },
        "test": {
            "auroc": evaluated["test"]["auroc"]["value"],
            "auprc": evaluated["test"]["auprc"]["value"],
            "sensitivity": evaluated["test"]["at_threshold"]["sensitivity"],
            "specificity": evaluated["test"]["at_threshold"]["specificity"],
        },
        "metrics_uri": "s3://bucket/runs/1/metrics.json",
    }
    assert len(json.dumps(payload, allow_nan=False)) < 600


def _tiny_rows():
    rows = []
    for split, scores in (("val", (0.2, 0.4, 0.6, 0.9)), ("test", (0.3, 0.5, 0.45, 0.95))):
        for i, (label, score) in enumerate(zip((0, 0, 1, 1), scores)):
            rows.append(
                {
                    "image_id": f"{split}{i}",
                    "lesion_id": f"{split}L{i // 2}",
                    "split": split,
                    "label": label,
                    "dx": None,
                    "probability": score,
                    "age": None,
                    "sex": None,
                    "localization": None,
                    "source": None,
                }
            )
    return rows


def test_plots_on_tiny_input(tmp_path):
    rows = _tiny_rows()
    result = ev.evaluate_predictions(rows, n_boot=10)
    from_metrics = ev.write_evaluation(result, tmp_path / "a")
    from_rows = ev.write_evaluation(result, tmp_path / "b", rows=rows)
    assert [p.name for p in from_metrics] == [p.name for p in from_rows]
    assert len(from_metrics) == 1 + len(plots.FILENAMES)
    # Without curve data only the confusion matrices can be drawn.
    stripped = dict(result, test={k: v for k, v in result["test"].items() if k != "curves"})
    names = [p.name for p in plots.plot_all(stripped, None, tmp_path / "c")]
    assert names == [plots.FILENAMES["confusion_0.5"], plots.FILENAMES["confusion_threshold"]]
    # On tiny sets a percentile interval can exclude its point estimate; error bars must cope.
    skewed = dict(
        result, test=dict(result["test"], sensitivity={"value": 0.5, "ci_low": 0.6, "ci_high": 0.9})
    )
    assert plots.plot_roc(skewed, result["test"]["curves"], tmp_path / "roc.png").stat().st_size > 0


def test_lesion_pooling_scores_every_image_by_its_lesion(dataset):
    pooled_doc = ev.evaluate_predictions(dataset, n_boot=100, pooling="lesion")
    plain_doc = ev.evaluate_predictions(dataset, n_boot=100)

    def pooled_arrays(split):
        rows = [r for r in dataset if r["split"] == split]
        labels, scores = arrays(rows)
        return labels, m.lesion_pooled_scores(scores, [r["lesion_id"] for r in rows]), scores

    val_labels, val_pooled, _ = pooled_arrays("val")
    test_labels, test_pooled, test_raw = pooled_arrays("test")
    assert pooled_doc["threshold"]["value"] == m.choose_threshold(val_labels, val_pooled, "youden")
    assert pooled_doc["test"]["auroc"]["value"] == pytest.approx(roc_auc_score(test_labels, test_pooled))
    assert pooled_doc["test"]["at_threshold"] == m.binary_metrics(
        test_labels, test_pooled, pooled_doc["threshold"]["value"]
    )
    # Still one row per image; the unpooled numbers are kept beside the pooled ones.
    assert pooled_doc["test"]["n_images"] == plain_doc["test"]["n_images"] == test_labels.size
    assert pooled_doc["scores"]["pooling"] == "lesion"
    per_image = pooled_doc["scores"]["per_image"]
    assert per_image["test"]["auroc"]["value"] == pytest.approx(roc_auc_score(test_labels, test_raw))
    assert per_image["test"]["auroc"]["value"] == plain_doc["test"]["auroc"]["value"]
    assert (
        per_image["test"]["auroc"]["ci_low"]
        < per_image["test"]["auroc"]["value"]
        < per_image["test"]["auroc"]["ci_high"]
    )
    assert per_image["val"]["auprc"] == plain_doc["threshold"]["val"]["auprc"]
    assert pooled_doc["test"]["auroc"]["value"] != plain_doc["test"]["auroc"]["value"]
    assert plain_doc["scores"] == {"pooling": "none", "rule": ev.POOLING_RULES["none"], "views": 1}
    assert ev.xcom_payload(pooled_doc, "x")["pooling"] == "lesion"


def test_lesion_pooling_stays_within_each_set():
    val = make_rows("val", 60, seed=4)
    test = make_rows("test", 60, seed=5)
    # The external set reuses val's lesion ids: its images must not be pooled with val's.
    external = [
        {
            **r,
            "image_id": "x" + r["image_id"],
            "split": "external",
            "source": "clinic",
            "probability": 1 - r["probability"],
        }
        for r in val
    ]
    doc = ev.evaluate_predictions(val + test + external, n_boot=100, pooling="lesion")
    labels, scores = arrays(external)
    pooled = m.lesion_pooled_scores(scores, [r["lesion_id"] for r in external])
    assert doc["external"]["clinic"]["auroc"]["value"] == pytest.approx(roc_auc_score(labels, pooled))


def test_unknown_pooling_is_refused(dataset):
    with pytest.raises(ValueError, match="pooling must be one of"):
        ev.evaluate_predictions(dataset, pooling="max")
