"""Evaluation of model predictions: threshold chosen on validation, reported on test.

Input rows (one per image, e.g. from :func:`read_predictions_csv`) carry ``image_id``,
``lesion_id``, ``split`` (train / val / test / external), ``label`` (1 melanoma, 0 other),
``dx``, ``probability``, ``age`` (float or None), ``sex``, ``localization`` and ``source``.
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
- ``scores``: ``{"pooling": "none" | "lesion", "rule"}``: what every number below is
  computed on. ``"lesion"`` replaces each image's probability by its lesion's pooled score
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

import csv
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from training import metrics as m
from training.shift import calibrate_site, score_shift

SCHEMA_VERSION = 2
#: How image probabilities become decision scores: as they are, or pooled per lesion.
POOLING = ("none", "lesion")
POOLING_RULES = {
    "none": "each image scored on its own",
    "lesion": "each image scored by its lesion: sigmoid of the mean logit of the lesion's images in the same set",
}
COLUMNS = (
    "image_id",
    "lesion_id",
    "split",
    "label",
    "dx",
    "probability",
    "age",
    "sex",
    "localization",
    "source",
)
INTERNAL_SPLITS = ("train", "val", "test")
EXTERNAL_SPLIT = "external"
ALPHA = 0.05
CALIBRATION_BINS = 10
OPTIMISTIC_WARNING = (
    "Threshold chosen on the test set itself (the reference's method). The metrics at it "
    "are optimistically biased and are not the result; see 'test' for the threshold "
    "chosen on validation."
)


def _optional_text(value: str) -> str | None:
    value = value.strip()
    return value or None


def read_predictions_csv(source: str | os.PathLike | bytes) -> list[dict]:
    """Parse a predictions CSV (a path, or its bytes) into typed rows.

    Returns one dict per row with the :data:`COLUMNS`: ``label`` int in {0, 1},
    ``probability`` float (NaN is kept; evaluation refuses it with the image ids), ``age``
    float or None, ``sex``/``localization``/``dx``/``source`` str or None when empty, the
    ids and ``split`` as str. Missing columns or unparsable values raise ``ValueError``
    with the line number.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"predictions CSV lacks column(s) {', '.join(missing)}")
    rows = []
    for raw in reader:
        line = reader.line_num
        try:
            label = int(raw["label"])
            probability = float(raw["probability"])
            age = float(raw["age"]) if raw["age"].strip() else None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"predictions CSV line {line}: {exc}") from None
        if label not in (0, 1):
            raise ValueError(f"predictions CSV line {line}: label must be 0 or 1, got {label}")
        rows.append(
            {
                "image_id": raw["image_id"],
                "lesion_id": raw["lesion_id"],
                "split": raw["split"].strip(),
                "label": label,
                "dx": _optional_text(raw["dx"]),
                "probability": probability,
                "age": age,
                "sex": _optional_text(raw["sex"]),
                "localization": _optional_text(raw["localization"]),
                "source": _optional_text(raw["source"]),
            }
        )
    return rows


def _arrays(rows: Sequence[dict], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (n,), probabilities (n,), lesion ids (n,) of one set, checked."""
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        seen, dupes = set(), []
        for i in ids:
            if i in seen:
                dupes.append(i)
            seen.add(i)
        raise ValueError(f"{name}: image_id repeated: {', '.join(map(str, dupes[:5]))}")
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    scores = np.array([float(r["probability"]) for r in rows], dtype=np.float64)
    bad = [r["image_id"] for r, p in zip(rows, scores) if not math.isfinite(p)]
    if bad:
        raise ValueError(
            f"{name}: {len(bad)} row(s) have a non-finite probability, e.g. {', '.join(map(str, bad[:5]))}"
        )
    missing = [r["image_id"] for r in rows if r.get("lesion_id") in (None, "")]
    if missing:
        # Lumping them into one pseudo-lesion would distort the lesion bootstrap.
        raise ValueError(
            f"{name}: {len(missing)} row(s) lack a lesion_id, e.g. {', '.join(map(str, missing[:5]))}"
        )
    lesions = np.array([str(r["lesion_id"]) for r in rows], dtype=object)
    return labels, scores, lesions


def _count(rows: Sequence[dict]) -> dict:
    return {
        "images": len(rows),
        "lesions": len({r["lesion_id"] for r in rows}),
        "melanoma": sum(int(r["label"]) for r in rows),
    }


def _partition(
    rows: Iterable[dict], external: Mapping[str, Sequence[dict]] | None
) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    internal: dict[str, list[dict]] = {split: [] for split in INTERNAL_SPLITS}
    from_rows: dict[str, list[dict]] = defaultdict(list)
    unknown = set()
    for row in rows:
        split = row["split"]
        if split in internal:
            internal[split].append(row)
        elif split == EXTERNAL_SPLIT:
            from_rows[row.get("source") or EXTERNAL_SPLIT].append(row)
        else:
            unknown.add(split)
    if unknown:
        raise ValueError(
            f"unknown split value(s) {sorted(map(str, unknown))}; expected {INTERNAL_SPLITS + (EXTERNAL_SPLIT,)}"
        )
    externals = dict(from_rows)
    for name, set_rows in (external or {}).items():
        if name in externals:
            raise ValueError(f"external set {name!r} given both in rows (split 'external') and in external=")
        externals[name] = list(set_rows)
    return internal, externals


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
    _, scores, lesions = _arrays(rows, name)
    pooled = m.lesion_pooled_scores(scores, lesions)
    return [
        {**row, "image_probability": row["probability"], "probability": float(p)}
        for row, p in zip(rows, pooled)
    ]


def _ranking(rows: Sequence[dict], name: str) -> dict:
    labels, scores, _ = _arrays(rows, name)
    try:
        return m.ranking_metrics(labels, scores)
    except ValueError as exc:
        raise ValueError(f"{name} split: {exc}") from None


def _ranking_with_ci(rows: Sequence[dict], name: str, *, n_boot: int, seed: int) -> dict:
    """``{"auroc"|"auprc": (value, BootstrapCI)}`` of one set, lesion bootstrap."""
    labels, scores, lesions = _arrays(rows, name)
    point = _ranking(rows, name)
    fns = {"auroc": roc_auc_score, "auprc": average_precision_score}
    return {
        key: (
            point[key],
            m.lesion_bootstrap_ci(labels, scores, lesions, fn, n_boot=n_boot, alpha=ALPHA, seed=seed),
        )
        for key, fn in fns.items()
    }


def _estimate(value: float | None, ci: m.BootstrapCI | None) -> dict:
    return {
        "value": value,
        "ci_low": ci.low if ci else None,
        "ci_high": ci.high if ci else None,
    }


def _evaluate_set(
    rows: Sequence[dict],
    name: str,
    threshold: float,
    *,
    n_boot: int,
    seed: int,
    min_subgroup_count: int,
    with_curves: bool,
) -> dict:
    """The set block of the module docstring, at ``threshold``."""
    if not rows:
        raise ValueError(f"{name}: no rows")
    labels, scores, lesions = _arrays(rows, name)
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
    cis: dict[str, m.BootstrapCI | None] = {
        "auroc": None,
        "auprc": None,
        "sensitivity": None,
        "specificity": None,
    }
    if both_classes:
        point.update(m.ranking_metrics(labels, scores))
        metric_fns = {
            "auroc": roc_auc_score,
            "auprc": average_precision_score,
            "sensitivity": lambda y, s: m.binary_metrics(y, s, threshold)["sensitivity"],
            "specificity": lambda y, s: m.binary_metrics(y, s, threshold)["specificity"],
        }
        # Same seed for every metric: the intervals come from the same resamples.
        cis = {
            key: m.lesion_bootstrap_ci(labels, scores, lesions, fn, n_boot=n_boot, alpha=ALPHA, seed=seed)
            for key, fn in metric_fns.items()
        }
    else:
        point.update(auroc=None, auprc=None)
        block["note"] = (
            f"only class {1 if n_pos else 0} present: AUROC/AUPRC are undefined and no bootstrap "
            "interval is computed"
        )
    for key in ("auroc", "auprc", "sensitivity", "specificity"):
        block[key] = _estimate(point[key], cis[key])
    block["at_threshold"] = at_threshold
    block["at_0.5"] = m.binary_metrics(labels, scores, 0.5)
    block["calibration"] = {
        "brier": m.brier_score(labels, scores),
        "ece": m.expected_calibration_error(labels, scores, CALIBRATION_BINS),
        "n_bins": CALIBRATION_BINS,
        "curve": m.reliability_curve(labels, scores, CALIBRATION_BINS),
    }
    block["subgroups"] = m.subgroup_metrics(
        labels,
        scores,
        {
            "sex": [r.get("sex") for r in rows],
            "age_band": m.age_bands([r.get("age") for r in rows]),
            "localization": [r.get("localization") for r in rows],
        },
        threshold,
        min_count=min_subgroup_count,
    )
    block["bootstrap"] = {
        "method": "percentile; lesions resampled with replacement, all images of a drawn lesion together",
        "n_boot": n_boot,
        "alpha": ALPHA,
        "seed": seed,
        "n_skipped": {key: ci.n_skipped for key, ci in cis.items() if ci is not None},
    }
    if with_curves and both_classes:
        block["curves"] = m.curve_points(labels, scores)
    return block


def _pool_by_lesion(
    internal: dict[str, list[dict]], externals: dict[str, list[dict]], *, n_boot: int, seed: int
) -> tuple[dict, dict[str, list[dict]], dict[str, list[dict]]]:
    """(per-image val/test ranking for comparison, internal and external rows with lesion-pooled scores)."""
    val_rows, test_rows = internal["val"], internal["test"]
    per_image = {
        "val": {key: value for key, value in _ranking(val_rows, "val").items() if key in ("auroc", "auprc")},
        "test": {
            key: _estimate(*value)
            for key, value in _ranking_with_ci(test_rows, "test", n_boot=n_boot, seed=seed).items()
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
    val_labels, val_scores, val_lesions = _arrays(val_rows, "val")
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
    """
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    internal, externals = _partition(rows, external)
    val_rows, test_rows = internal["val"], internal["test"]
    if not val_rows or not test_rows:
        raise ValueError(f"need val and test rows, got {len(val_rows)} val and {len(test_rows)} test")
    scores_block: dict = {"pooling": pooling, "rule": POOLING_RULES[pooling]}
    if pooling == "lesion":
        scores_block["per_image"], internal, externals = _pool_by_lesion(
            internal, externals, n_boot=n_boot, seed=seed
        )
        val_rows, test_rows = internal["val"], internal["test"]
    warnings = []
    leaked = _leaked_lesions(internal)
    if leaked:
        warnings.append(
            f"{len(leaked)} lesion(s) appear in more than one of train/val/test, e.g. "
            f"{', '.join(leaked[:5])}: the test set is not independent"
        )

    threshold_block = _threshold_on_val(val_rows, strategy, target_sensitivity)
    threshold, val_scores = threshold_block["value"], _arrays(val_rows, "val")[1]
    test_labels, test_scores, _ = _arrays(test_rows, "test")
    try:
        optimistic = m.choose_threshold(test_labels, test_scores, "youden")
    except ValueError as exc:
        raise ValueError(f"test split: {exc}") from None

    common = {"n_boot": n_boot, "seed": seed, "min_subgroup_count": min_subgroup_count}
    return {
        "schema_version": SCHEMA_VERSION,
        "scores": scores_block,
        "counts": {
            **{split: _count(split_rows) for split, split_rows in internal.items()},
            "external": {name: _count(set_rows) for name, set_rows in externals.items()},
        },
        "lesions_in_multiple_splits": len(leaked),
        "warnings": warnings,
        "threshold": threshold_block,
        "test": _evaluate_set(test_rows, "test", threshold, with_curves=True, **common),
        "optimistic_test_youden": {
            "optimistic": True,
            "chosen_on": "test",
            "strategy": "youden",
            "warning": OPTIMISTIC_WARNING,
            "threshold": optimistic,
            "at_threshold": m.binary_metrics(test_labels, test_scores, optimistic),
        },
        "external": {
            name: _external_block(
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
        },
    }


def _external_block(
    rows: Sequence[dict],
    name: str,
    threshold: float,
    val_scores: np.ndarray,
    warnings: list[str],
    *,
    strategy: str,
    target_sensitivity: float,
    **common,
) -> dict:
    """An external set at the validation threshold, plus what tells whether that threshold holds there:
    its score distribution against validation's (:func:`training.shift.score_shift`) and, since an
    external set has labels, what re-choosing the threshold on that site would give on its unseen
    cases (:func:`training.shift.calibrate_site`, out-of-fold). Shifts are added to ``warnings``.
    """
    block = _evaluate_set(rows, f"external set {name!r}", threshold, with_curves=False, **common)
    labels, scores, lesions = _arrays(rows, f"external set {name!r}")
    block["score_shift"] = score_shift(val_scores, scores, threshold)
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9)
    block["score_quantiles"] = {
        "q": list(quantiles),
        "val": np.quantile(val_scores, quantiles).tolist(),
        name: np.quantile(scores, quantiles).tolist(),
    }
    if block["score_shift"]["shifted"]:
        warnings.append(f"external set {name!r}: {block['score_shift']['message']}")
    try:
        block["site_calibration"] = calibrate_site(
            labels,
            scores,
            lesions,
            strategy=strategy,
            target_sensitivity=target_sensitivity,
            n_boot=common["n_boot"],
            seed=common["seed"],
        )
    except ValueError as error:
        block["site_calibration"] = {"skipped": str(error)}
    return block


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

    Returns ``{"threshold", "strategy", "target_sensitivity", "chosen_on", "pooling", "val":
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
        "val": {key: choice["val"][key] for key in ("sensitivity", "specificity")},
        "test": {key: test[key]["value"] for key in ("auroc", "auprc", "sensitivity", "specificity")},
        "metrics_uri": metrics_uri,
    }
