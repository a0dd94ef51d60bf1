"""Calibration of predicted probabilities: Brier score, reliability curve, expected calibration error.

Inputs follow the conventions of :mod:`training.metrics`; one class is allowed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from training.metrics import check_inputs

__all__ = ["brier_score", "reliability_curve", "expected_calibration_error"]


def brier_score(labels: ArrayLike, scores: ArrayLike) -> float:
    """Mean squared error of the probabilities (``brier_score_loss``); lower is better.

    labels, scores : arrays of shape (n_samples,); scores in [0, 1]. One class is allowed.
    """
    y, s = check_inputs(labels, scores, probabilities=True)
    return float(brier_score_loss(y, s, pos_label=1))


def reliability_curve(labels: ArrayLike, scores: ArrayLike, n_bins: int = 10) -> dict:
    """Reliability diagram data over ``n_bins`` equal-width bins of [0, 1].

    Bins are those of ``calibration_curve(strategy="uniform")``: right-closed, except the
    first, which also holds 0. Empty bins are left out.

    Parameters
    ----------
    labels, scores : arrays of shape (n_samples,); scores in [0, 1]. One class is allowed.
    n_bins : int >= 1

    Returns
    -------
    dict of lists, each of length n_nonempty_bins: ``bin_lower``, ``bin_upper``,
    ``mean_predicted``, ``fraction_positive``, ``count``.
    """
    y, s = check_inputs(labels, scores, probabilities=True)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    fraction_positive, mean_predicted = calibration_curve(
        y, s, n_bins=n_bins, strategy="uniform", pos_label=1
    )
    # calibration_curve does not return bin counts (needed to weight the ECE); recount
    # with its own bin assignment so the two stay aligned.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], s), minlength=n_bins)
    nonempty = np.flatnonzero(counts)
    return {
        "bin_lower": edges[nonempty].tolist(),
        "bin_upper": edges[nonempty + 1].tolist(),
        "mean_predicted": mean_predicted.tolist(),
        "fraction_positive": fraction_positive.tolist(),
        "count": counts[nonempty].tolist(),
    }


def expected_calibration_error(labels: ArrayLike, scores: ArrayLike, n_bins: int = 10) -> float:
    """ECE: the mean over images of |fraction of melanoma - mean probability| of their bin.

    Equal-width bins as in :func:`reliability_curve`, each weighted by its share of images.
    labels, scores : arrays of shape (n_samples,); scores in [0, 1].
    """
    curve = reliability_curve(labels, scores, n_bins)
    counts = np.asarray(curve["count"], dtype=np.float64)
    gaps = np.abs(np.asarray(curve["fraction_positive"]) - np.asarray(curve["mean_predicted"]))
    return float(np.sum(counts / counts.sum() * gaps))
