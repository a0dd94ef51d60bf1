"""How well Grad-CAM maps sit on the lesion, which images to show, and the pipeline's Grad-CAM step.

A map that "looks right" is not evidence, so every test image with a segmentation mask is
also scored: the share of the map's energy inside the lesion (compare it with the lesion's
share of the image, which is what a uniform map would get) and the pointing game (does the
hottest pixel fall inside the lesion). Images without a mask are counted, never scored.

Outcomes use the rule of the evaluation step: an image is called melanoma when
``probability >= threshold``. The maps themselves come from :mod:`training.gradcam`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics
import time
from typing import Iterable

import cv2
import numpy as np

from melanoma.csvout import csv_bytes
from melanoma.progress import Progress
from training.ensemble import gradcam_layer_names
from training.gradcam import gradcam_heatmaps, layer_list, overlay_heatmap, upsample_heatmap

__all__ = [
    "CLASS_NAMES",
    "FOCUS_COLUMNS",
    "OUTCOMES",
    "focus_csv",
    "focus_rows",
    "group_stats",
    "lesion_focus",
    "lesion_focus_check",
    "outcome",
    "png_bytes",
    "run_gradcam",
    "safe_name",
    "select_gallery",
    "summarise_focus",
]

log = logging.getLogger(__name__)

OUTCOMES = ("TP", "FP", "FN", "TN")
CLASS_NAMES = {1: "melanoma", 0: "other"}


def lesion_focus(heatmap: np.ndarray, mask: np.ndarray) -> dict:
    """How much of a heatmap (H,W) falls on the lesion mask (H,W) (bool, or uint8 with >0 = lesion).

    Returns ``energy_inside``: share of the heatmap's sum inside the lesion (None for an all-zero
    map, which points nowhere); ``pointing_hit``: whether the hottest pixel (first in row-major
    order on ties) is inside the lesion (None for an all-zero map); ``lesion_area_share``: the
    lesion's share of the image, i.e. the ``energy_inside`` a uniform map would get.
    """
    heatmap = np.asarray(heatmap, np.float64)
    lesion = np.asarray(mask) > 0
    if heatmap.shape != lesion.shape:
        raise ValueError(f"heatmap {heatmap.shape} and mask {lesion.shape} differ in size")
    if not lesion.any():
        raise ValueError("empty lesion mask: there is nothing to score the heatmap against")
    total = float(heatmap.sum())
    area_share = float(lesion.mean())
    if total <= 0.0:
        return {"energy_inside": None, "pointing_hit": None, "lesion_area_share": area_share}
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return {
        "energy_inside": float(heatmap[lesion].sum()) / total,
        "pointing_hit": bool(lesion[peak]),
        "lesion_area_share": area_share,
    }


def outcome(label: int, probability: float, threshold: float) -> str:
    """TP/FP/FN/TN of one image; melanoma is predicted when ``probability >= threshold``."""
    predicted = probability >= threshold
    if int(label) == 1:
        return "TP" if predicted else "FN"
    return "FP" if predicted else "TN"


def group_stats(rows: list[dict]) -> dict:
    """Counts and focus statistics of one group of per-image rows (see :func:`summarise_focus`)."""
    scored = [r for r in rows if r.get("energy_inside") is not None]
    energies = [float(r["energy_inside"]) for r in scored]
    return {
        "n": len(rows),
        "n_without_mask": sum(1 for r in rows if not r.get("has_mask")),
        "n_scored": len(scored),
        "energy_inside_mean": statistics.fmean(energies) if energies else None,
        "energy_inside_median": statistics.median(energies) if energies else None,
        "lesion_area_share_mean": statistics.fmean(float(r["lesion_area_share"]) for r in scored)
        if scored
        else None,
        "pointing_hit_rate": statistics.fmean(1.0 if r["pointing_hit"] else 0.0 for r in scored)
        if scored
        else None,
    }


def summarise_focus(rows: Iterable[dict]) -> dict:
    """Lesion-focus statistics overall, per class and per outcome.

    rows: one dict per image with ``label`` (1 = melanoma), ``outcome`` (TP/FP/FN/TN),
    ``has_mask``, and from :func:`lesion_focus` ``energy_inside``, ``pointing_hit``,
    ``lesion_area_share`` (None when the image has no mask or an all-zero map).
    Each group reports ``n`` images, ``n_without_mask``, ``n_scored`` (mask and non-empty map),
    mean/median energy share, mean lesion area share and the pointing-game hit rate
    (None where nothing was scored).
    """
    rows = list(rows)
    return {
        "n_images": len(rows),
        "n_without_mask": sum(1 for r in rows if not r.get("has_mask")),
        "n_empty_heatmap": sum(1 for r in rows if r.get("has_mask") and r.get("energy_inside") is None),
        "overall": group_stats(rows),
        "by_class": {
            name: group_stats([r for r in rows if int(r["label"]) == label])
            for label, name in CLASS_NAMES.items()
        },
        "by_outcome": {name: group_stats([r for r in rows if r["outcome"] == name]) for name in OUTCOMES},
    }


def lesion_focus_check(focus: dict) -> dict:
    """Do the maps of the melanomas sit on their lesions more than a uniform map would?

    ``focus``: the output of :func:`summarise_focus`. A model whose melanoma maps put no more
    of their energy on the lesion than the lesion's share of the image is looking elsewhere
    (borders, framing, rulers) for its evidence. ``on_lesion`` is None when no melanoma image
    with a mask was scored.
    """
    melanoma = focus["by_class"]["melanoma"]
    energy, area = melanoma["energy_inside_mean"], melanoma["lesion_area_share_mean"]
    return {
        "group": "class: melanoma",
        "n_scored": melanoma["n_scored"],
        "energy_inside_mean": energy,
        "lesion_area_share_mean": area,
        "on_lesion": None if energy is None or area is None else bool(energy > area),
    }


def select_gallery(rows: Iterable[dict], threshold: float, per_group: int = 3) -> list[dict]:
    """Images worth looking at: per outcome, the ``per_group`` most confident and ``per_group`` borderline.

    rows: dicts with at least ``image_id``, ``label`` and ``probability``.
    Most confident means farthest from the threshold on the predicted side (highest
    probability for TP/FP, lowest for FN/TN); borderline means closest to the threshold.
    Returns copies of the rows with ``outcome`` and ``selection`` ("most confident" or
    "borderline") added, in the order TP, FP, FN, TN; an image is listed once.
    """
    by_outcome: dict[str, list[dict]] = {name: [] for name in OUTCOMES}
    for row in rows:
        by_outcome[outcome(row["label"], float(row["probability"]), threshold)].append(row)
    gallery, seen = [], set()
    for name, group in by_outcome.items():
        # image_id breaks ties so the selection is the same on every run.
        confident = sorted(
            group, key=lambda r: (-abs(float(r["probability"]) - threshold), str(r["image_id"]))
        )
        borderline = sorted(
            group, key=lambda r: (abs(float(r["probability"]) - threshold), str(r["image_id"]))
        )
        for selection, ranked in (("most confident", confident), ("borderline", borderline)):
            taken = 0
            for row in ranked:
                if taken == per_group:
                    break
                if row["image_id"] in seen:
                    continue
                seen.add(row["image_id"])
                gallery.append(dict(row, outcome=name, selection=selection))
                taken += 1
    return gallery


# --------------------------------------------------------------------------- pipeline step

FOCUS_COLUMNS = (
    "image_id", "lesion_id", "dx", "label", "probability", "outcome",
    "has_mask", "energy_inside", "pointing_hit", "lesion_area_share",
)  # fmt: skip


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB image uint8 (H,W,3) as PNG bytes."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def safe_name(image_id: str) -> str:
    """A storage-key-safe file stem for an image id (ids are data, not trusted paths).

    Ids that had to be changed get a short hash of the original, so two ids never share a file.
    """
    text = str(image_id)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")
    if safe == text:
        return safe
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def focus_csv(rows: list[dict]) -> bytes:
    return csv_bytes(rows, FOCUS_COLUMNS)


def focus_rows(shard, heatmaps: np.ndarray, predictions: dict[str, float], threshold: float) -> list[dict]:
    """One row per image of ``shard`` (FOCUS_COLUMNS): its score, outcome and lesion focus.

    heatmaps: (N,h,w) maps of the shard's images, in its order; predictions: image_id -> score.
    """
    size = shard.images.shape[1:3]
    rows = []
    for record, heatmap, mask in zip(shard.records, heatmaps, shard.masks):
        probability = float(predictions[record["image_id"]])
        row = {key: record.get(key) for key in ("image_id", "lesion_id", "dx", "label")}
        row.update(probability=probability, outcome=outcome(record["label"], probability, threshold))
        # A record without a mask carries an all-zero one: it is counted, never scored.
        row["has_mask"] = bool(record.get("has_mask")) and bool(mask.any())
        focus = lesion_focus(upsample_heatmap(heatmap, size), mask) if row["has_mask"] else {}
        row.update({key: focus.get(key) for key in ("energy_inside", "pointing_hit", "lesion_area_share")})
        rows.append(row)
    return rows


def _write_gallery(
    shard, heatmaps: np.ndarray, gallery: list[dict], out_storage, out_prefix: str
) -> list[str]:
    """``overlays/<image_id>.png`` (original | overlay) per gallery image; each entry gains its ``overlay_key``."""
    size = shard.images.shape[1:3]
    index = {record["image_id"]: i for i, record in enumerate(shard.records)}
    overlay_keys = []
    for entry in gallery:
        i = index[entry["image_id"]]
        image = shard.images[i]
        overlay = overlay_heatmap(image, upsample_heatmap(heatmaps[i], size))
        key = f"{out_prefix}/overlays/{safe_name(entry['image_id'])}.png"
        out_storage.write_bytes(key, png_bytes(np.concatenate([image, overlay], axis=1)))
        entry["overlay_key"] = key
        overlay_keys.append(key)
    return overlay_keys


def run_gradcam(
    model,
    shard,
    predictions: dict[str, float],
    threshold_payload: dict,
    out_storage,
    out_prefix: str,
    *,
    layer_name: str | None = None,
    plusplus: bool = False,
    combine_layers: str = "each",
) -> dict:
    """Heatmaps and lesion focus for every image of ``shard`` (the test split); writes the artefacts.

    predictions: image_id -> melanoma score from the evaluation step, lesion-pooled when it
    pooled (every image of the shard must have one; the outcomes must match the ones
    evaluation reported).
    threshold_payload: the evaluation XCom, of which ``threshold``, ``strategy``,
    ``chosen_on`` and ``pooling`` are used.
    Writes under ``out_prefix``: ``lesion_focus.csv`` (one row per image),
    ``gradcam_summary.json`` (threshold used, method, speed, focus summary, gallery) and
    ``overlays/<image_id>.png`` (original | overlay) for the gallery images.
    Returns a small JSON-able dict for XCom.
    """
    if layer_name is None:
        layer_name = gradcam_layer_names(model)
    threshold = float(threshold_payload["threshold"])
    missing = [r["image_id"] for r in shard.records if r["image_id"] not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} images have no prediction, e.g. {missing[:3]}")

    started = time.perf_counter()
    progress = Progress(len(shard.images), "gradcam heatmaps", log.info)
    heatmaps = gradcam_heatmaps(
        model, shard.images, layer_name, plusplus=plusplus, combine_layers=combine_layers, progress=progress
    )
    elapsed = time.perf_counter() - started
    rows = focus_rows(shard, heatmaps, predictions, threshold)
    gallery = select_gallery(rows, threshold)
    overlay_keys = _write_gallery(shard, heatmaps, gallery, out_storage, out_prefix)

    focus_key, summary_key = f"{out_prefix}/lesion_focus.csv", f"{out_prefix}/gradcam_summary.json"
    focus = summarise_focus(rows)
    speed = len(rows) / elapsed if elapsed > 0 and rows else None
    layers = layer_list(layer_name)
    summary = {
        "method": "gradcam++" if plusplus else "gradcam",
        "layer_name": " + ".join(layers),
        "combine_layers": combine_layers if len(layers) > 1 else None,
        "heatmap_shape": list(heatmaps.shape[1:]),
        "threshold": threshold,
        "strategy": threshold_payload.get("strategy"),
        "chosen_on": threshold_payload.get("chosen_on"),
        "positive_rule": "probability >= threshold",
        "pooling": threshold_payload.get("pooling", "none"),
        "n_images": len(rows),
        "heatmaps_per_s": speed,
        "focus": focus,
        "lesion_focus_check": lesion_focus_check(focus),
        "gallery": gallery,
    }
    out_storage.write_bytes(focus_key, focus_csv(rows))
    out_storage.write_bytes(summary_key, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return {
        "threshold": threshold,
        "strategy": summary["strategy"],
        "method": summary["method"],
        "n_images": len(rows),
        "n_without_mask": focus["n_without_mask"],
        "energy_inside_mean": focus["overall"]["energy_inside_mean"],
        "pointing_hit_rate": focus["overall"]["pointing_hit_rate"],
        "melanoma_maps_on_lesion": summary["lesion_focus_check"]["on_lesion"],
        "heatmaps_per_s": speed,
        "keys": {"lesion_focus": focus_key, "summary": summary_key, "overlays": overlay_keys},
    }
