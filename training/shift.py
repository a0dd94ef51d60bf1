"""Operating-point safety on another site's images: score-shift detection and site calibration.

A threshold chosen on HAM10000 validation holds only while new images score like validation
images did. Another clinic's dermatoscope (light, sensor, white balance, magnification) can
move every score: measured on PH² before colour constancy, the HAM-validation threshold caught
1 melanoma in 8. Two tools, both plain functions of score arrays:

- :func:`score_shift` compares a scored drop's scores with validation's, needing no labels,
  and says when the operating point can no longer be trusted.
- :func:`calibrate_site` re-chooses the threshold on a small labelled drop of the new site by
  the same strategy, with a lesion-bootstrap interval and an out-of-fold estimate of what the
  re-chosen threshold achieves on that site's unseen cases.

Why a two-sample Kolmogorov-Smirnov test on the logits: it needs no labels (a drop to score
has none), no binning and no distributional assumption, and its statistic D (the largest gap
between the two cumulative distributions, 0..1) reads directly as "this share of images
crossed some threshold that validation's did not" - which is how an operating point
collapses. Logits rather than probabilities only spread the scores out; D is the same under
any monotone map. With hundreds of images a p-value flags trivial differences, and with ten
it flags nothing, so the warning needs both: D >= :data:`SHIFT_MIN_D` (an effect worth a
warning) and p < :data:`SHIFT_MAX_P` (not chance). A drop whose melanoma share differs a lot
from validation's moves the distribution too; the warning then still means what it says - the
validated sensitivity and specificity do not carry over - and the remedy is the same:
score a labelled sample of that site and calibrate.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

import numpy as np

from training import metrics as m
from training.bootstrap import lesion_bootstrap_ci

__all__ = [
    "SHIFT_MIN_D",
    "SHIFT_MAX_P",
    "score_shift",
    "shift_message",
    "calibrate_site",
    "held_out_folds",
    "site_key",
    "save_site",
    "load_site",
]

log = logging.getLogger(__name__)

#: Smallest KS statistic that warns: a fifth of the images on the other side of some threshold.
SHIFT_MIN_D = 0.2
#: Largest p-value that warns.
SHIFT_MAX_P = 0.01
#: Fewest scores on each side for a test at all (below, the result says "too few").
SHIFT_MIN_N = 10


def score_shift(reference: Sequence[float], scores: Sequence[float], threshold: float | None = None) -> dict:
    """Do ``scores`` (probabilities of a new drop) depart from ``reference`` (validation's)?

    Returns ``{"shifted", "ks_statistic", "p_value", "n", "n_reference", "median_logit_shift",
    "positive_rate", "reference_positive_rate", "message"}``; the two positive rates (share of
    images at or above ``threshold``) are given when a threshold is.
    """
    from scipy.stats import ks_2samp

    ref = m.clipped_logits(np.asarray(reference, dtype=np.float64))
    new = m.clipped_logits(np.asarray(scores, dtype=np.float64))
    if not (np.isfinite(ref).all() and np.isfinite(new).all()):
        raise ValueError("scores must be finite probabilities")
    result: dict = {
        "n": int(new.size),
        "n_reference": int(ref.size),
        "min_d": SHIFT_MIN_D,
        "max_p": SHIFT_MAX_P,
    }
    if new.size < SHIFT_MIN_N or ref.size < SHIFT_MIN_N:
        result.update(
            shifted=None,
            ks_statistic=None,
            p_value=None,
            median_logit_shift=None,
            message=f"too few scores to test for a shift ({new.size} new, {ref.size} reference; need {SHIFT_MIN_N})",
        )
        return result
    test = ks_2samp(new, ref)
    result.update(
        ks_statistic=float(test.statistic),
        p_value=float(test.pvalue),
        median_logit_shift=float(np.median(new) - np.median(ref)),
    )
    if threshold is not None:
        logit_t = float(m.clipped_logits(np.array([threshold]))[0])
        result.update(
            threshold=float(threshold),
            positive_rate=float(np.mean(new >= logit_t)),
            reference_positive_rate=float(np.mean(ref >= logit_t)),
        )
    result["shifted"] = bool(result["ks_statistic"] >= SHIFT_MIN_D and result["p_value"] < SHIFT_MAX_P)
    result["message"] = shift_message(result)
    return result


def shift_message(shift: dict) -> str:
    """One line a user reads: what moved and what it means for the operating point."""
    if shift.get("shifted") is None:
        return shift["message"]
    detail = (
        f"KS D={shift['ks_statistic']:.2f} (p={shift['p_value']:.1g}), median logit {shift['median_logit_shift']:+.2f}"
        + (
            f", {shift['positive_rate']:.0%} of images called melanoma vs {shift['reference_positive_rate']:.0%} on validation"
            if "positive_rate" in shift
            else ""
        )
    )
    if not shift["shifted"]:
        return f"no score shift against validation ({detail})"
    return (
        "SCORE SHIFT: these images do not score like the validation images "
        f"({detail}); the validated sensitivity/specificity do not hold here. "
        "Calibrate the threshold on labelled cases of this site (python -m training calibrate-site) before relying on it."
    )


def held_out_folds(lesion_ids: Sequence[str], labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per image: whole lesions per fold, melanoma lesions spread evenly over folds."""
    lesions = np.asarray(lesion_ids)
    unique, first = np.unique(lesions, return_index=True)
    lesion_label = np.array([labels[lesions == lesion].max() for lesion in unique])
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for cls in (1, 0):
        members = unique[lesion_label == cls]
        for position, lesion in enumerate(rng.permutation(members)):
            fold_of[str(lesion)] = position % k
    return np.array([fold_of[str(lesion)] for lesion in lesions])


def calibrate_site(
    labels: Sequence[int],
    scores: Sequence[float],
    lesion_ids: Sequence[str],
    *,
    strategy: str = "sensitivity",
    target_sensitivity: float = 0.85,
    n_boot: int = 1000,
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """Re-choose the operating threshold on a labelled drop of one site.

    ``threshold`` is chosen on all of the drop (what ``predict --site`` then uses), by the same
    rule evaluate uses on validation; ``threshold_ci`` resamples lesions and re-chooses; and
    ``held_out`` is the honest estimate of what such a calibration achieves on that site's
    unseen cases: in ``folds`` lesion-grouped folds, the threshold is chosen on the others and
    applied to the fold (the pooled out-of-fold sensitivity and specificity, with the counts).
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos < folds or (y.size - n_pos) < folds:
        raise ValueError(
            f"site calibration needs at least {folds} melanoma and {folds} other images, got {n_pos} and {y.size - n_pos}"
        )
    threshold = m.choose_threshold(y, s, strategy, target_sensitivity)
    ci = lesion_bootstrap_ci(
        y,
        s,
        np.asarray(lesion_ids),
        lambda yy, ss: m.choose_threshold(yy, ss, strategy, target_sensitivity),
        n_boot=n_boot,
        seed=seed,
    )
    fold = held_out_folds(lesion_ids, y, folds, seed)
    called = np.zeros_like(y)
    for k in range(folds):
        inside = fold == k
        fold_threshold = m.choose_threshold(y[~inside], s[~inside], strategy, target_sensitivity)
        called[inside] = s[inside] >= fold_threshold
    tp, fn = int(((called == 1) & (y == 1)).sum()), int(((called == 0) & (y == 1)).sum())
    tn, fp = int(((called == 0) & (y == 0)).sum()), int(((called == 1) & (y == 0)).sum())
    at = m.binary_metrics(y, s, threshold)
    return {
        "threshold": threshold,
        "threshold_ci": [ci.low, ci.high],
        "strategy": strategy,
        "target_sensitivity": target_sensitivity if strategy == "sensitivity" else None,
        "n_images": int(y.size),
        "n_melanoma": n_pos,
        "n_lesions": len(set(map(str, lesion_ids))),
        "in_sample": {"sensitivity": at["sensitivity"], "specificity": at["specificity"]},
        "held_out": {
            "folds": folds,
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "tp": tp,
            "fn": fn,
            "tn": tn,
            "fp": fp,
        },
        "n_boot": n_boot,
        "seed": seed,
    }


_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def site_key(name: str) -> str:
    """The run-folder key of a site's calibration; the name is checked, never used as a path as is."""
    if not _SITE_NAME.match(name or "") or ".." in name:
        raise ValueError(
            f"site name must be 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit), got {name!r}"
        )
    return f"sites/{name}.json"


def save_site(run, name: str, record: dict) -> str:
    """Keep a site's calibration with the model (``sites/<name>.json`` in the run folder)."""
    key = site_key(name)
    run.write_bytes(key, json.dumps({"site": name, **record}, indent=2, allow_nan=False).encode())
    return run.uri(key)


def load_site(run, name: str) -> dict:
    key = site_key(name)
    if not run.exists(key):
        known = sorted(
            k[len("sites/") : -len(".json")] for k in run.list_keys("sites/") if k.endswith(".json")
        )
        raise ValueError(
            f"no calibration for site {name!r} in this run (calibrated sites: {known or 'none'}); "
            "run python -m training calibrate-site first"
        )
    return json.loads(run.read_bytes(key))
