"""experiment_tta_ensembles.py (this folder): the ensemble rule (best val AUROC, ties to the fewest members).

Research, not product: the pipeline never picks members among combinations of runs (a run with
``ensemble_size=N`` trains and averages all N), so this test lives beside the script it tests and
is not collected by ``make test`` (testpaths = tests). Run it with
``pytest research/2026-11-model-selection/test_ensemble_pick.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

SCRIPT = Path(__file__).resolve().parent / "experiment_tta_ensembles.py"


def load_script():
    spec = importlib.util.spec_from_file_location("experiment_tta_ensembles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs():
    rng = np.random.default_rng(3)
    labels = (rng.random(300) < 0.2).astype(int)
    lesions = np.array([f"L{i // 2}" for i in range(300)])  # two images a lesion
    logits = {name: labels * strength + rng.normal(size=300) for name, strength in (("a", 1.0), ("b", 1.2), ("c", 0.8), ("d", 0.3))}
    return logits, labels, lesions


def test_pick_without_a_tie_margin_is_the_best_combination_by_val_auroc():
    script = load_script()
    logits, labels, lesions = runs()
    ranked, chosen = script.pick(logits, labels, lesions, tie=0.0)
    assert len(ranked) == 2**4 - 1
    assert chosen == ranked[0] and all(row[0] <= chosen[0] for row in ranked)
    assert len(chosen[2]) > 1  # with these runs averaging helps, so a single run cannot win


def test_pick_gives_ties_to_the_fewest_members():
    script = load_script()
    logits, labels, lesions = runs()
    ranked, chosen = script.pick(logits, labels, lesions, tie=1.0)  # every combination ties
    singles = [row for row in ranked if len(row[2]) == 1]
    assert chosen == max(singles, key=lambda row: row[0])
    # The AUROC it reports is that of the lesion-pooled scores of that run alone.
    from training.metrics import lesion_pooled_scores

    run = chosen[2][0]
    pooled = lesion_pooled_scores(1.0 / (1.0 + np.exp(-logits[run])), lesions)
    assert abs(chosen[0] - roc_auc_score(labels, pooled)) < 1e-12

