"""Tests of training.metrics, training.bootstrap, training.calibration and training.subgroups:
hand-computed values, cross-checks against scikit-learn, degenerate inputs, threshold
strategies, the lesion bootstrap and subgroups."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from training import bootstrap, calibration, subgroups
from training import metrics as m

# Hand case. Sorted by score: 0.1- 0.2- 0.3- 0.35+ 0.4- 0.55+ 0.6- 0.7- 0.8+ 0.9+
LABELS = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.35, 0.55, 0.8, 0.9])


def test_binary_metrics_hand_case():
    # At 0.5: positives called at 0.55, 0.8, 0.9 (missed 0.35); negatives 0.6, 0.7 called.
    result = m.binary_metrics(LABELS, SCORES, 0.5)
    assert (result["tn"], result["fp"], result["fn"], result["tp"]) == (4, 2, 1, 3)
    assert all(type(result[k]) is int for k in ("tn", "fp", "fn", "tp", "n"))
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["sensitivity"] == pytest.approx(3 / 4)
    assert result["specificity"] == pytest.approx(4 / 6)
    assert result["ppv"] == pytest.approx(3 / 5)
    assert result["npv"] == pytest.approx(4 / 5)
    assert result["f1"] == pytest.approx(6 / 9)


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.35, 0.5, 0.55, 0.75, 0.95])
def test_binary_metrics_match_sklearn(threshold):
    predicted = (SCORES >= threshold).astype(int)
    result = m.binary_metrics(LABELS, SCORES, threshold)
    expected = {
        "accuracy": accuracy_score(LABELS, predicted),
        "sensitivity": recall_score(LABELS, predicted, zero_division=np.nan),
        "specificity": recall_score(LABELS, predicted, pos_label=0, zero_division=np.nan),
        "ppv": precision_score(LABELS, predicted, zero_division=np.nan),
        "npv": precision_score(LABELS, predicted, pos_label=0, zero_division=np.nan),
        "f1": f1_score(LABELS, predicted, zero_division=np.nan),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(_nan_to_none(value)), key


def test_binary_metrics_score_equal_to_threshold_is_positive():
    result = m.binary_metrics([0, 1], [0.4, 0.55], 0.55)
    assert result["tp"] == 1 and result["fp"] == 0


def test_binary_metrics_zero_denominators_are_none():
    # Nothing called positive: PPV undefined, F1 defined (0) because melanoma exists.
    nothing_called = m.binary_metrics(LABELS, SCORES, 0.95)
    assert nothing_called["ppv"] is None
    assert nothing_called["f1"] == 0.0
    assert nothing_called["npv"] == pytest.approx(6 / 10)
    # No melanoma and nothing called positive: sensitivity and F1 undefined.
    no_melanoma = m.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert no_melanoma["sensitivity"] is None
    assert no_melanoma["ppv"] is None
    assert no_melanoma["f1"] is None
    assert no_melanoma["specificity"] == 1.0
    # Only melanoma, all called: specificity and NPV undefined.
    only_melanoma = m.binary_metrics([1, 1], [0.7, 0.8], 0.5)
    assert only_melanoma["specificity"] is None and only_melanoma["npv"] is None
    assert only_melanoma["sensitivity"] == 1.0


def test_ranking_metrics_hand_case_and_sklearn():
    result = m.ranking_metrics(LABELS, SCORES)
    # Pairs (melanoma, other) ranked correctly: 0.35 beats 3, 0.55 beats 4, 0.8 and 0.9 beat 6.
    assert result["auroc"] == pytest.approx(19 / 24)
    assert result["auroc"] == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert result["auprc"] == pytest.approx(average_precision_score(LABELS, SCORES))
    # AP by hand: recall steps at 0.9 (P=1), 0.8 (P=1), 0.55 (P=3/5), 0.35 (P=4/7).
    assert result["auprc"] == pytest.approx((1 + 1 + 3 / 5 + 4 / 7) / 4)
    assert result["prevalence"] == pytest.approx(0.4)


def test_all_equal_scores():
    flat = np.full(LABELS.shape, 0.3)
    assert m.ranking_metrics(LABELS, flat)["auroc"] == 0.5
    # Youden is 0 everywhere: the +inf ROC threshold wins the tie and is clipped to 1.0.
    assert m.choose_threshold(LABELS, flat, "youden") == 1.0
    assert m.choose_threshold(LABELS, flat, "sensitivity") == 0.3
    assert m.choose_threshold(LABELS, flat, "f1") == 0.3


@pytest.mark.parametrize(
    "call",
    [
        lambda y, s: m.ranking_metrics(y, s),
        lambda y, s: m.choose_threshold(y, s),
        lambda y, s: bootstrap.lesion_bootstrap_ci(y, s, np.arange(len(y)), roc_auc_score, n_boot=5),
    ],
)
def test_one_class_is_refused_with_a_clear_message(call):
    with pytest.raises(ValueError, match="needs both classes, but all 4 labels are 0"):
        call(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4]))


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"NaN value\(s\) \(first at index 1\)"):
        m.binary_metrics([0, 1, 0], [0.1, np.nan, 0.3], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        m.ranking_metrics([0, 1], [np.nan, 0.2])
    with pytest.raises(ValueError, match="infinite"):
        m.ranking_metrics([0, 1], [np.inf, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        m.binary_metrics([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="1-D"):
        m.ranking_metrics([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="labels must be 0 or 1, found 2"):
        m.ranking_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        m.binary_metrics([], [], 0.5)
    with pytest.raises(ValueError, match="numeric"):
        m.binary_metrics([0, 1], [0.1, "high"], 0.5)
    with pytest.raises(ValueError, match="NaN"):  # a missing score converts to NaN
        m.binary_metrics([0, 1], [0.1, None], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration.brier_score([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="strategy"):
        m.choose_threshold(LABELS, SCORES, "accuracy")
    with pytest.raises(ValueError, match="target_sensitivity"):
        m.choose_threshold(LABELS, SCORES, "sensitivity", target_sensitivity=0.0)


def test_choose_threshold_hand_case():
    # Youden (TPR - FPR) is 0.5 at both 0.8 (TPR 2/4, FPR 0) and 0.35 (TPR 1, FPR 3/6):
    # the tie goes to the higher threshold.
    assert m.choose_threshold(LABELS, SCORES, "youden") == 0.8
    # Highest threshold meeting the target sensitivity.
    assert m.choose_threshold(LABELS, SCORES, "sensitivity", target_sensitivity=0.95) == 0.35
    assert m.choose_threshold(LABELS, SCORES, "sensitivity", target_sensitivity=0.75) == 0.55
    assert m.choose_threshold(LABELS, SCORES, "sensitivity", target_sensitivity=0.5) == 0.8
    # F1 = 2TP/(TP+FP+4): best at 0.35 with 8/11.
    assert m.choose_threshold(LABELS, SCORES, "f1") == 0.35


def _brute_force(labels, scores, objective):
    """(threshold, value): the highest threshold maximising objective(predicted), over
    every distinct score."""
    best, best_value = None, -math.inf
    for threshold in sorted(set(scores.tolist()), reverse=True):
        value = objective((scores >= threshold).astype(int))
        if value > best_value + 1e-12:
            best, best_value = threshold, value
    return best, best_value


@pytest.mark.parametrize("seed", range(5))
def test_choose_threshold_matches_sklearn_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = (0, 1)
    # Scores on a coarse grid: many ties between images and between candidate thresholds.
    scores = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 1)
    youden, youden_value = _brute_force(
        labels, scores, lambda p: recall_score(labels, p) + recall_score(labels, p, pos_label=0) - 1
    )
    assert youden_value > 0  # else the +inf candidate (clipped to 1.0) would win
    assert m.choose_threshold(labels, scores, "youden") == youden
    f1, _ = _brute_force(labels, scores, lambda p: f1_score(labels, p))
    assert m.choose_threshold(labels, scores, "f1") == f1
    for target in (0.5, 0.8, 0.95, 1.0):
        expected = max(
            t for t in set(scores.tolist()) if recall_score(labels, (scores >= t).astype(int)) >= target
        )
        assert m.choose_threshold(labels, scores, "sensitivity", target) == expected
        # The returned threshold really meets the target under binary_metrics' convention.
        assert m.binary_metrics(labels, scores, expected)["sensitivity"] >= target


# --- lesion bootstrap -------------------------------------------------------------------


def _lesion_data(n_lesions=40, seed=1):
    """Images with unique scores, 1 to 4 per lesion, label shared within a lesion."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_lesions)
    lesion_ids = np.repeat([f"L{i:03d}" for i in range(n_lesions)], sizes)
    lesion_labels = (np.arange(n_lesions) % 3 == 0).astype(int)
    labels = np.repeat(lesion_labels, sizes)
    scores = rng.random(len(labels)) * 0.7 + 0.3 * labels
    assert len(set(scores.tolist())) == len(scores)  # scores identify images
    return labels, scores, lesion_ids


def _split_lesions(resample_scores, scores, lesion_ids) -> list[str]:
    """Lesions whose images do not all appear the same number of times in a resample.

    A lesion-level resample takes each drawn lesion whole, so every image of a lesion is
    repeated exactly as often as the lesion was drawn (possibly zero times).
    """
    image_of_score = {score: i for i, score in enumerate(scores.tolist())}
    times = Counter(image_of_score[s] for s in resample_scores.tolist())
    per_lesion: dict[str, set[int]] = {}
    for image, lesion in enumerate(lesion_ids.tolist()):
        per_lesion.setdefault(lesion, set()).add(times.get(image, 0))
    return [lesion for lesion, counts in per_lesion.items() if len(counts) > 1]


def test_split_lesion_check_detects_image_resampling():
    # The check used below must fail on image-level resampling, or it proves nothing.
    labels, scores, lesion_ids = _lesion_data()
    rng = np.random.default_rng(0)
    image_resample = rng.integers(0, len(scores), len(scores))
    assert _split_lesions(scores[image_resample], scores, lesion_ids)


def test_lesion_bootstrap_never_splits_a_lesion():
    labels, scores, lesion_ids = _lesion_data()
    assert len(set(lesion_ids.tolist())) < len(lesion_ids)  # multi-image lesions exist
    resamples = []

    def spy(y, s):
        resamples.append((y.copy(), s.copy()))
        return float(roc_auc_score(y, s))

    ci = bootstrap.lesion_bootstrap_ci(labels, scores, lesion_ids, spy, n_boot=200, seed=3)
    assert len(resamples) == 200 - ci.n_skipped > 150
    label_of_score = dict(zip(scores.tolist(), labels.tolist()))
    image_of_score = {score: i for i, score in enumerate(scores.tolist())}
    n_lesions = len(set(lesion_ids.tolist()))
    for y, s in resamples:
        assert not _split_lesions(s, scores, lesion_ids)
        assert [label_of_score[v] for v in s.tolist()] == y.tolist()  # labels stay with their images
        # Each resample is n_lesions draws: summing the (uniform) repeat count of each
        # lesion's images gives the number of draws.
        times = Counter(image_of_score[v] for v in s.tolist())
        draws = {lesion_ids[image]: count for image, count in times.items()}
        assert sum(draws.values()) == n_lesions


def test_lesion_bootstrap_interval_properties():
    labels, scores, lesion_ids = _lesion_data(n_lesions=120)
    low, high = bootstrap.lesion_bootstrap_ci(labels, scores, lesion_ids, roc_auc_score, n_boot=300, seed=0)
    point = roc_auc_score(labels, scores)
    assert low <= point <= high
    assert high - low > 0
    again = bootstrap.lesion_bootstrap_ci(labels, scores, lesion_ids, roc_auc_score, n_boot=300, seed=0)
    assert (again.low, again.high) == (low, high)
    other_seed = bootstrap.lesion_bootstrap_ci(labels, scores, lesion_ids, roc_auc_score, n_boot=300, seed=1)
    assert (other_seed.low, other_seed.high) != (low, high)
    narrow = bootstrap.lesion_bootstrap_ci(
        labels, scores, lesion_ids, roc_auc_score, n_boot=300, alpha=0.5, seed=0
    )
    assert low <= narrow.low <= narrow.high <= high


def test_lesion_bootstrap_skips_one_class_resamples():
    # One melanoma lesion among three: a resample misses it with probability (2/3)^3 and
    # holds only it with probability (1/3)^3.
    labels = np.array([1, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.3, 0.4])
    lesion_ids = np.array(["a", "b", "b", "c"])
    calls = []
    ci = bootstrap.lesion_bootstrap_ci(
        labels, scores, lesion_ids, lambda y, s: calls.append(y) or 1.0, n_boot=300
    )
    assert all(0 < y.sum() < len(y) for y in calls)
    assert ci.n_skipped == 300 - len(calls)
    assert 50 < ci.n_skipped < 150  # expected 300 * (8 + 1) / 27 = 100
    assert (ci.low, ci.high) == (1.0, 1.0)


def test_lesion_bootstrap_undefined_metric_is_skipped():
    labels, scores, lesion_ids = _lesion_data()
    ci = bootstrap.lesion_bootstrap_ci(labels, scores, lesion_ids, lambda y, s: None, n_boot=20)
    assert (ci.low, ci.high, ci.n_skipped) == (None, None, 20)


def test_lesion_bootstrap_checks_lesion_ids():
    with pytest.raises(ValueError, match="lesion_ids has shape"):
        bootstrap.lesion_bootstrap_ci(LABELS, SCORES, ["a"], roc_auc_score)
    with pytest.raises(ValueError, match="None"):
        bootstrap.lesion_bootstrap_ci(LABELS, SCORES, [None] * len(LABELS), roc_auc_score)


# --- calibration ------------------------------------------------------------------------


def test_calibration_hand_case():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.05, 0.15, 0.15, 0.95])
    # Bins [0,.1]: 0.05 vs 0 -> .05; (.1,.2]: 0.15 vs 0.5 -> .35 (2 images); (.9,1]: .95 vs 1.
    assert calibration.expected_calibration_error(labels, scores) == pytest.approx(
        (0.05 + 2 * 0.35 + 0.05) / 4
    )
    assert calibration.brier_score(labels, scores) == pytest.approx(brier_score_loss(labels, scores))
    assert calibration.brier_score(labels, scores) == pytest.approx(
        (0.05**2 + 0.15**2 + 0.85**2 + 0.05**2) / 4
    )
    # Perfectly calibrated within its bin.
    assert calibration.expected_calibration_error([0, 1, 0, 1], [0.5] * 4) == 0.0


def test_reliability_curve_matches_calibration_curve():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    # Include bin edges and the ends of [0, 1] to pin down the bin assignment.
    scores = np.concatenate([rng.random(190), [0.0, 0.1, 0.2, 0.5, 0.7, 0.9, 1.0, 0.3, 0.6, 0.8]])
    curve = calibration.reliability_curve(labels, scores, n_bins=10)
    fraction, mean = calibration_curve(labels, scores, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(curve["fraction_positive"], fraction)
    np.testing.assert_allclose(curve["mean_predicted"], mean)
    assert sum(curve["count"]) == 200
    for lower, upper, mean_p, count in zip(
        curve["bin_lower"], curve["bin_upper"], curve["mean_predicted"], curve["count"]
    ):
        in_bin = scores[(scores > lower) & (scores <= upper) | ((lower == 0.0) & (scores == 0.0))]
        assert len(in_bin) == count
        assert np.mean(in_bin) == pytest.approx(mean_p)


def test_calibration_allows_one_class():
    assert calibration.brier_score([0, 0], [0.1, 0.3]) == pytest.approx(0.05)
    assert calibration.expected_calibration_error([0, 0], [0.1, 0.3]) == pytest.approx(0.2)


# --- subgroups --------------------------------------------------------------------------


def test_age_bands():
    bands = subgroups.age_bands([None, 5, 29.9, 30, 44, 45, 59, 60, 74, 75, 90, float("nan")])
    assert bands.tolist() == [
        "unknown",
        "<30",
        "<30",
        "30-44",
        "30-44",
        "45-59",
        "45-59",
        "60-74",
        "60-74",
        "75+",
        "75+",
        "unknown",
    ]


def test_subgroup_metrics_flags_and_values():
    rng = np.random.default_rng(0)
    groups, labels = [], []
    for name, n, n_pos in (("big", 40, 20), ("few_melanoma", 40, 3), ("tiny", 10, 5), ("benign_only", 35, 0)):
        groups += [name] * n
        labels += [1] * n_pos + [0] * (n - n_pos)
    groups += [None, ""]  # both "unknown"
    labels += [0, 1]
    labels = np.array(labels)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    result = subgroups.subgroup_metrics(labels, scores, {"site": groups}, threshold=0.5)["site"]
    assert list(result) == sorted(["big", "few_melanoma", "tiny", "benign_only", "unknown"])
    assert result["big"]["small"] is False
    assert result["few_melanoma"]["small"] is True  # n >= 30 but 3 melanoma
    assert result["tiny"]["small"] is True  # n < 30
    assert result["benign_only"]["small"] is True
    assert result["benign_only"]["auroc"] is None
    assert result["benign_only"]["sensitivity"] is None
    assert result["unknown"]["n"] == 2 and result["unknown"]["n_melanoma"] == 1
    big = np.array(groups, dtype=object) == "big"
    assert result["big"]["auroc"] == pytest.approx(roc_auc_score(labels[big], scores[big]))
    at = m.binary_metrics(labels[big], scores[big], 0.5)
    assert result["big"]["sensitivity"] == at["sensitivity"]
    assert result["big"]["specificity"] == at["specificity"]
    assert (result["big"]["n"], result["big"]["n_melanoma"]) == (40, 20)


def test_subgroup_metrics_checks_lengths():
    with pytest.raises(ValueError, match="group 'sex' has 2 values for 10 samples"):
        subgroups.subgroup_metrics(LABELS, SCORES, {"sex": ["f", "m"]}, 0.5)


def test_curve_points():
    curves = m.curve_points(LABELS, SCORES, n_hist_bins=10)
    assert curves["roc"]["fpr"][0] == 0.0 and curves["roc"]["tpr"][-1] == 1.0
    assert len(curves["pr"]["recall"]) == len(curves["pr"]["precision"])
    assert sum(curves["score_histogram"]["melanoma"]) == 4
    assert sum(curves["score_histogram"]["other"]) == 6


def test_lesion_pooled_scores_hand_computed():
    # Lesion A: logits ln(9) and 0 -> mean ln(3) -> 0.75. B alone keeps its score.
    pooled = m.lesion_pooled_scores([0.9, 0.2, 0.5], ["A", "B", "A"])
    np.testing.assert_allclose(pooled, [0.75, 0.2, 0.75], rtol=1e-9)


def test_lesion_pooled_scores_saturated_probabilities_stay_finite():
    pooled = m.lesion_pooled_scores([1.0, 0.1, 0.0], ["A", "A", "B"])
    eps = m.LOGIT_EPS
    expected = 1 / (1 + np.exp(-(np.log((1 - eps) / eps) + np.log(0.1 / 0.9)) / 2))
    np.testing.assert_allclose(pooled, [expected, expected, eps], rtol=1e-6)
    assert np.isfinite(pooled).all()


def test_lesion_pooled_scores_average_not_accumulate():
    # More views of a lesion must not push its score up by themselves (a sum of logits would).
    pooled = m.lesion_pooled_scores([0.6, 0.6, 0.9], [1, 1, 2])
    assert pooled[0] == pytest.approx(0.6) and pooled[2] == pytest.approx(0.9)


@pytest.mark.parametrize(
    "scores, lesions, message",
    [
        ([0.5, 0.5], ["A"], "one length"),
        ([[0.5]], ["A"], "1-D"),
        ([0.5, float("nan")], ["A", "B"], "finite"),
        ([0.5, 1.5], ["A", "B"], r"\[0, 1\]"),
    ],
)
def test_lesion_pooled_scores_rejects_bad_input(scores, lesions, message):
    with pytest.raises(ValueError, match=message):
        m.lesion_pooled_scores(scores, lesions)


def test_clipped_logits_inverts_the_sigmoid_and_clips_like_lesion_pooling():
    from training.metrics import clipped_logits

    z = np.array([-5.0, 0.0, 3.0])
    np.testing.assert_allclose(clipped_logits(1.0 / (1.0 + np.exp(-z))), z, atol=1e-9)
    assert np.isfinite(clipped_logits(np.array([0.0, 1.0]))).all()
