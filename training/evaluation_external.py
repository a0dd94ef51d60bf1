"""An external set's block of ``metrics.json``: the set block at the validation threshold, plus
whether that threshold holds there (score shift against validation, site calibration).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from training.evaluation_rows import set_arrays
from training.evaluation_set import evaluate_set
from training.shift import calibrate_site, score_shift

__all__ = ["external_set_block"]


def external_set_block(
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

    ``common``: ``n_boot``, ``seed`` and ``min_subgroup_count`` of
    :func:`training.evaluation_set.evaluate_set`.
    """
    block = evaluate_set(rows, f"external set {name!r}", threshold, with_curves=False, **common)
    labels, scores, lesions = set_arrays(rows, f"external set {name!r}")
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
