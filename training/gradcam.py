"""Grad-CAM and Grad-CAM++ heatmaps of the melanoma score: the method only.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017) weights the feature maps of a convolutional layer
by the gradient of the class score and keeps the positive part; Grad-CAM++ (Chattopadhay
et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep Convolutional
Networks", WACV 2018) replaces the plain gradient average by pixel-wise weights so that
several separate regions of evidence are not drowned by the largest one.

This module computes the maps (:func:`gradcam_heatmaps`), brings them to image size
(:func:`upsample_heatmap`) and blends them over an image (:func:`overlay_heatmap`). How well
they sit on the lesion, and the pipeline step that writes them, are in :mod:`training.lesion_focus`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import cv2
import keras
import numpy as np
import tensorflow as tf

from melanoma.progress import Progress

__all__ = [
    "COMBINE_LAYERS",
    "cam_step",
    "channel_weights",
    "gradcam_heatmaps",
    "layer_list",
    "normalise_maps",
    "overlay_heatmap",
    "score_model",
    "upsample_heatmap",
]


def layer_list(layer_name: str | Sequence[str]) -> list[str]:
    names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
    if not names:
        raise ValueError("no layer to take Grad-CAM maps from")
    return names


def score_model(model, layer_names: str | Sequence[str]) -> tuple[Any, Callable]:
    """A model giving (feature maps (N,h,w,C) per layer..., head input) and the function head input -> logit (N,).

    We differentiate the sigmoid's pre-activation logit, not the probability: d sigmoid(z)/dz =
    p(1-p) vanishes as p nears 0 or 1, so confidently classified images (the ones most worth
    explaining) would get gradients that are mostly float32 rounding noise. The logit's
    gradient has the same direction without that squashing factor.
    """
    layer_names = layer_list(layer_names)
    conv_outputs = [model.get_layer(name).output for name in layer_names]
    if len({tuple(output.shape[1:3]) for output in conv_outputs}) != 1:
        raise ValueError(
            f"layers {list(layer_names)} give maps of different sizes: {[tuple(o.shape[1:3]) for o in conv_outputs]}"
        )
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


def channel_weights(maps: np.ndarray, grads: np.ndarray, plusplus: bool) -> np.ndarray:
    """Per-channel weights (N,C) from feature maps and score gradients, both (N,h,w,C).

    The NumPy reference of what :func:`cam_step` computes in the graph (kept for tests).
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


def normalise_maps(cams: np.ndarray) -> np.ndarray:
    """Scale each map (N,h,w) to peak 1; a map with no positive evidence stays all zero."""
    peaks = cams.max(axis=(1, 2), keepdims=True)
    return np.where(peaks > 0, cams / np.where(peaks > 0, peaks, 1.0), 0.0).astype(np.float32)


COMBINE_LAYERS = ("each", "joint")


def cam_step(
    model, layer_names: Sequence[str], batch_shape: tuple, dtype, plusplus: bool, combine_layers: str = "each"
) -> Callable:
    """One compiled graph: a fixed-shape batch of images -> its un-normalised maps (N,h,w) float64.

    Built once per :func:`gradcam_heatmaps` call and traced once (the batch shape is fixed;
    the caller pads the last batch), so each batch is one graph call: forward pass, the
    score's gradient at ``layer_name`` (the backward pass stops there: only the head lies
    between the maps and the score), the channel weights and the weighted sum, with no
    per-image Python work. The weight arithmetic runs in float64 like :func:`channel_weights`.
    Several layers (an ensemble's members): ``each`` keeps the positive part of every layer's
    weighted sum and adds them (for an averaged logit, the mean of the members' own Grad-CAM
    maps); ``joint`` concatenates the maps along the channels and keeps the positive part of
    the total, so one member's counter-evidence can cancel another's evidence.
    """
    grad_model, to_score = score_model(model, layer_names)

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
    model,
    images: np.ndarray,
    layer_name: str | Sequence[str],
    *,
    batch_size: int = 32,
    plusplus: bool = False,
    combine_layers: str = "each",
    progress: Progress | None = None,
) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) maps of the melanoma score for a batch of images.

    model: functional Keras model, images (N,H,W,3) -> one score per image (N,1).
    images: (N,H,W,3) uint8 or float, as the model takes them (it preprocesses internally).
    layer_name: the convolutional layer whose maps are weighted (usually the last one), or
    several with maps of one size (an ensemble's members).
    combine_layers: with several layers, ``each`` (the sum of each layer's own map) or
    ``joint`` (one map of their concatenated channels); see :func:`cam_step`.
    batch_size: images per graph call (fewer when there are fewer images); the last batch is
    padded to it, so the graph is traced once.
    Returns float32 (N,h,w) in [0,1] at that layer's resolution; use :func:`upsample_heatmap`
    for image resolution. Each map is scaled to peak 1; a map with no positive evidence is 0.
    progress: advanced by each batch's images (long runs log where they are).
    """
    layer_names = layer_list(layer_name)
    if combine_layers not in COMBINE_LAYERS:
        raise ValueError(f"combine_layers must be one of {COMBINE_LAYERS}, got {combine_layers!r}")
    images = np.asarray(images)
    if len(images) == 0:
        _, h, w, _ = model.get_layer(layer_names[0]).output.shape
        return np.zeros((0, h or 0, w or 0), np.float32)
    if images.dtype != np.uint8:
        images = images.astype(np.float32, copy=False)
    batch = min(int(batch_size), len(images))
    step = cam_step(
        model, layer_names, (batch, *images.shape[1:]), tf.as_dtype(images.dtype), plusplus, combine_layers
    )
    heatmaps = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        count = len(chunk)
        if count < batch:  # pad, so the one traced graph serves the last batch too
            chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), chunk.dtype)])
        heatmaps.append(normalise_maps(step(tf.constant(chunk)).numpy()[:count]))
        if progress is not None:
            progress.advance(count)
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
