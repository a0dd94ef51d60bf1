"""Test-time augmentation: a model's score averaged over an image's eight dihedral views.

A dermoscopic image has no canonical orientation, and training already rotates by any angle
and flips (:data:`melanoma.augment.AUGMENT_PARAMS`), so each of the eight views - rotations by
0, 90, 180 and 270 degrees, each also mirrored - is an image the model has learnt to score.
Averaging over them removes the part of a score that depends on how the lesion happened to
lie in the frame. As in lesion pooling (:func:`training.metrics.lesion_pooled_scores`), the
views vote with their logits: the score is the sigmoid of the mean logit.

Averaging predictions over flipped and rotated copies at test time is what ISIC challenge
entries did: Perez, Vasconcelos, Avila, Valle, "Data augmentation for skin lesion analysis",
ISIC Skin Image Analysis Workshop (MICCAI 2018); Gessert, Nielsen, Shaikh, Werner,
Schlaefer, "Skin lesion classification using ensembles of multi-resolution EfficientNets
with meta data", MethodsX 7 (2020).

A threshold holds only for scores computed the way validation's were, so the choice is part
of the evaluated model: ``evaluate`` records it in ``eval/metrics.json`` (``scores.views``)
and every later scorer (predict, the scoring DAG, site calibration, the promotion gate's
re-scoring) reads it from there. Grad-CAM explains the image as given (the first view).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from training.metrics import clipped_logits

__all__ = ["VIEWS", "VIEWS_NOTE", "dihedral_view", "mean_over_views", "views_of"]

#: The score's views: 1 (the image as given) or 8 (the dihedral group).
VIEWS = (1, 8)
#: What the reports add to their note on the scores, by views.
VIEWS_NOTE = {
    1: "",
    8: " Each image's probability is the mean logit of its 8 dihedral views (rotations by quarter turns, "
    "mirrored or not: test-time augmentation); Grad-CAM explains the image as given.",
}


def views_of(metrics: dict | None) -> int:
    """The views a run's scores average, from its ``eval/metrics.json`` (validation's threshold was
    chosen on such scores, so every later scorer of the model follows them). 1 when there is no
    evaluation, or for one recorded before views were (``scores`` without ``views``)."""
    return int(((metrics or {}).get("scores") or {}).get("views", 1))


def dihedral_view(images: np.ndarray, index: int) -> np.ndarray:
    """View ``index`` (0-7) of square images (N, H, H, C): ``index % 4`` quarter turns, mirrored when ``index >= 4``.

    View 0 is the images themselves (not a copy). The 8 views are the dihedral group of the
    square, each exactly once; pixels are moved, never resampled.
    """
    if not 0 <= index < 8:
        raise ValueError(f"a dihedral view index is 0-7, got {index}")
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral views need square images (N, H, H, C), got shape {images.shape}")
    view = np.rot90(images, k=index % 4, axes=(1, 2))
    if index >= 4:
        view = view[:, :, ::-1]
    return np.ascontiguousarray(view)


def mean_over_views(score: Callable[[np.ndarray], np.ndarray], images: np.ndarray, views: int) -> np.ndarray:
    """Probabilities (N,) of ``images`` under ``score`` (images -> probabilities), over ``views`` views.

    ``views=1`` is ``score(images)`` unchanged; ``views=8`` is the sigmoid of the mean logit
    of the eight dihedral views' probabilities (logits clipped as in lesion pooling).
    """
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views}")
    if views == 1:
        return np.asarray(score(images), dtype=np.float64)
    logits = np.mean([clipped_logits(score(dihedral_view(images, k))) for k in range(views)], axis=0)
    return 1.0 / (1.0 + np.exp(-logits))
