"""Lesion-level bootstrap confidence intervals: the uncertainty of any metric of a set.

Inputs follow the conventions of :mod:`training.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

from training.metrics import check_inputs

__all__ = ["BootstrapCI", "lesion_bootstrap_ci"]


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval; unpacks as ``low, high``.

    ``low``/``high`` are ``None`` when no resample could be used. ``n_skipped`` counts the
    resamples left out because they held one class only or the metric was undefined on them
    (``None`` or NaN); the interval rests on ``n_boot - n_skipped`` values.
    """

    low: float | None
    high: float | None
    n_boot: int
    n_skipped: int

    def __iter__(self):
        return iter((self.low, self.high))


def lesion_bootstrap_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    lesion_ids: ArrayLike,
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval with lesions as the resampling unit.

    Images of one lesion are correlated, so resampling images would understate the
    uncertainty; each resample draws ``n_lesions`` lesions with replacement and takes every
    image of each drawn lesion (a lesion drawn twice contributes all its images twice).

    Parameters
    ----------
    labels : array of shape (n_samples,), values in {0, 1}, both classes present
    scores : array of shape (n_samples,)
    lesion_ids : array of shape (n_samples,), any hashable, sortable ids (no ``None``)
    metric_fn : ``metric_fn(labels, scores) -> float | None`` on a resample; it is only
        called on resamples holding both classes.
    n_boot : number of resamples
    alpha : the interval covers 1 - alpha
    seed : seed of ``numpy.random.default_rng``; the same seed draws the same resamples, so
        intervals of different metrics on the same data are paired.

    Returns
    -------
    BootstrapCI (``low, high = lesion_bootstrap_ci(...)`` works).
    """
    y, s = check_inputs(labels, scores, need_both_classes=True, what="the bootstrap")
    lesions = np.asarray(lesion_ids)
    if lesions.shape != y.shape:
        raise ValueError(f"lesion_ids has shape {lesions.shape}, expected {y.shape}")
    if any(v is None for v in lesions.tolist()):
        raise ValueError("lesion_ids contain None")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    codes = np.unique(lesions, return_inverse=True)[1].ravel()
    n_lesions = int(codes.max()) + 1
    order = np.argsort(codes, kind="stable")  # images grouped by lesion
    sizes = np.bincount(codes, minlength=n_lesions)
    starts = np.cumsum(sizes) - sizes  # first position of each lesion in `order`
    positives = np.bincount(codes, weights=y, minlength=n_lesions).astype(np.int64)

    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_lesions, size=(n_boot, n_lesions))
    lengths = sizes[drawn]  # (n_boot, n_lesions) images contributed by each draw
    n_images = lengths.sum(axis=1)
    n_pos = positives[drawn].sum(axis=1)
    usable = (n_pos > 0) & (n_pos < n_images)

    # All resamples at once: each draw expands to the consecutive run of its lesion's
    # images in `order`; a running position within the draw's run gives the offset.
    flat_lengths = lengths.ravel()
    run_start = np.repeat(starts[drawn].ravel(), flat_lengths)
    within = np.arange(flat_lengths.sum()) - np.repeat(np.cumsum(flat_lengths) - flat_lengths, flat_lengths)
    images = order[run_start + within]
    per_resample = np.split(images, np.cumsum(n_images)[:-1])

    values = []
    for index in np.flatnonzero(usable):
        value = metric_fn(y[per_resample[index]], s[per_resample[index]])
        if value is not None and math.isfinite(value):
            values.append(float(value))
    n_skipped = n_boot - len(values)
    if not values:
        return BootstrapCI(None, None, n_boot, n_skipped)
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return BootstrapCI(float(low), float(high), n_boot, n_skipped)
