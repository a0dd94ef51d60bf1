"""``python -m training predict``: real images in any folder layout, the Spark job's own
preprocessing, rejected files with reasons, and Grad-CAM overlays at the original size."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from melanoma import imaging, preprocess_chunk  # noqa: E402
from training import predict  # noqa: E402
from training.predict import images_in_folder, predict_folder  # noqa: E402

HAM_IDS = ("ISIC_0024306", "ISIC_0024307", "ISIC_0024308")


def tiny_model(path: Path) -> Path:
    """A small real Keras model over the 224x224 input (one named conv layer), saved as .keras."""
    keras.utils.set_random_seed(0)
    images = keras.Input((224, 224, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(images)
    x = keras.layers.Conv2D(4, 8, strides=8, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    keras.Model(images, outputs).save(path)
    return path


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def expected_probabilities(model_path: Path, files: list[Path]) -> np.ndarray:
    """The model applied to exactly what the Spark job would store for each file."""
    model = keras.models.load_model(model_path)
    batch = np.stack([imaging.preprocess_image_bytes(f.read_bytes())[0] for f in files])
    return model.predict(batch, verbose=0).reshape(-1)


def test_predict_uses_the_spark_jobs_preprocessing():
    # Not a copy that could drift: the very function the ingest (Spark executor) code calls.
    assert predict.preprocess_image_bytes is imaging.preprocess_image_bytes
    assert preprocess_chunk.preprocess_image_bytes is imaging.preprocess_image_bytes


def test_images_in_folder_finds_images_not_masks_or_metadata(tmp_path):
    for name in (
        "a/x.jpg",
        "b/x.JPG",
        "b/y.png",
        "c/deep/z.jpeg",
        "masks/x_segmentation.png",
        "meta.csv",
        "x.json",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    # Two files share the stem "x": each is then named by its path, so ids stay unique.
    assert images_in_folder(str(tmp_path)) == [
        ("a/x", "a/x.jpg"),
        ("b/x", "b/x.JPG"),
        ("y", "b/y.png"),
        ("z", "c/deep/z.jpeg"),
    ]


def test_predict_bare_images_in_subfolders(tmp_path, ham10000_dir):
    folder = tmp_path / "incoming"
    files = []
    for i, image_id in enumerate(HAM_IDS):
        target = folder / f"clinic{i % 2}" / f"{image_id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ham10000_dir / "images" / f"{image_id}.jpg", target)
        files.append(target)
    # A corrupt upload (cut short) and a text file with an image suffix.
    data = (ham10000_dir / "images" / f"{HAM_IDS[0]}.jpg").read_bytes()
    (folder / "clinic1" / "cut_short.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_bytes(b"this is not a picture")
    model_path = tiny_model(tmp_path / "model.keras")
    out = tmp_path / "out"

    result = predict_folder(
        str(model_path), str(folder), str(out), threshold=0.5, overlays=True, layer_name="conv"
    )

    assert (result["scored"], result["rejected"]) == (3, 2)
    rows = read_csv(out / "predictions.csv")
    assert [r["image_id"] for r in rows] == list(HAM_IDS)
    assert [r["key"] for r in rows] == [f.relative_to(folder).as_posix() for f in files]
    probabilities = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(probabilities, expected_probabilities(model_path, files), rtol=1e-5, atol=1e-7)
    assert [int(r["label"]) for r in rows] == [int(p >= 0.5) for p in probabilities]
    assert {float(r["threshold"]) for r in rows} == {0.5}

    rejected = {r["image_id"]: r for r in read_csv(out / "rejected.csv")}
    assert (
        rejected["cut_short"]["reason"] == "truncated"
        and rejected["cut_short"]["key"] == "clinic1/cut_short.jpg"
    )
    assert rejected["notes"]["reason"] == "not-an-image"
    assert rejected["cut_short"]["detail"]

    for image_id, source in zip(HAM_IDS, files):
        overlay = cv2.imread(str(out / "overlays" / f"{image_id}.png"))
        original = cv2.imread(str(source))
        assert overlay is not None and overlay.shape == original.shape == (150, 200, 3)
        assert not np.array_equal(overlay, original)  # the heatmap is blended in
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"{i}.png" for i in HAM_IDS]


def test_predict_isic_layout_folder_overlays_at_full_size(tmp_path, isic_sample_dir):
    folder = tmp_path / "isic"
    folder.mkdir()
    chosen = sorted(isic_sample_dir.glob("*.jpg"))[:2]
    for image in chosen:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".json"), folder / image.with_suffix(".json").name)
    model_path = tiny_model(tmp_path / "model.keras")
    out = tmp_path / "out"

    result = predict_folder(
        str(model_path), str(folder), str(out), threshold=0.5, overlays=True, layer_name="conv"
    )

    assert (result["scored"], result["rejected"]) == (2, 0)
    rows = read_csv(out / "predictions.csv")
    assert [r["image_id"] for r in rows] == [image.stem for image in chosen]
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows],
        expected_probabilities(model_path, chosen),
        rtol=1e-5,
        atol=1e-7,
    )
    assert read_csv(out / "rejected.csv") == []
    for image in chosen:
        original = cv2.imread(str(image))
        overlay = cv2.imread(str(out / "overlays" / f"{image.stem}.png"))
        # Full size, not the 1/2-1/8 reduction the 224 pipeline decodes large JPEGs at.
        assert overlay.shape == original.shape and min(original.shape[:2]) > 2 * 224


def test_predict_without_overlays_writes_no_overlays(tmp_path, ham10000_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ham10000_dir / "images" / f"{HAM_IDS[0]}.jpg", folder)
    out = tmp_path / "out"
    result = predict_folder(str(tiny_model(tmp_path / "m.keras")), str(folder), str(out), threshold=0.5)
    assert result["written"] == ["predictions.csv", "rejected.csv"] and not (out / "overlays").exists()


def test_predict_refuses_a_bare_model_without_a_threshold(tmp_path, ham10000_dir):
    # No silent 0.5: the validated thresholds of real runs lie far from it (0.004 to 0.44).
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ham10000_dir / "images" / f"{HAM_IDS[0]}.jpg", folder)
    with pytest.raises(ValueError, match="no validated threshold"):
        predict_folder(str(tiny_model(tmp_path / "m.keras")), str(folder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_cli_with_the_project_classifier(tmp_path, ham10000_dir, capsys):
    # The real classifier graph (random weights): the CLI finds its last conv layer itself.
    from training.cli import RESULT_PREFIX, main
    from training.model import build_classifier

    folder = tmp_path / "in"
    folder.mkdir()
    for image_id in HAM_IDS[:2]:
        shutil.copy(ham10000_dir / "images" / f"{image_id}.jpg", folder)
    keras.utils.set_random_seed(0)
    build_classifier("efficientnet_lite0", None).save(tmp_path / "model.keras")
    out = tmp_path / "out"

    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "model.keras"),
            "--input",
            str(folder),
            "--output",
            str(out),
            "--threshold",
            "0.41",
            "--overlays",
        ]
    )

    assert code == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(RESULT_PREFIX)][-1]
    result = json.loads(line[len(RESULT_PREFIX) :])
    assert result["scored"] == 2 and result["rejected"] == 0
    assert sorted(result["written"]) == sorted(
        ["predictions.csv", "rejected.csv"] + [f"overlays/{i}.png" for i in HAM_IDS[:2]]
    )
    rows = read_csv(out / "predictions.csv")
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows],
        expected_probabilities(tmp_path / "model.keras", sorted(folder.glob("*.jpg"))),
        rtol=1e-5,
        atol=1e-7,
    )
    for image_id in HAM_IDS[:2]:
        assert cv2.imread(str(out / "overlays" / f"{image_id}.png")).shape == (150, 200, 3)


def test_predict_pools_scores_per_lesion_with_a_lesion_map(tmp_path, ham10000_dir):
    from training.metrics import lesion_pooled_scores
    from training.predict import read_lesion_map

    folder = tmp_path / "in"
    folder.mkdir()
    files = []
    for image_id in HAM_IDS:
        shutil.copy(ham10000_dir / "images" / f"{image_id}.jpg", folder)
        files.append(folder / f"{image_id}.jpg")
    lesion_csv = tmp_path / "lesions.csv"
    # Two views of lesion A, one of B, and an entry for an image not in the folder (ignored).
    lesion_csv.write_text(
        f"lesion_id,image_id,dx\nA,{HAM_IDS[0]},nv\nB,{HAM_IDS[1]},mel\nA,{HAM_IDS[2]},nv\nC,ISIC_9,nv\n"
    )
    model_path = tiny_model(tmp_path / "model.keras")
    own = expected_probabilities(model_path, files)
    threshold = float(np.median(own))

    predict_folder(
        str(model_path),
        str(folder),
        str(tmp_path / "out"),
        threshold=threshold,
        lesion_of=read_lesion_map(str(lesion_csv)),
    )

    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert list(rows[0]) == [
        "image_id",
        "key",
        "lesion_id",
        "image_probability",
        "probability",
        "label",
        "threshold",
        "model",
    ]
    assert [r["lesion_id"] for r in rows] == ["A", "B", "A"]
    np.testing.assert_allclose([float(r["image_probability"]) for r in rows], own, rtol=1e-5, atol=1e-7)
    pooled = lesion_pooled_scores(own, ["A", "B", "A"])
    np.testing.assert_allclose([float(r["probability"]) for r in rows], pooled, rtol=1e-5, atol=1e-7)
    assert rows[0]["probability"] == rows[2]["probability"]
    assert [int(r["label"]) for r in rows] == [int(float(r["probability"]) >= threshold) for r in rows]

    # An image the map does not cover is an error, not a silent per-image score.
    lesion_csv.write_text(f"image_id,lesion_id\n{HAM_IDS[0]},A\n")
    with pytest.raises(ValueError, match=f"no lesion in the lesion map, e.g. {HAM_IDS[1]}"):
        predict_folder(
            str(model_path),
            str(folder),
            str(tmp_path / "out2"),
            threshold=threshold,
            lesion_of=read_lesion_map(str(lesion_csv)),
        )


@pytest.mark.parametrize(
    "text, message",
    [
        ("image_id,dx\nx,nv\n", "needs the columns"),
        ("image_id,lesion_id\nx,\n", "line 2: empty"),
        ("image_id,lesion_id\nx,A\nx,B\n", "two lesions"),
    ],
)
def test_read_lesion_map_refuses_bad_maps(tmp_path, text, message):
    from training.predict import read_lesion_map

    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_lesion_map(str(tmp_path / "m.csv"))
