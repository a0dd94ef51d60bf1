"""What one training epoch shows: flipped or augmented variants of the images, in a fixed order.

Epoch ``e`` trains on variant ``e mod train_flips``; the cached phases cache every variant,
and the uncached ones make them here the same way, so both see the same images.
"""

from __future__ import annotations

import numpy as np

from melanoma.augment import AUGMENT_PARAMS, augment_image, draw_params

__all__ = ["FLIP_AXES", "augment_version", "epoch_order", "flip_variant", "train_variant"]

FLIP_AXES = {0: (), 1: (2,), 2: (1,), 3: (1, 2)}  # variant -> flipped image axes (N, H, W, C)


def flip_variant(images: np.ndarray, variant: int) -> np.ndarray:
    """Variant 0: as stored; 1: left-right; 2: up-down; 3: both (a 180 degree rotation)."""
    return np.ascontiguousarray(np.flip(images, FLIP_AXES[variant])) if variant else images


def augment_version() -> int:
    """The augment transform's version: cached augmented variants are redrawn when it changes."""
    return int(AUGMENT_PARAMS["version"])


def train_variant(
    images: np.ndarray,
    ids: list[str],
    variant: int,
    augment_seed: int | None = None,
    colour_jitter: bool = False,
    random_crop: bool = False,
) -> np.ndarray:
    """Training images uint8 (N, H, W, 3) as epoch variant ``variant`` shows them, same shape.

    ``augment_seed`` None: :func:`flip_variant`. Otherwise variant 0 is the images as stored and
    variant v >= 1 warps each image by its own draw of the augment job's transform, keyed by
    (image id, seed, v), so a rerun or a resumed run draws the same images; ``colour_jitter``
    adds hue, saturation and contrast draws (:data:`melanoma.augment.COLOUR_JITTER`), ``random_crop``
    a random resized crop in place of the zoom (:data:`melanoma.augment.RANDOM_CROP`).
    """
    if augment_seed is None or variant == 0:
        return flip_variant(images, variant)
    if len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    out = np.empty_like(images)
    for i, image_id in enumerate(ids):
        key = f"{image_id}:train-variant:{augment_seed}:{variant}"
        out[i] = augment_image(images[i], draw_params(key, colour_jitter, random_crop))
    return out


def epoch_order(n: int, seed: int, phase: int, epoch: int) -> np.ndarray:
    """The shuffle of one epoch: a function of (seed, phase, epoch) only, so a resumed run
    sees the same batches as an uninterrupted one, and cached and uncached runs the same."""
    return np.random.default_rng([seed, phase, epoch]).permutation(n)
