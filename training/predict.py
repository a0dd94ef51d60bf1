"""Scoring: a trained model applied to processed splits or to a folder of new images.

New images go through :func:`melanoma.imaging.preprocess_image_bytes`, the very function
the Spark job uses, so a picture scored here is the same array the model was trained on.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile

import numpy as np

from melanoma.storage import open_storage, split_uri

PREDICTION_COLUMNS = ("image_id", "lesion_id", "split", "label", "dx", "probability", "age", "sex", "localization", "source")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_model(model_uri: str):
    """Load a ``.keras`` model from a path or an object-store URI."""
    import keras

    import training.model  # noqa: F401  (registers the custom layers before deserialising)

    storage, name = split_uri(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as handle:
            handle.write(storage.read_bytes(name))
        return keras.models.load_model(path)


def predict_probabilities(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """images uint8 (N,224,224,3) -> melanoma probabilities float (N,)."""
    if len(images) == 0:
        return np.zeros((0,), np.float64)
    return model.predict(images, batch_size=batch_size, verbose=0).reshape(-1).astype(np.float64)


def prediction_rows(records: list[dict], probabilities: np.ndarray, split: str | None = None, source: str | None = None) -> list[dict]:
    """One CSV row per record (the columns of :data:`PREDICTION_COLUMNS`)."""
    return [
        {
            "image_id": r["image_id"],
            "lesion_id": r.get("lesion_id") or r["image_id"],
            "split": split or r.get("split"),
            "label": r.get("label"),
            "dx": r.get("dx"),
            "probability": float(p),
            "age": r.get("age"),
            "sex": r.get("sex"),
            "localization": r.get("localization"),
            "source": source or r.get("source_drop"),
        }
        for r, p in zip(records, probabilities)
    ]


def rows_to_csv(rows: list[dict], columns=PREDICTION_COLUMNS) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue().encode()


def images_in_folder(folder_uri: str) -> list[tuple[str, str]]:
    """(image_id, key) of every image under a folder, in any subfolder: bare images or a
    drop in either layout (metadata files and lesion masks are not images to score)."""
    storage = open_storage(folder_uri)
    keys = [k for k in storage.list_keys("") if k.lower().endswith(IMAGE_SUFFIXES) and "_segmentation." not in k]
    found = []
    for key in keys:
        image_id = os.path.splitext(os.path.basename(key))[0]
        found.append((image_id, key))
    return sorted(found)


def predict_folder(model_uri: str, folder_uri: str, out_uri: str, *, threshold: float = 0.5, overlays: bool = False, layer_name: str | None = None) -> dict:
    """Score every image under ``folder_uri``; write ``predictions.csv`` (and overlays) under ``out_uri``.

    Unreadable files are listed in ``rejected.csv`` with their reason, never skipped silently.
    """
    from melanoma.imaging import RejectedImage, decode_rgb, preprocess_image_bytes

    model = load_model(model_uri)
    source, out = open_storage(folder_uri), open_storage(out_uri)
    images, ids, originals, rejected = [], [], [], []
    for image_id, key in images_in_folder(folder_uri):
        try:
            data = source.read_bytes(key)
            array, _notes = preprocess_image_bytes(data)
        except RejectedImage as error:
            rejected.append({"image_id": image_id, "key": key, "reason": error.reason, "detail": str(error)})
            continue
        images.append(array)
        ids.append(image_id)
        if overlays:
            originals.append(decode_rgb(data)[0])
    batch = np.stack(images) if images else np.zeros((0, 224, 224, 3), np.uint8)
    probabilities = predict_probabilities(model, batch)
    rows = [
        {"image_id": i, "probability": float(p), "label": int(p >= threshold), "threshold": threshold}
        for i, p in zip(ids, probabilities)
    ]
    out.write_bytes("predictions.csv", rows_to_csv(rows, ("image_id", "probability", "label", "threshold")))
    out.write_bytes("rejected.csv", rows_to_csv(rejected, ("image_id", "key", "reason", "detail")))
    written = ["predictions.csv", "rejected.csv"]
    if overlays and images:
        import cv2

        from training.gradcam import gradcam_heatmaps, overlay_heatmap, upsample_heatmap
        from training.model import last_conv_layer_name

        heatmaps = gradcam_heatmaps(model, batch, layer_name or last_conv_layer_name(model))
        for image_id, original, heatmap in zip(ids, originals, heatmaps):
            overlay = overlay_heatmap(original, upsample_heatmap(heatmap, original.shape[:2]))
            ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
            key = f"overlays/{image_id}.png"
            out.write_bytes(key, png.tobytes())
            written.append(key)
    return {"scored": len(rows), "rejected": len(rejected), "predictions_uri": out.uri("predictions.csv"), "written": written}
