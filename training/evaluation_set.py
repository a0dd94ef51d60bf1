"""One set's block of ``metrics.json`` at a given threshold: lesion-bootstrap estimates, the
binary metrics, calibration, subgroups and (for the test set) the curve data for the plots.

The block's keys are listed in :mod:`training.evaluation` (the ``test`` set block).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from training import metrics as m
from training.bootstrap import BootstrapCI, lesion_bootstrap_ci
from training.calibration import brier_score, expected_calibration_error, reliability_curve
from training.evaluation_rows import set_arrays
from training.subgroups import age_bands, subgroup_metrics

__all__ = ["ALPHA", "CALIBRATION_BINS", "set_ranking", "set_ranking_with_ci", "estimate", "evaluate_set"]

ALPHA = 0.05
CALIBRATION_BINS = 10
#: The metrics reported as estimates (value and lesion-bootstrap interval), in block order.
_ESTIMATED = ("auroc", "auprc", "sensitivity", "specificity")


def set_ranking(rows: Sequence[dict], name: str) -> dict:
    """:func:`training.metrics.ranking_metrics` of one set, errors named after the set."""
    labels, scores, _ = set_arrays(rows, name)
    try:
        return m.ranking_metrics(labels, scores)
    except ValueError as exc:
        raise ValueError(f"{name} split: {exc}") from None


def set_ranking_with_ci(rows: Sequence[dict], name: str, *, n_boot: int, seed: int) -> dict:
    """``{"auroc"|"auprc": (value, BootstrapCI)}`` of one set, lesion bootstrap."""
    labels, scores, lesions = set_arrays(rows, name)
    point = set_ranking(rows, name)
    fns = {"auroc": roc_auc_score, "auprc": average_precision_score}
    return {
        key: (
            point[key],
            lesion_bootstrap_ci(labels, scores, lesions, fn, n_boot=n_boot, alpha=ALPHA, seed=seed),
        )
        for key, fn in fns.items()
    }


def estimate(value: float | None, ci: BootstrapCI | None) -> dict:
    """An *estimate* of the schema: ``{"value", "ci_low", "ci_high"}``."""
    return {
        "value": value,
        "ci_low": ci.low if ci else None,
        "ci_high": ci.high if ci else None,
    }


def _bootstrap_cis(
    labels: np.ndarray, scores: np.ndarray, lesions: np.ndarray, threshold: float, *, n_boot: int, seed: int
) -> dict[str, BootstrapCI]:
    """Lesion-bootstrap intervals of the :data:`_ESTIMATED` metrics of a two-class set."""
    metric_fns = {
        "auroc": roc_auc_score,
        "auprc": average_precision_score,
        "sensitivity": lambda y, s: m.binary_metrics(y, s, threshold)["sensitivity"],
        "specificity": lambda y, s: m.binary_metrics(y, s, threshold)["specificity"],
    }
    # Same seed for every metric: the intervals come from the same resamples.
    return {
        key: lesion_bootstrap_ci(labels, scores, lesions, fn, n_boot=n_boot, alpha=ALPHA, seed=seed)
        for key, fn in metric_fns.items()
    }


def _calibration(labels: np.ndarray, scores: np.ndarray) -> dict:
    return {
        "brier": brier_score(labels, scores),
        "ece": expected_calibration_error(labels, scores, CALIBRATION_BINS),
        "n_bins": CALIBRATION_BINS,
        "curve": reliability_curve(labels, scores, CALIBRATION_BINS),
    }


def _subgroups(
    rows: Sequence[dict], labels: np.ndarray, scores: np.ndarray, threshold: float, min_count: int
) -> dict:
    return subgroup_metrics(
        labels,
        scores,
        {
            "sex": [r.get("sex") for r in rows],
            "age_band": age_bands([r.get("age") for r in rows]),
            "localization": [r.get("localization") for r in rows],
        },
        threshold,
        min_count=min_count,
    )


def _bootstrap_record(cis: dict[str, BootstrapCI | None], *, n_boot: int, seed: int) -> dict:
    return {
        "method": "percentile; lesions resampled with replacement, all images of a drawn lesion together",
        "n_boot": n_boot,
        "alpha": ALPHA,
        "seed": seed,
        "n_skipped": {key: ci.n_skipped for key, ci in cis.items() if ci is not None},
    }


def evaluate_set(
    rows: Sequence[dict],
    name: str,
    threshold: float,
    *,
    n_boot: int,
    seed: int,
    min_subgroup_count: int,
    with_curves: bool,
) -> dict:
    """The set block of the ``metrics.json`` schema (:mod:`training.evaluation`), at ``threshold``."""
    if not rows:
        raise ValueError(f"{name}: no rows")
    labels, scores, lesions = set_arrays(rows, name)
    n_pos = int(labels.sum())
    both_classes = 0 < n_pos < labels.size
    at_threshold = m.binary_metrics(labels, scores, threshold)
    block: dict = {
        "n_images": int(labels.size),
        "n_lesions": len(set(lesions.tolist())),
        "n_melanoma": n_pos,
        "prevalence": n_pos / labels.size,
    }

    point = {"sensitivity": at_threshold["sensitivity"], "specificity": at_threshold["specificity"]}
    cis: dict[str, BootstrapCI | None]
    if both_classes:
        point.update(m.ranking_metrics(labels, scores))
        cis = dict(_bootstrap_cis(labels, scores, lesions, threshold, n_boot=n_boot, seed=seed))
    else:
        point.update(auroc=None, auprc=None)
        cis = dict.fromkeys(_ESTIMATED, None)
        block["note"] = (
            f"only class {1 if n_pos else 0} present: AUROC/AUPRC are undefined and no bootstrap "
            "interval is computed"
        )
    for key in _ESTIMATED:
        block[key] = estimate(point[key], cis[key])
    block["at_threshold"] = at_threshold
    block["at_0.5"] = m.binary_metrics(labels, scores, 0.5)
    block["calibration"] = _calibration(labels, scores)
    block["subgroups"] = _subgroups(rows, labels, scores, threshold, min_subgroup_count)
    block["bootstrap"] = _bootstrap_record(cis, n_boot=n_boot, seed=seed)
    if with_curves and both_classes:
        block["curves"] = m.curve_points(labels, scores)
    return block
