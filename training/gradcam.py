"""Grad-CAM and Grad-CAM++ for the melanoma classifier, and how well the maps sit on the lesion.

Grad-CAM (Selvaraju et al., 2017) weights the feature maps of a convolutional layer by the
gradient of the class score and keeps the positive part; Grad-CAM++ (Chattopadhay et al.,
2018) replaces the plain gradient average by pixel-wise weights so that several separate
regions of evidence are not drowned by the largest one.

A map that "looks right" is not evidence, so every test image with a segmentation mask is
also scored: the share of the map's energy inside the lesion (compare it with the lesion's
share of the image, which is what a uniform map would get) and the pointing game (does the
hottest pixel fall inside the lesion). Images without a mask are counted, never scored.

Outcomes use the rule of the evaluation step: an image is called melanoma when
``probability >= threshold``.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from melanoma.csvout import csv_bytes

OUTCOMES = ("TP", "FP", "FN", "TN")
CLASS_NAMES = {1: "melanoma", 0: "other"}


# --------------------------------------------------------------------------- heatmaps


def _layer_list(layer_name: str | Sequence[str]) -> list[str]:
    names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
    if not names:
        raise ValueError("no layer to take Grad-CAM maps from")
    return names


def _score_model(model, layer_names: str | Sequence[str]) -> tuple[Any, Callable]:
    """A model giving (feature maps (N,h,w,C) per layer..., head input) and the function head input -> logit (N,).

    We differentiate the sigmoid's pre-activation logit, not the probability: d sigmoid(z)/dz =
    p(1-p) vanishes as p nears 0 or 1, so confidently classified images (the ones most worth
    explaining) would get gradients that are mostly float32 rounding noise. The logit's
    gradient has the same direction without that squashing factor.
    """
    import keras

    layer_names = _layer_list(layer_names)
    conv_outputs = [model.get_layer(name).output for name in layer_names]
    if len({tuple(output.shape[1:3]) for output in conv_outputs}) != 1:
        raise ValueError(f"layers {list(layer_names)} give maps of different sizes: {[tuple(o.shape[1:3]) for o in conv_outputs]}")
    head = model.layers[-1]
    sigmoid_head = getattr(head, "activation", None) is keras.activations.sigmoid
    if sigmoid_head and isinstance(head, keras.layers.Dense):
        # The logit is the Dense layer without its activation; recompute it from the layer's
        # own weights so nothing is copied and the model is left untouched.
        def to_logit(features):
            # Under mixed precision the head keeps float32 weights while features may be float16.
            logit = keras.ops.matmul(keras.ops.cast(features, head.kernel.dtype), head.kernel)
            return logit + head.bias if head.use_bias else logit

        outputs, score_input = [*conv_outputs, head.input], to_logit
    elif sigmoid_head and isinstance(head, keras.layers.Activation):
        outputs, score_input = [*conv_outputs, head.input], lambda logit: logit
    else:
        # No sigmoid we know how to undo: the output is taken as the score itself.
        outputs, score_input = [*conv_outputs, model.outputs[0]], lambda score: score

    def to_score(head_input):
        score = score_input(head_input)
        if score.shape[-1] != 1:
            raise ValueError(f"expected one melanoma score per image, got shape {tuple(score.shape)}")
        return keras.ops.reshape(score, (-1,))

    return keras.Model(model.inputs, outputs), to_score


def _channel_weights(maps: np.ndarray, grads: np.ndarray, plusplus: bool) -> np.ndarray:
    """Per-channel weights (N,C) from feature maps and score gradients, both (N,h,w,C).

    The NumPy reference of what :func:`_cam_step` computes in the graph (kept for tests).
    """
    if not plusplus:
        return grads.mean(axis=(1, 2))
    # Grad-CAM++ with the exponential score trick (Chattopadhay et al., eq. 19): for
    # Y = exp(S) the 2nd and 3rd derivatives are powers of the first, so
    # alpha = g^2 / (2 g^2 + sum_ab A_ab g^3). The exp(S) factor scales every weight of an
    # image alike and disappears in the per-image normalisation.
    g2, g3 = grads**2, grads**3
    denominator = 2.0 * g2 + maps.sum(axis=(1, 2), keepdims=True) * g3
    alpha = g2 / np.where(denominator != 0.0, denominator, 1.0)
    return (alpha * np.maximum(grads, 0.0)).sum(axis=(1, 2))


def _normalise(cams: np.ndarray) -> np.ndarray:
    """Scale each map (N,h,w) to peak 1; a map with no positive evidence stays all zero."""
    peaks = cams.max(axis=(1, 2), keepdims=True)
    return np.where(peaks > 0, cams / np.where(peaks > 0, peaks, 1.0), 0.0).astype(np.float32)


COMBINE_LAYERS = ("each", "joint")


def _cam_step(model, layer_names: Sequence[str], batch_shape: tuple, dtype, plusplus: bool, combine_layers: str = "each") -> Callable:
    """One compiled graph: a fixed-shape batch of images -> its un-normalised maps (N,h,w) float64.

    Built once per :func:`gradcam_heatmaps` call and traced once (the batch shape is fixed;
    the caller pads the last batch), so each batch is one graph call: forward pass, the
    score's gradient at ``layer_name`` (the backward pass stops there: only the head lies
    between the maps and the score), the channel weights and the weighted sum, with no
    per-image Python work. The weight arithmetic runs in float64 like :func:`_channel_weights`.
    Several layers (an ensemble's members): ``each`` keeps the positive part of every layer's
    weighted sum and adds them (for an averaged logit, the mean of the members' own Grad-CAM
    maps); ``joint`` concatenates the maps along the channels and keeps the positive part of
    the total, so one member's counter-evidence can cancel another's evidence.
    """
    import tensorflow as tf

    grad_model, to_score = _score_model(model, layer_names)

    @tf.function(input_signature=[tf.TensorSpec(batch_shape, dtype)])
    def step(batch):
        with tf.GradientTape() as tape:
            *maps, head_input = grad_model(tf.cast(batch, tf.float32), training=False)
            scores = to_score(head_input)
        # Gradient of the summed scores: in inference mode an image's score depends only on
        # its own feature maps, so this is each image's own gradient, in one backward pass.
        grads = [tf.cast(g, tf.float64) for g in tape.gradient(scores, maps)]
        maps = [tf.cast(m, tf.float64) for m in maps]
        if combine_layers == "joint":
            grads, maps = [tf.concat(grads, axis=-1)], [tf.concat(maps, axis=-1)]
        return tf.add_n([weighted_sum(m, g) for m, g in zip(maps, grads)])

    def weighted_sum(maps, grads):
        if plusplus:
            g2 = tf.square(grads)
            g3 = g2 * grads
            denominator = 2.0 * g2 + tf.reduce_sum(maps, axis=(1, 2), keepdims=True) * g3
            alpha = g2 / tf.where(denominator != 0.0, denominator, tf.ones_like(denominator))
            weights = tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2))
        else:
            weights = tf.reduce_mean(grads, axis=(1, 2))
        return tf.nn.relu(tf.einsum("nhwc,nc->nhw", maps, weights))

    return step


def gradcam_heatmaps(
    model, images: np.ndarray, layer_name: str | Sequence[str], *, batch_size: int = 32, plusplus: bool = False,
    combine_layers: str = "each",
) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) maps of the melanoma score for a batch of images.

    model: functional Keras model, images (N,H,W,3) -> one score per image (N,1).
    images: (N,H,W,3) uint8 or float, as the model takes them (it preprocesses internally).
    layer_name: the convolutional layer whose maps are weighted (usually the last one), or
    several with maps of one size (an ensemble's members).
    combine_layers: with several layers, ``each`` (the sum of each layer's own map) or
    ``joint`` (one map of their concatenated channels); see :func:`_cam_step`.
    batch_size: images per graph call (fewer when there are fewer images); the last batch is
    padded to it, so the graph is traced once.
    Returns float32 (N,h,w) in [0,1] at that layer's resolution; use :func:`upsample_heatmap`
    for image resolution. Each map is scaled to peak 1; a map with no positive evidence is 0.
    """
    import tensorflow as tf

    layer_names = _layer_list(layer_name)
    if combine_layers not in COMBINE_LAYERS:
        raise ValueError(f"combine_layers must be one of {COMBINE_LAYERS}, got {combine_layers!r}")
    images = np.asarray(images)
    if len(images) == 0:
        _, h, w, _ = model.get_layer(layer_names[0]).output.shape
        return np.zeros((0, h or 0, w or 0), np.float32)
    if images.dtype != np.uint8:
        images = images.astype(np.float32, copy=False)
    batch = min(int(batch_size), len(images))
    step = _cam_step(model, layer_names, (batch, *images.shape[1:]), tf.as_dtype(images.dtype), plusplus, combine_layers)
    heatmaps = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        count = len(chunk)
        if count < batch:  # pad, so the one traced graph serves the last batch too
            chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), chunk.dtype)])
        heatmaps.append(_normalise(step(tf.constant(chunk)).numpy()[:count]))
    return np.concatenate(heatmaps)


def upsample_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a heatmap (h,w) to size (H,W); returns float32 (H,W) in [0,1]."""
    height, width = size
    # cv2 takes (width, height); INTER_LINEAR samples at pixel centres, so the map is not shifted.
    resized = cv2.resize(np.asarray(heatmap, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def overlay_heatmap(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: int = cv2.COLORMAP_JET
) -> np.ndarray:
    """Blend a colour-mapped heatmap (H,W) in [0,1] over an RGB image uint8 (H,W,3); returns uint8 (H,W,3)."""
    if image.shape[:2] != heatmap.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} differ in size")
    levels = np.round(np.clip(heatmap, 0.0, 1.0) * 255).astype(np.uint8)
    colours = cv2.applyColorMap(levels, colormap)[..., ::-1]  # OpenCV colour maps are BGR
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- lesion focus


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


def _group_stats(rows: list[dict]) -> dict:
    """Counts and focus statistics of one group of per-image rows (see :func:`summarise_focus`)."""
    scored = [r for r in rows if r.get("energy_inside") is not None]
    energies = [float(r["energy_inside"]) for r in scored]
    return {
        "n": len(rows),
        "n_without_mask": sum(1 for r in rows if not r.get("has_mask")),
        "n_scored": len(scored),
        "energy_inside_mean": statistics.fmean(energies) if energies else None,
        "energy_inside_median": statistics.median(energies) if energies else None,
        "lesion_area_share_mean": statistics.fmean(float(r["lesion_area_share"]) for r in scored) if scored else None,
        "pointing_hit_rate": statistics.fmean(1.0 if r["pointing_hit"] else 0.0 for r in scored) if scored else None,
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
        "overall": _group_stats(rows),
        "by_class": {name: _group_stats([r for r in rows if int(r["label"]) == label]) for label, name in CLASS_NAMES.items()},
        "by_outcome": {name: _group_stats([r for r in rows if r["outcome"] == name]) for name in OUTCOMES},
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
        confident = sorted(group, key=lambda r: (-abs(float(r["probability"]) - threshold), str(r["image_id"])))
        borderline = sorted(group, key=lambda r: (abs(float(r["probability"]) - threshold), str(r["image_id"])))
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


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def _safe_name(image_id: str) -> str:
    """A storage-key-safe file stem for an image id (ids are data, not trusted paths).

    Ids that had to be changed get a short hash of the original, so two ids never share a file.
    """
    text = str(image_id)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")
    if safe == text:
        return safe
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _focus_csv(rows: list[dict]) -> bytes:
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
        from training.ensemble import gradcam_layer_names

        layer_name = gradcam_layer_names(model)
    threshold = float(threshold_payload["threshold"])
    missing = [r["image_id"] for r in shard.records if r["image_id"] not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} images have no prediction, e.g. {missing[:3]}")

    started = time.perf_counter()
    heatmaps = gradcam_heatmaps(model, shard.images, layer_name, plusplus=plusplus, combine_layers=combine_layers)
    elapsed = time.perf_counter() - started

    size = shard.images.shape[1:3]
    rows = focus_rows(shard, heatmaps, predictions, threshold)

    index = {record["image_id"]: i for i, record in enumerate(shard.records)}
    gallery = select_gallery(rows, threshold)
    overlay_keys = []
    for entry in gallery:
        i = index[entry["image_id"]]
        image = shard.images[i]
        overlay = overlay_heatmap(image, upsample_heatmap(heatmaps[i], size))
        key = f"{out_prefix}/overlays/{_safe_name(entry['image_id'])}.png"
        out_storage.write_bytes(key, _png_bytes(np.concatenate([image, overlay], axis=1)))
        entry["overlay_key"] = key
        overlay_keys.append(key)

    focus_key, summary_key = f"{out_prefix}/lesion_focus.csv", f"{out_prefix}/gradcam_summary.json"
    focus = summarise_focus(rows)
    speed = len(rows) / elapsed if elapsed > 0 and rows else None
    summary = {
        "method": "gradcam++" if plusplus else "gradcam",
        "layer_name": " + ".join(_layer_list(layer_name)),
        "combine_layers": combine_layers if len(_layer_list(layer_name)) > 1 else None,
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
    out_storage.write_bytes(focus_key, _focus_csv(rows))
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
