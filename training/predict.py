"""Scoring: a trained model applied to processed splits or to a folder of new images.

New images go through :func:`melanoma.imaging.preprocess_image_bytes`, the very function
the Spark job uses, so a picture scored here is the same array the model was trained on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath

import cv2
import numpy as np

from melanoma.colour_constancy import COLOUR_CONSTANCY, colour_constancy_of
from melanoma.csvout import csv_bytes
from melanoma.image_decode import decode_rgb
from melanoma.image_header import RejectedImage

# The Spark job's preprocessing, imported (not copied): see predict_folder.
from melanoma.imaging import preprocess_image_bytes
from melanoma.progress import Progress
from melanoma.storage import Storage, open_storage, split_uri
from training.ensemble import gradcam_layer_names
from training.evaluation_rows import COLUMNS
from training.gradcam import gradcam_heatmaps, overlay_heatmap, upsample_heatmap
from training.lesion_focus import safe_name
from training.metrics import lesion_pooled_scores
from training.model_io import load_model
from training.shift import load_site, score_shift
from training.tta import mean_over_views, views_of

log = logging.getLogger(__name__)

# The prediction rows are what evaluate reads back: one definition of their columns.
PREDICTION_COLUMNS = COLUMNS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


#: Batches per ``model.predict`` call: the progress step. A multiple of the batch size, so the
#: batches (and so the scores) are the same as in one call over all the images.
PREDICT_BATCHES_PER_STEP = 16


def predict_probabilities(
    model,
    images: np.ndarray,
    batch_size: int = 64,
    *,
    what: str = "scoring",
    bar: bool = False,
    views: int = 1,
) -> np.ndarray:
    """images uint8 (N,224,224,3) -> melanoma probabilities float (N,); progress is logged as ``what``.

    ``views``: 1, or 8 for the mean over the dihedral views (:mod:`training.tta`); a run's
    evaluation records which (:meth:`RunContext.views`).
    """
    if len(images) == 0:
        return np.zeros((0,), np.float64)
    step = batch_size * PREDICT_BATCHES_PER_STEP
    progress = Progress(len(images) * views, what, log.info, bar=bar)

    def score(batch: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(batch), step):
            parts.append(
                model.predict(batch[start : start + step], batch_size=batch_size, verbose=0).reshape(-1)
            )
            progress.advance(len(parts[-1]))
        return np.concatenate(parts).astype(np.float64)

    probabilities = mean_over_views(score, images, views)
    progress.close()
    return probabilities


def prediction_rows(
    records: list[dict], probabilities: np.ndarray, split: str | None = None, source: str | None = None
) -> list[dict]:
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
    return csv_bytes(rows, columns)  # formula-neutralised cells: metadata text is untrusted


def images_in_folder(folder_uri: str) -> list[tuple[str, str]]:
    """(image_id, key) of every image under a folder, in any subfolder: bare images or a
    drop in either layout (metadata files and lesion masks are not images to score).

    The image id is the file name without its suffix; where two files share it (``a/x.jpg``
    and ``b/x.jpg``) each gets its key without the suffix instead, so ids stay unique.
    """
    storage = open_storage(folder_uri)
    keys = [
        k for k in storage.list_keys("") if k.lower().endswith(IMAGE_SUFFIXES) and "_segmentation." not in k
    ]
    stems = [os.path.splitext(posixpath.basename(key))[0] for key in keys]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    return sorted(
        (os.path.splitext(key)[0] if stem in shared else stem, key) for stem, key in zip(stems, keys)
    )


# decode_rgb's target size bounds how far a large JPEG is shrunk while decoding; one larger
# than any image keeps every image at its own size (MAX_PIXELS still limits what is decoded).
_ORIGINAL_SIZE = 1 << 30


def read_lesion_map(source: str) -> dict[str, str]:
    """image_id -> lesion_id from a CSV (path or URI) with those two columns, e.g. a drop's
    ``HAM10000_metadata.csv``. Empty or conflicting entries raise ``ValueError``."""
    storage, name = split_uri(source)
    reader = csv.DictReader(io.StringIO(storage.read_bytes(name).decode("utf-8-sig"), newline=""))
    if not {"image_id", "lesion_id"} <= set(reader.fieldnames or ()):
        raise ValueError(
            f"{source}: a lesion map needs the columns image_id and lesion_id, found {reader.fieldnames}"
        )
    lesion_of: dict[str, str] = {}
    for row in reader:
        image_id, lesion_id = (row["image_id"] or "").strip(), (row["lesion_id"] or "").strip()
        if not image_id or not lesion_id:
            raise ValueError(f"{source} line {reader.line_num}: empty image_id or lesion_id")
        if lesion_of.setdefault(image_id, lesion_id) != lesion_id:
            raise ValueError(
                f"{source}: image {image_id} is given two lesions, {lesion_of[image_id]} and {lesion_id}"
            )
    return lesion_of


MODEL_KEY = "model/model.keras"


class RunContext:
    """What a model's run folder knows beyond the weights: the validated threshold, validation's
    scores (the reference for a score shift), per-site thresholds and the preprocessing.

    Found when the model is a run's ``model/model.keras``; a bare model file has none of it.
    """

    def __init__(self, model_uri: str):
        text = str(model_uri).rstrip("/")
        self.run = (
            open_storage(text[: -len(MODEL_KEY)].rstrip("/") or ".") if text.endswith(MODEL_KEY) else None
        )

    def _json(self, key: str) -> dict | None:
        if self.run is None or not self.run.exists(key):
            return None
        return json.loads(self.run.read_bytes(key))

    def threshold(self) -> dict | None:
        """``{"value", "strategy", "pooling", "source"}`` of the run's evaluation, if it was evaluated."""
        metrics = self._json("eval/metrics.json")
        if metrics is None:
            return None
        return {
            "value": float(metrics["threshold"]["value"]),
            "strategy": metrics["threshold"]["strategy"],
            "pooling": metrics["scores"]["pooling"],
            "source": "run (chosen on validation)",
        }

    def views(self) -> int:
        """The views each score averages (:mod:`training.tta`), as the run's evaluation scored validation.

        1 for a bare model file, a run not evaluated yet, or one evaluated before views were recorded.
        """
        return views_of(self._json("eval/metrics.json"))

    def site(self, name: str) -> dict:
        if self.run is None:
            raise ValueError(
                f"--site {name}: site thresholds live in a run folder; {MODEL_KEY} of a run is needed, not a bare model file"
            )
        return load_site(self.run, name)

    def validation_scores(self) -> np.ndarray | None:
        """Validation's per-image probabilities, from the run's ``eval/predictions.csv``."""
        if self.run is None or not self.run.exists("eval/predictions.csv"):
            return None
        rows = csv.DictReader(io.StringIO(self.run.read_bytes("eval/predictions.csv").decode()))
        return np.array([float(r["probability"]) for r in rows if r["split"] == "val"])

    def colour_constancy(self) -> str:
        """The colour constancy the model's training data had; the default, with a warning, when unrecorded."""
        provenance = self._json("model/provenance.json") or {}
        if provenance.get("preprocessing"):
            return colour_constancy_of(provenance["preprocessing"])
        log.warning(
            "no recorded preprocessing for this model: assuming the current default colour constancy (%s)",
            COLOUR_CONSTANCY[0],
        )
        return COLOUR_CONSTANCY[0]


def resolve_threshold(context: RunContext, threshold: float | None, site: str | None) -> dict:
    """The operating point to score with: given, the site's, or the run's own; never a silent default."""
    if threshold is not None:
        if site is not None:
            raise ValueError("give --threshold or --site, not both")
        return {"value": float(threshold), "source": "given"}
    if site is not None:
        record = context.site(site)
        return {
            "value": float(record["threshold"]),
            "source": f"site {site} (calibrated on {record['n_images']} labelled images)",
        }
    chosen = context.threshold()
    if chosen is None:
        raise ValueError(
            "this model has no validated threshold (a bare model file, or a run not evaluated yet): "
            "pass --threshold, or score with a run's model/model.keras after its evaluate step"
        )
    return chosen


def predict_folder(
    model_uri: str,
    folder_uri: str,
    out_uri: str,
    *,
    threshold: float | None = None,
    overlays: bool = False,
    layer_name: str | None = None,
    lesion_of: dict[str, str] | None = None,
    site: str | None = None,
    bar: bool = False,
    model_name: str | None = None,
) -> dict:
    """Score every image under ``folder_uri``; write ``predictions.csv`` (and overlays) under ``out_uri``.

    Each image goes through :func:`melanoma.imaging.preprocess_image_bytes`, the Spark job's
    own preprocessing. ``predictions.csv``: image_id, key (the file under the folder),
    probability, label (1 when ``probability >= threshold``), threshold, model (``model_name``, e.g. the
    registry's ``models:/melanoma-classifier/3``, else ``model_uri``). With ``lesion_of``
    (image_id -> lesion_id, every scored image must be in it) the scores are pooled per
    lesion as the pipeline's evaluate step pools them (:func:`training.metrics.lesion_pooled_scores`),
    so a threshold from a lesion-pooled run applies; the file then also has lesion_id and
    image_probability (the image's own score), and ``probability`` is the pooled one. Unreadable files are
    listed in ``rejected.csv`` with their reason, never skipped silently. With ``overlays``,
    ``overlays/<image_id>.png`` is the Grad-CAM heatmap of the melanoma score blended over the
    image at its original size (display orientation).

    The threshold is ``threshold`` when given, else the one calibrated for ``site``, else the
    run's own (chosen on validation); a bare model file with neither is refused. When the run's
    validation scores are known, the scores are tested for a shift against them
    (:func:`training.shift.score_shift`): a shift is logged as a warning and written to
    ``shift.json``, and the result carries it. ``bar``: progress bars in place of the
    progress log lines on an interactive terminal (the CLI), when ``rich`` is installed.
    """
    context = RunContext(model_uri)
    operating_point = resolve_threshold(context, threshold, site)
    threshold = operating_point["value"]
    model = load_model(model_uri)
    source, out = open_storage(folder_uri), open_storage(out_uri)
    batch, scored, rejected = _read_folder(
        source, images_in_folder(folder_uri), context.colour_constancy(), bar
    )
    if lesion_of is not None:
        _check_lesion_map(scored, lesion_of)  # before scoring: a missing lesion fails fast
    probabilities = predict_probabilities(
        model, batch, what="predict: scoring", bar=bar, views=context.views()
    )
    model_name = model_name or str(model_uri)
    rows, columns = _prediction_table(scored, probabilities, threshold, lesion_of, model_name)
    shift = _check_shift(context, probabilities, threshold, out)
    out.write_bytes("predictions.csv", rows_to_csv(rows, columns))
    out.write_bytes("rejected.csv", rows_to_csv(rejected, ("image_id", "key", "reason", "detail")))
    written = ["predictions.csv", "rejected.csv"] + (["shift.json"] if shift else [])
    if overlays and scored:
        heatmaps = gradcam_heatmaps(
            model,
            batch,
            layer_name or gradcam_layer_names(model),
            progress=Progress(len(batch), "predict: heatmaps", log.info, bar=bar),
        )
        del batch
        written += _write_overlays(source, out, scored, heatmaps)
    return {
        "scored": len(rows),
        "rejected": len(rejected),
        "predictions_uri": out.uri("predictions.csv"),
        "written": written,
        "threshold": threshold,
        "threshold_source": operating_point["source"],
        "model": model_name,
        "score_shift": shift,
    }


def _check_lesion_map(scored: list[tuple[str, str]], lesion_of: dict[str, str]) -> None:
    """Refuse scored images that the lesion map does not know."""
    unmapped = [image_id for image_id, _key in scored if image_id not in lesion_of]
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} scored image(s) have no lesion in the lesion map, e.g. {', '.join(unmapped[:5])}"
        )


def _prediction_table(
    scored: list[tuple[str, str]],
    probabilities: np.ndarray,
    threshold: float,
    lesion_of: dict[str, str] | None,
    model: str,
) -> tuple[list[dict], tuple[str, ...]]:
    """(rows, columns) of ``predictions.csv``; with ``lesion_of``, scores pooled per lesion.

    Every row names the model and the threshold that scored it: a file of predictions stays
    traceable to its model once it is copied elsewhere.
    """
    columns: tuple[str, ...] = ("image_id", "key", "probability", "label", "threshold")
    rows = [
        {"image_id": image_id, "key": key, "probability": float(p)}
        for (image_id, key), p in zip(scored, probabilities)
    ]
    if lesion_of is not None:
        lesions = [lesion_of[row["image_id"]] for row in rows]
        for row, lesion_id, pooled in zip(rows, lesions, lesion_pooled_scores(probabilities, lesions)):
            row.update(lesion_id=lesion_id, image_probability=row["probability"], probability=float(pooled))
        columns = ("image_id", "key", "lesion_id", "image_probability", "probability", "label", "threshold")
    for row in rows:
        row.update(label=int(row["probability"] >= threshold), threshold=threshold, model=model)
    return rows, (*columns, "model")


def _read_folder(
    source: Storage, listed: list[tuple[str, str]], colour: str, bar: bool
) -> tuple[np.ndarray, list[tuple[str, str]], list[dict]]:
    """(images (N,224,224,3), their (image_id, key), rejected inputs with reasons) of the listed files."""
    images, scored, rejected = [], [], []
    progress = Progress(len(listed), "predict: reading and preprocessing", log.info, bar=bar)
    for image_id, key in listed:
        try:
            array, _notes = preprocess_image_bytes(source.read_bytes(key), colour_constancy=colour)
        except RejectedImage as error:
            rejected.append(
                {"image_id": image_id, "key": key, "reason": error.reason, "detail": error.message}
            )
            continue
        finally:
            progress.advance()
        images.append(array)
        scored.append((image_id, key))
    progress.close()
    batch = np.stack(images) if images else np.zeros((0, 224, 224, 3), np.uint8)
    return batch, scored, rejected


def _write_overlays(
    source: Storage, out: Storage, scored: list[tuple[str, str]], heatmaps: np.ndarray
) -> list[str]:
    """``overlays/<image_id>.png``: each heatmap over its image at the original size; returns the keys."""
    written = []
    # One image at a time at full size: the originals are never all held in memory.
    for (image_id, key), heatmap in zip(scored, heatmaps):
        original, _notes = decode_rgb(source.read_bytes(key), target_size=_ORIGINAL_SIZE)
        overlay = overlay_heatmap(original, upsample_heatmap(heatmap, original.shape[:2]))
        ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {key}")
        overlay_key = f"overlays/{safe_name(image_id)}.png"
        out.write_bytes(overlay_key, png.tobytes())
        written.append(overlay_key)
    return written


def _check_shift(context: RunContext, probabilities: np.ndarray, threshold: float, out) -> dict | None:
    """Per-image scores against validation's per-image scores; a shift is logged loudly and kept."""
    reference = context.validation_scores()
    if reference is None or len(probabilities) == 0:
        return None
    shift = score_shift(reference, probabilities, threshold)
    if shift["shifted"]:
        log.warning("%s", shift["message"])
    else:
        log.info("%s", shift["message"])
    out.write_bytes("shift.json", json.dumps(shift, indent=2, allow_nan=False).encode())
    return shift
