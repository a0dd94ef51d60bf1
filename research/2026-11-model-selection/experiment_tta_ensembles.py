"""Experiment: does averaging each run over flips of the image (test-time augmentation) raise the ensemble rule's pick?

    python research/2026-11-model-selection/experiment_tta_ensembles.py --runs deeper8,deeper11,seed2,... [--processed P]

For every bench-quality run named (``benchmarks/work/quality/runs/NAME``), scores the val and
test splits once per flip view (as stored, left-right, up-down, both: the flip variants
training used), reusing the run's ``eval/tta_views.npz`` when
``research/2026-11-model-selection/experiment_tta.py`` or an earlier call wrote it. A run's flip-averaged score is
the sigmoid of the mean of its 4 view logits; an ensemble's is the sigmoid of the mean over
its members' logits (the rule of :mod:`training.ensemble`), pooled per lesion
(:func:`training.metrics.lesion_pooled_scores`).

The protocol is the decision log's (``research/2026-11-model-selection/decisions-2026-11-27.md``): over every
combination of the runs, on **val only**, the best lesion-pooled AUROC wins, ties within
``--tie`` going to the fewest members; that is done with and without flips. Only after both
picks are made are the test figures computed, and only for the two picks. Prints the ranking
heads and writes ``research/2026-11-model-selection/results/experiment_tta_ensembles.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent  # research/2026-11-model-selection
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WORK = ROOT / "benchmarks" / "work" / "quality"


def rel(path: Path) -> str:
    return os.path.relpath(path, ROOT)


def run_views(run: Path, storage, manifest) -> dict[str, np.ndarray]:
    """The run's per-view probabilities (:func:`experiment_tta.flip_views`), from its ``eval/tta_views.npz`` when there."""
    cache = run / "eval" / "tta_views.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    from experiment_tta import flip_views  # this folder is on sys.path when the script runs

    saved = flip_views(run / "model" / "model.keras", storage, manifest)
    np.savez_compressed(cache, **saved)
    return saved


def run_logits(views: dict[str, np.ndarray], split: str, mode: str) -> np.ndarray:
    """A run's logits (N,) on ``split``: the stored view (``single``) or the mean over the 4 flip views (``flip4``)."""
    from training.metrics import clipped_logits

    logits = clipped_logits(views[f"{split}_views"])
    return logits[0] if mode == "single" else logits.mean(axis=0)


def ensemble_scores(logits: dict[str, np.ndarray], combo: tuple, lesions: np.ndarray) -> np.ndarray:
    """Lesion-pooled probabilities (N,) of the ensemble ``combo``: the sigmoid of its members' mean logit."""
    from training.metrics import lesion_pooled_scores

    return lesion_pooled_scores(1.0 / (1.0 + np.exp(-np.mean([logits[n] for n in combo], axis=0))), lesions)


def pick(logits: dict[str, np.ndarray], labels: np.ndarray, lesions: np.ndarray, tie: float) -> tuple[list[tuple], tuple]:
    """All combinations ranked by lesion-pooled val AUROC, and the rule's pick (ties to the fewest members)."""
    from training.metrics import ranking_metrics

    names = list(logits)
    ranked = []
    for size in range(1, len(names) + 1):
        for combo in itertools.combinations(names, size):
            metrics = ranking_metrics(labels, ensemble_scores(logits, combo, lesions))
            ranked.append((metrics["auroc"], metrics["auprc"], combo))
    ranked.sort(key=lambda row: (-row[0], len(row[2])))
    best = ranked[0][0]
    chosen = min((row for row in ranked if row[0] >= best - tie), key=lambda row: (len(row[2]), -row[0]))
    return ranked, chosen


def test_figures(logits: dict[str, np.ndarray], combo: tuple, labels, lesions, n_boot: int) -> dict:
    from training.bootstrap import lesion_bootstrap_ci
    from training.metrics import ranking_metrics

    scores = ensemble_scores(logits, combo, lesions)
    metrics = ranking_metrics(labels, scores)
    out = {"members": list(combo), "auroc": round(metrics["auroc"], 4), "auprc": round(metrics["auprc"], 4)}
    for key in ("auroc", "auprc"):
        ci = lesion_bootstrap_ci(labels, scores, lesions, lambda y, s, key=key: ranking_metrics(y, s)[key], n_boot=n_boot)
        out[f"{key}_ci"] = [round(ci.low, 4), round(ci.high, 4)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated bench-quality run names (the eligible runs)")
    parser.add_argument("--processed", default=str(WORK / "data"))
    parser.add_argument("--tie", type=float, default=0.001, help="val AUROC within this of the best counts as a tie")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)

    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage

    storage = open_storage(args.processed)
    manifest = latest_manifest(storage)
    names = [name for name in args.runs.split(",") if name]
    if not names:
        parser.error("--runs names no run")
    missing = [name for name in names if not (WORK / "runs" / name / "model" / "model.keras").exists()]
    if missing:
        parser.error(f"no model.keras under {rel(WORK / 'runs')} for {missing}")
    views = {}
    for name in names:
        views[name] = run_views(WORK / "runs" / name, storage, manifest)
        print(f"views of {name}: done", flush=True)
    first = views[names[0]]
    for name in names[1:]:
        for split in ("val", "test"):
            if not np.array_equal(views[name][f"{split}_image_ids"], first[f"{split}_image_ids"]):
                raise SystemExit(f"{name}'s {split} images differ from {names[0]}'s: not one split")

    result: dict = {"experiment": "tta-flips over ensembles", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "runs": names, "views": ["stored", "left-right", "up-down", "both"], "tie": args.tie, "val": {}, "test": {}}
    val_labels, val_lesions = first["val_labels"], first["val_lesions"]
    chosen = {}
    for mode in ("single", "flip4"):
        logits = {n: run_logits(views[n], "val", mode) for n in names}
        ranked, chosen[mode] = pick(logits, val_labels, val_lesions, args.tie)
        result["val"][mode] = {"pick": {"members": list(chosen[mode][2]), "auroc": round(chosen[mode][0], 4), "auprc": round(chosen[mode][1], 4)},
                               "top10": [{"members": list(c), "auroc": round(a, 4), "auprc": round(b, 4)} for a, b, c in ranked[:10]],
                               "per_run": {n: round(next(a for a, _, c in ranked if c == (n,)), 4) for n in names}}
        print(f"val {mode}: pick {'+'.join(chosen[mode][2])} AUROC {chosen[mode][0]:.4f} AUPRC {chosen[mode][1]:.4f}", flush=True)
        for a, b, c in ranked[:5]:
            print(f"   {a:.4f} {b:.4f} {'+'.join(c)}")
    gain = chosen["flip4"][0] - chosen["single"][0]
    result["val"]["flip4_gain"] = round(gain, 4)
    result["val"]["adopt_flip4"] = bool(gain > args.tie)
    print(f"val gain of flips: {gain:+.4f} -> adopt: {gain > args.tie}", flush=True)

    # Only now, with both picks fixed on val, the test split.
    test_labels, test_lesions = first["test_labels"], first["test_lesions"]
    for mode in ("single", "flip4"):
        logits = {n: run_logits(views[n], "test", mode) for n in names}
        result["test"][mode] = test_figures(logits, chosen[mode][2], test_labels, test_lesions, args.n_boot)
        print(f"test {mode}: {json.dumps(result['test'][mode])}", flush=True)
    out = HERE / "results" / "experiment_tta_ensembles.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
