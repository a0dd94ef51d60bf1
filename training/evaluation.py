"""Evaluation of model predictions: threshold chosen on validation, reported on test.

The metrics document is assembled here; the parts have their own modules:
:mod:`training.evaluation_rows` (the input rows: columns, CSV parsing, checks),
:mod:`training.evaluation_set` (one set's block at a threshold) and
:mod:`training.evaluation_external` (an external set's block, with score shift and site
calibration).

Input rows (one per image, e.g. from :func:`training.evaluation_rows.read_predictions_csv`)
carry ``image_id``, ``lesion_id``, ``split`` (train / val / test / external), ``label``
(1 melanoma, 0 other), ``dx``, ``probability``, ``age`` (float or None), ``sex``,
``localization`` and ``source``.
Validation rows only choose the threshold; test rows are what is reported. Rows with split
``external`` are grouped by ``source`` into external sets, next to the sets passed in
``external=``.

metrics.json schema (the dict returned by :func:`evaluate_predictions`)
-----------------------------------------------------------------------
Ratios with a zero denominator, and AUROC/AUPRC of a one-class set, are ``null``.
An *estimate* is ``{"value", "ci_low", "ci_high"}``: a 95% percentile bootstrap interval
resampling lesions (all images of a drawn lesion together), ``null`` bounds when it
cannot be computed. *binary* is the dict of :func:`training.metrics.binary_metrics`:
``threshold, n, accuracy, sensitivity, specificity, ppv, npv, f1, tn, fp, fn, tp``.

- ``schema_version``: 2 (2 added ``scores``).
- ``scores``: ``{"pooling": "none" | "lesion", "rule", "views"}``: what every number below is
  computed on. ``views``: 1, or 8 when each image's probability is already the mean over its
  dihedral views (:mod:`training.tta`; scorers of the model read it from here).
  ``"lesion"`` replaces each image's probability by its lesion's pooled score
  (:func:`training.metrics.lesion_pooled_scores`, within each set) before the threshold is
  chosen and everything is measured; the rows stay one per image. With ``"lesion"`` it
  also holds ``per_image``: ``{"val": {"auroc", "auprc"}, "test": {"auroc", "auprc"}}``
  (test as estimates) of the unpooled probabilities, for comparison.
- ``counts``: ``{"train"|"val"|"test": {"images", "lesions", "melanoma"}, "external":
  {name: {...}}}``.
- ``lesions_in_multiple_splits``: number of lesion ids found in more than one of
  train/val/test (should be 0: otherwise test results are leaked); ``warnings``: list of
  human-readable strings (empty when nothing is wrong).
- ``threshold``: ``{"value", "strategy", "target_sensitivity"`` (null unless strategy is
  "sensitivity"), ``"chosen_on": "val"``, ``"val"``: binary at the threshold plus
  ``auroc``, ``auprc``, ``prevalence``, ``n_images``, ``n_lesions``}.
- ``test``: a *set block* at the validation threshold:

  - ``n_images``, ``n_lesions``, ``n_melanoma``, ``prevalence``;
  - ``auroc``, ``auprc``: estimates; ``sensitivity``, ``specificity``: estimates at the
    chosen threshold;
  - ``at_threshold``: binary at the chosen threshold; ``at_0.5``: binary at 0.5;
  - ``calibration``: ``{"brier", "ece", "n_bins", "curve": {"bin_lower", "bin_upper",
    "mean_predicted", "fraction_positive", "count"}}`` (non-empty equal-width bins);
  - ``subgroups``: ``{"sex"|"age_band"|"localization": {value: {"n", "n_melanoma",
    "auroc", "sensitivity", "specificity", "small"}}}`` at the chosen threshold;
  - ``bootstrap``: ``{"method", "n_boot", "alpha", "seed", "n_skipped": {metric: int}}``;
  - ``curves`` (test only): ``{"roc": {"fpr", "tpr"}, "pr": {"recall", "precision"},
    "score_histogram": {"edges", "melanoma", "other"}}`` for the plots;
  - ``note``: present when the set holds a single class.

- ``optimistic_test_youden``: ``{"optimistic": true, "chosen_on": "test", "strategy":
  "youden", "warning", "threshold", "at_threshold": binary}``: the threshold picked on
  the test set itself, as the reference did. Biased upward; for comparison only.
- ``external``: ``{name: set block}`` (without ``curves``) at the validation threshold.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from training import metrics as m
from training.evaluation_external import external_set_block
from training.evaluation_rows import partition_rows, row_counts, set_arrays
from training.evaluation_set import estimate, evaluate_set, set_ranking, set_ranking_with_ci
from training.tta import VIEWS, views_of

__all__ = [
    "SCHEMA_VERSION",
    "POOLING",
    "POOLING_RULES",
    "OPTIMISTIC_WARNING",
    "decision_scores",
    "pool_rows_by_lesion",
    "evaluate_predictions",
    "write_evaluation",
    "xcom_payload",
]

SCHEMA_VERSION = 2
#: How image probabilities become decision scores: as they are, or pooled per lesion.
POOLING = ("none", "lesion")
POOLING_RULES = {
    "none": "each image scored on its own",
    "lesion": "each image scored by its lesion: sigmoid of the mean logit of the lesion's images in the same set",
}
OPTIMISTIC_WARNING = (
    "Threshold chosen on the test set itself (the reference's method). The metrics at it "
    "are optimistically biased and are not the result; see 'test' for the threshold "
    "chosen on validation."
)


def decision_scores(
    image_ids: Sequence[str], probabilities: Sequence[float], lesion_ids: Sequence[str], pooling: str
) -> dict[str, float]:
    """image_id -> the score the threshold applies to under ``pooling`` (one set's images)."""
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    scores = np.asarray(probabilities, dtype=np.float64)
    if pooling == "lesion":
        scores = m.lesion_pooled_scores(scores, np.asarray(lesion_ids, dtype=object))
    return dict(zip(image_ids, scores.tolist()))


def pool_rows_by_lesion(rows: Sequence[dict], name: str) -> list[dict]:
    """Copies of ``rows`` whose ``probability`` is the lesion-pooled score of
    :func:`training.metrics.lesion_pooled_scores`; the model's own output is kept as
    ``image_probability``. Pooling stays within ``rows`` (one set)."""
    if not rows:
        return []
    _, scores, lesions = set_arrays(rows, name)
    pooled = m.lesion_pooled_scores(scores, lesions)
    return [
        {**row, "image_probability": row["probability"], "probability": float(p)}
        for row, p in zip(rows, pooled)
    ]


def _pool_by_lesion(
    internal: dict[str, list[dict]], externals: dict[str, list[dict]], *, n_boot: int, seed: int
) -> tuple[dict, dict[str, list[dict]], dict[str, list[dict]]]:
    """(per-image val/test ranking for comparison, internal and external rows with lesion-pooled scores)."""
    val_rows, test_rows = internal["val"], internal["test"]
    per_image = {
        "val": {
            key: value for key, value in set_ranking(val_rows, "val").items() if key in ("auroc", "auprc")
        },
        "test": {
            key: estimate(*value)
            for key, value in set_ranking_with_ci(test_rows, "test", n_boot=n_boot, seed=seed).items()
        },
    }
    internal = {split: pool_rows_by_lesion(split_rows, split) for split, split_rows in internal.items()}
    externals = {
        name: pool_rows_by_lesion(set_rows, f"external set {name!r}") for name, set_rows in externals.items()
    }
    return per_image, internal, externals


def _leaked_lesions(internal: dict[str, list[dict]]) -> list[str]:
    """Lesion ids found in more than one of train/val/test (sorted)."""
    lesion_splits: dict[str, set[str]] = defaultdict(set)
    for split, split_rows in internal.items():
        for row in split_rows:
            lesion_splits[str(row["lesion_id"])].add(split)
    return sorted(lesion for lesion, splits in lesion_splits.items() if len(splits) > 1)


def _threshold_on_val(val_rows: Sequence[dict], strategy: str, target_sensitivity: float) -> dict:
    """The ``threshold`` block: chosen on validation, with validation's metrics at it."""
    val_labels, val_scores, val_lesions = set_arrays(val_rows, "val")
    try:
        threshold = m.choose_threshold(val_labels, val_scores, strategy, target_sensitivity)
        val_ranking = m.ranking_metrics(val_labels, val_scores)
    except ValueError as exc:
        raise ValueError(f"val split: {exc}") from None
    return {
        "value": threshold,
        "strategy": strategy,
        "target_sensitivity": target_sensitivity if strategy == "sensitivity" else None,
        "chosen_on": "val",
        "val": {
            **m.binary_metrics(val_labels, val_scores, threshold),
            **val_ranking,
            "n_images": int(val_labels.size),
            "n_lesions": len(set(val_lesions.tolist())),
        },
    }


def _leak_warnings(leaked: list[str]) -> list[str]:
    """The ``warnings`` list, started with the leak between splits when there is one."""
    if not leaked:
        return []
    return [
        f"{len(leaked)} lesion(s) appear in more than one of train/val/test, e.g. "
        f"{', '.join(leaked[:5])}: the test set is not independent"
    ]


def _optimistic_test_youden(test_rows: Sequence[dict]) -> dict:
    """The ``optimistic_test_youden`` block: the reference's threshold, picked on the test set itself."""
    test_labels, test_scores, _ = set_arrays(test_rows, "test")
    try:
        optimistic = m.choose_threshold(test_labels, test_scores, "youden")
    except ValueError as exc:
        raise ValueError(f"test split: {exc}") from None
    return {
        "optimistic": True,
        "chosen_on": "test",
        "strategy": "youden",
        "warning": OPTIMISTIC_WARNING,
        "threshold": optimistic,
        "at_threshold": m.binary_metrics(test_labels, test_scores, optimistic),
    }


def _counts(internal: dict[str, list[dict]], externals: dict[str, list[dict]]) -> dict:
    return {
        **{split: row_counts(split_rows) for split, split_rows in internal.items()},
        "external": {name: row_counts(set_rows) for name, set_rows in externals.items()},
    }


def _external_blocks(
    externals: dict[str, list[dict]],
    threshold: float,
    val_scores: np.ndarray,
    warnings: list[str],
    strategy: str,
    target_sensitivity: float,
    common: dict,
) -> dict:
    """``{name: external set block}`` at the validation threshold; shifts are added to ``warnings``."""
    return {
        name: external_set_block(
            set_rows,
            name,
            threshold,
            val_scores,
            warnings,
            strategy=strategy,
            target_sensitivity=target_sensitivity,
            **common,
        )
        for name, set_rows in externals.items()
    }


def evaluate_predictions(
    rows: Sequence[dict],
    *,
    strategy: str = "youden",
    target_sensitivity: float = 0.95,
    n_boot: int = 1000,
    external: Mapping[str, Sequence[dict]] | None = None,
    seed: int = 0,
    min_subgroup_count: int = 30,
    pooling: str = "none",
    views: int = 1,
) -> dict:
    """Build the metrics document described in the module docstring.

    Parameters
    ----------
    rows : prediction rows (see the module docstring); must include val and test rows,
        each set holding both classes.
    strategy, target_sensitivity : passed to :func:`training.metrics.choose_threshold`
        on the validation rows.
    n_boot : bootstrap resamples per interval (lesion-level).
    external : optional ``{name: rows}`` of external test sets.
    seed : bootstrap seed.
    min_subgroup_count : subgroups smaller than this are flagged ``small``.
    pooling : one of :data:`POOLING`; see ``scores`` in the module docstring.
    views : how many views the rows' probabilities average (recorded, see ``scores``).
    """
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    internal, externals = partition_rows(rows, external)
    val_rows, test_rows = internal["val"], internal["test"]
    if not val_rows or not test_rows:
        raise ValueError(f"need val and test rows, got {len(val_rows)} val and {len(test_rows)} test")
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views}")
    scores_block: dict = {"pooling": pooling, "rule": POOLING_RULES[pooling], "views": views}
    if pooling == "lesion":
        scores_block["per_image"], internal, externals = _pool_by_lesion(
            internal, externals, n_boot=n_boot, seed=seed
        )
        val_rows, test_rows = internal["val"], internal["test"]
    leaked = _leaked_lesions(internal)
    warnings = _leak_warnings(leaked)

    threshold_block = _threshold_on_val(val_rows, strategy, target_sensitivity)
    threshold, val_scores = threshold_block["value"], set_arrays(val_rows, "val")[1]
    optimistic = _optimistic_test_youden(test_rows)

    common = {"n_boot": n_boot, "seed": seed, "min_subgroup_count": min_subgroup_count}
    return {
        "schema_version": SCHEMA_VERSION,
        "scores": scores_block,
        "counts": _counts(internal, externals),
        "lesions_in_multiple_splits": len(leaked),
        "warnings": warnings,
        "threshold": threshold_block,
        "test": evaluate_set(test_rows, "test", threshold, with_curves=True, **common),
        "optimistic_test_youden": optimistic,
        # Shifts of the external sets are added to ``warnings`` (the same list) as they are built.
        "external": _external_blocks(
            externals, threshold, val_scores, warnings, strategy, target_sensitivity, common
        ),
    }


def write_evaluation(metrics: dict, out_dir: Path, rows: Sequence[dict] | None = None) -> list[Path]:
    """Write ``metrics.json`` and the plots of :func:`training.plots.plot_all` to ``out_dir``.

    ``rows``, when given, are passed to ``plot_all`` (curves drawn from the raw test
    scores); otherwise the plots use the curve data stored in ``metrics``. Returns the
    written paths, ``metrics.json`` first. The JSON is strict (no NaN/Infinity).
    """
    from training.plots import plot_all  # matplotlib only when plots are written

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    json_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return [json_path, *plot_all(metrics, rows, out_dir)]


def xcom_payload(metrics: dict, metrics_uri: str) -> dict:
    """The small summary handed to downstream Airflow tasks; the full document stays at
    ``metrics_uri``.

    Returns ``{"threshold", "strategy", "target_sensitivity", "chosen_on", "pooling", "views", "val":
    {"sensitivity", "specificity"}, "test": {"auroc", "auprc", "sensitivity",
    "specificity"}, "metrics_uri"}``; test sensitivity/specificity are at the validation
    threshold.
    """
    choice = metrics["threshold"]
    test = metrics["test"]
    return {
        "threshold": choice["value"],
        "strategy": choice["strategy"],
        "target_sensitivity": choice["target_sensitivity"],
        "chosen_on": choice["chosen_on"],
        "pooling": metrics["scores"]["pooling"],
        "views": views_of(metrics),
        "val": {key: choice["val"][key] for key in ("sensitivity", "specificity")},
        "test": {key: test[key]["value"] for key in ("auroc", "auprc", "sensitivity", "specificity")},
        "metrics_uri": metrics_uri,
    }
