"""Subgroup metrics: discrimination and operating point per sex, age band, localization, ...

Inputs follow the conventions of :mod:`training.metrics`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

from training.metrics import binary_metrics, check_inputs

__all__ = ["AGE_BANDS", "UNKNOWN", "MIN_CLASS_COUNT", "age_bands", "subgroup_metrics"]

#: Age bands of :func:`age_bands`: (lower bound inclusive, name); the last is open-ended.
AGE_BANDS = ((0.0, "<30"), (30.0, "30-44"), (45.0, "45-59"), (60.0, "60-74"), (75.0, "75+"))
UNKNOWN = "unknown"
#: A subgroup with fewer cases than this in either class is flagged ``small``.
MIN_CLASS_COUNT = 5


def _group_key(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    text = str(value).strip()
    return text if text else UNKNOWN


def age_bands(ages: Sequence[float | None]) -> np.ndarray:
    """Map ages to the bands of :data:`AGE_BANDS`; ``None``/NaN become ``"unknown"``.

    ages : sequence of length n_samples. Returns an object array of str, shape (n_samples,).
    """
    values = np.array([np.nan if a is None else float(a) for a in ages], dtype=np.float64)
    names = np.array([name for _, name in AGE_BANDS], dtype=object)
    lower_bounds = [bound for bound, _ in AGE_BANDS[1:]]
    bands = names[np.digitize(np.nan_to_num(values, nan=0.0), lower_bounds)]
    bands[np.isnan(values)] = UNKNOWN
    return bands


def subgroup_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    groups: Mapping[str, ArrayLike],
    threshold: float,
    min_count: int = 30,
) -> dict:
    """Per-subgroup discrimination and operating-point metrics.

    Parameters
    ----------
    labels, scores : arrays of shape (n_samples,)
    groups : maps a grouping name (e.g. ``"sex"``, ``"age_band"``, ``"localization"``) to an
        array of shape (n_samples,) of group values; ``None``, NaN and empty strings are
        grouped as ``"unknown"``.
    threshold : the operating threshold (``score >= threshold`` is positive)
    min_count : subgroups with fewer images are flagged ``small``

    Returns
    -------
    ``{grouping: {value: {"n", "n_melanoma", "auroc", "sensitivity", "specificity",
    "small"}}}`` with values sorted. ``auroc`` is ``None`` when the subgroup holds one
    class; sensitivity/specificity are ``None`` without melanoma/other images. ``small`` is
    true when ``n < min_count`` or either class has fewer than :data:`MIN_CLASS_COUNT`
    images: such estimates are too noisy to compare.
    """
    y, s = check_inputs(labels, scores)
    result: dict[str, dict[str, dict]] = {}
    for grouping, values in groups.items():
        keys = np.array([_group_key(v) for v in np.asarray(values, dtype=object).tolist()], dtype=object)
        if keys.shape != y.shape:
            raise ValueError(f"group {grouping!r} has {keys.size} values for {y.size} samples")
        per_value = {}
        for key in sorted(set(keys.tolist())):
            mask = keys == key
            y_g, s_g = y[mask], s[mask]
            n = int(mask.sum())
            n_pos = int(y_g.sum())
            at_threshold = binary_metrics(y_g, s_g, threshold)
            per_value[key] = {
                "n": n,
                "n_melanoma": n_pos,
                "auroc": float(roc_auc_score(y_g, s_g)) if 0 < n_pos < n else None,
                "sensitivity": at_threshold["sensitivity"],
                "specificity": at_threshold["specificity"],
                "small": n < min_count or min(n_pos, n - n_pos) < MIN_CLASS_COUNT,
            }
        result[grouping] = per_value
    return result
