"""Metric functions for the melanoma classifier, in the style of ``sklearn.metrics``.

This module holds the input checks, the metrics at a threshold, the ranking metrics, the
threshold choice, lesion pooling of scores and the curve data for plots. Its siblings follow
the same conventions: :mod:`training.bootstrap` (lesion bootstrap intervals),
:mod:`training.calibration` (Brier score, reliability, ECE) and :mod:`training.subgroups`.

Plain functions of arrays, no state. Shared conventions:

- ``labels``: int array of shape (n_samples,), 1 = melanoma, 0 = other.
- ``scores``: float array of shape (n_samples,), the predicted melanoma probability.
- An image is called positive when ``score >= threshold``. Thresholds returned by
  :func:`choose_threshold` are score values taken from ``roc_curve``, so this convention
  reproduces exactly the ROC point they were chosen at.
- A ratio whose denominator is zero (sensitivity without melanoma, PPV without any positive
  call, ...) is ``None``: 0 would read as a failure and NaN is not valid JSON.

Invalid input raises ``ValueError`` naming the problem: arrays that are not 1-D or differ in
length, labels outside {0, 1}, NaN or infinite scores, and a single class where a ranking
metric or a threshold choice needs both.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from melanoma.settings import THRESHOLD_STRATEGIES

__all__ = [
    "check_inputs",
    "binary_metrics",
    "ranking_metrics",
    "choose_threshold",
    "LOGIT_EPS",
    "clipped_logits",
    "lesion_pooled_scores",
    "curve_points",
]


def check_inputs(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    need_both_classes: bool = False,
    probabilities: bool = False,
    what: str = "this metric",
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert; returns labels as int64 and scores as float64, both (n_samples,)."""
    y = np.asarray(labels)
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be numeric: {exc}") from None
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} != {s.shape[0]}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    try:
        binary = np.isin(y, (0, 1))
    except TypeError:
        binary = np.zeros(y.shape, dtype=bool)
    if not binary.all():
        bad = sorted({repr(v) for v in y[~binary].tolist()})[:5]
        raise ValueError(f"labels must be 0 or 1, found {', '.join(bad)}")
    y = y.astype(np.int64)
    nan = np.isnan(s)
    if nan.any():
        raise ValueError(
            f"scores contain {int(nan.sum())} NaN value(s) (first at index {int(np.argmax(nan))}); "
            "a model that outputs NaN must be fixed, not evaluated"
        )
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int(np.isinf(s).sum())} infinite value(s)")
    if probabilities and (s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(f"scores must be probabilities in [0, 1], found range [{s.min()}, {s.max()}]")
    if need_both_classes:
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            only = 1 if n_pos else 0
            raise ValueError(f"{what} needs both classes, but all {y.size} labels are {only}")
    return y, s


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def binary_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict:
    """Confusion counts and the ratios derived from them at one threshold.

    Parameters
    ----------
    labels : array of shape (n_samples,), values in {0, 1}
    scores : array of shape (n_samples,)
    threshold : float; images with ``score >= threshold`` are called melanoma.

    Returns
    -------
    dict with ``threshold``, ``n``, ``accuracy``, ``sensitivity`` (recall of class 1),
    ``specificity`` (recall of class 0), ``ppv`` (precision of class 1), ``npv``
    (precision of class 0), ``f1`` (of class 1) as floats, and ``tn``, ``fp``, ``fn``, ``tp``
    as ints. A ratio with a zero denominator is ``None``: sensitivity without melanoma,
    specificity without other lesions, ppv without positive calls, npv without negative
    calls, f1 when there is neither a melanoma nor a positive call.
    """
    y, s = check_inputs(labels, scores)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    predicted = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    return {
        "threshold": threshold,
        "n": int(y.size),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def ranking_metrics(labels: ArrayLike, scores: ArrayLike) -> dict:
    """Threshold-free metrics.

    Parameters
    ----------
    labels : array of shape (n_samples,), values in {0, 1}, both classes present
    scores : array of shape (n_samples,)

    Returns
    -------
    dict with ``auroc`` (``roc_auc_score``; 0.5 when all scores are equal), ``auprc``
    (``average_precision_score``; its no-skill value is the prevalence, not 0.5) and
    ``prevalence`` (fraction of melanoma).
    """
    y, s = check_inputs(labels, scores, need_both_classes=True, what="AUROC/AUPRC")
    return {
        "auroc": float(roc_auc_score(y, s)),
        "auprc": float(average_precision_score(y, s)),
        "prevalence": float(y.mean()),
    }


def choose_threshold(
    labels: ArrayLike,
    scores: ArrayLike,
    strategy: str = "youden",
    target_sensitivity: float = 0.95,
) -> float:
    """Pick an operating threshold; call it on validation data, never on the test set.

    Candidates are the thresholds of ``roc_curve(..., drop_intermediate=False)``: every
    distinct score, in decreasing order, preceded by ``+inf`` (nothing called positive).

    - ``"youden"``: maximise sensitivity + specificity - 1 (TPR - FPR).
    - ``"sensitivity"``: the highest threshold whose sensitivity is >= ``target_sensitivity``,
      i.e. the most specific operating point meeting the target. It always exists, since
      the lowest score gives sensitivity 1.
    - ``"f1"``: maximise the F1 score of the melanoma class.

    Ties go to the highest threshold (fewest positive calls). Objectives are compared as
    exact ratios of counts, so mathematically equal values do tie. The ``+inf`` candidate
    can only win for ``"youden"`` when no threshold beats chance (e.g. all scores equal);
    it is then clipped to 1.0, as is any result outside [0, 1], so the threshold is always
    a usable probability. (With 1.0, scores of exactly 1.0 are called positive.)

    Parameters
    ----------
    labels : array of shape (n_samples,), values in {0, 1}, both classes present
    scores : array of shape (n_samples,), probabilities
    strategy : "youden", "sensitivity" or "f1"
    target_sensitivity : float in (0, 1], used by ``"sensitivity"`` only

    Returns
    -------
    float in [0, 1]
    """
    if strategy not in THRESHOLD_STRATEGIES:
        raise ValueError(f"strategy must be one of {THRESHOLD_STRATEGIES}, got {strategy!r}")
    y, s = check_inputs(labels, scores, need_both_classes=True, what="choosing a threshold")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    # One candidate grid for every strategy, so ties and +inf follow a single rule.
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # Back to integer counts: comparisons of float rates could split exact ties by an ulp.
    tp = np.rint(tpr * n_pos).astype(np.int64)
    fp = np.rint(fpr * n_neg).astype(np.int64)
    if strategy == "youden":
        # (TPR - FPR) * n_pos * n_neg, exact in integers.
        objective = tp * n_neg - fp * n_pos
    elif strategy == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        # tp is non-decreasing along the decreasing thresholds: the first hit is the highest.
        objective = (tp >= target_sensitivity * n_pos).astype(np.int64)
    else:
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + n_pos); one correctly rounded
        # division, so equal ratios give equal floats.
        objective = 2 * tp / (tp + fp + n_pos)
    # argmax returns the first maximum, i.e. the highest threshold among ties.
    return float(np.clip(thresholds[int(np.argmax(objective))], 0.0, 1.0))


#: Probabilities are clipped to [LOGIT_EPS, 1 - LOGIT_EPS] before taking logits, so a
#: saturated 0.0 or 1.0 (float32 sigmoid) stays finite and cannot outvote the other images.
LOGIT_EPS = 1e-7


def clipped_logits(probabilities: ArrayLike) -> np.ndarray:
    """Probabilities (any shape) -> float64 logits of the same shape, clipped to :data:`LOGIT_EPS`."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(clipped) - np.log1p(-clipped)


def lesion_pooled_scores(scores: ArrayLike, lesion_ids: ArrayLike) -> np.ndarray:
    """Every image's score replaced by the pooled score of its lesion.

    The pooled score is the sigmoid of the mean logit of the lesion's images (a geometric
    mean of odds): several views of one lesion vote together, the way a dermatologist
    reads them. A lesion with a single image keeps its score (up to the clipping by
    :data:`LOGIT_EPS`).

    Parameters
    ----------
    scores : float array (n_images,), probabilities in [0, 1].
    lesion_ids : array (n_images,) of hashable lesion ids.

    Returns
    -------
    float64 array (n_images,): image i's lesion's pooled probability, in input order.
    """
    s = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(lesion_ids, dtype=object)
    if s.ndim != 1 or ids.ndim != 1 or s.shape != ids.shape:
        raise ValueError(
            f"scores and lesion_ids must be 1-D of one length, got shapes {s.shape} and {ids.shape}"
        )
    if not np.isfinite(s).all() or (s.size and (s.min() < 0.0 or s.max() > 1.0)):
        raise ValueError("scores must be finite probabilities in [0, 1]")
    logits = clipped_logits(s)
    _, group = np.unique(ids.astype(str), return_inverse=True)
    mean_logit = np.bincount(group, weights=logits) / np.bincount(group)
    return 1.0 / (1.0 + np.exp(-mean_logit[group]))


def curve_points(labels: ArrayLike, scores: ArrayLike, n_hist_bins: int = 20) -> dict:
    """Data to draw ROC, precision-recall and score-histogram plots without the raw scores.

    Parameters
    ----------
    labels : array of shape (n_samples,), both classes present
    scores : array of shape (n_samples,), probabilities in [0, 1]
    n_hist_bins : equal-width histogram bins over [0, 1]

    Returns
    -------
    ``{"roc": {"fpr", "tpr"}, "pr": {"recall", "precision"},
    "score_histogram": {"edges", "melanoma", "other"}}``, all lists. The ROC curve keeps
    only its corners (``drop_intermediate=True``), which draws the same line.
    """
    y, s = check_inputs(labels, scores, need_both_classes=True, probabilities=True, what="ROC and PR curves")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=True)
    precision, recall, _ = precision_recall_curve(y, s)
    edges = np.linspace(0.0, 1.0, n_hist_bins + 1)
    return {
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "pr": {"recall": recall.tolist(), "precision": precision.tolist()},
        "score_histogram": {
            "edges": edges.tolist(),
            "melanoma": np.histogram(s[y == 1], bins=edges)[0].tolist(),
            "other": np.histogram(s[y == 0], bins=edges)[0].tolist(),
        },
    }
