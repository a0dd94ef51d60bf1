"""Experiment: does averaging the model over flips of each image (test-time augmentation) help?

    python research/2026-11-model-selection/experiment_tta.py [--run NAME] [--processed P]

Scores the val and test splits of the quality benchmark's data with a bench-quality run's
model (``benchmarks/work/quality/runs/NAME``), once per flip variant (as stored,
left-right, up-down, both), and compares the single view with the mean over the four, each
also pooled per lesion (:func:`training.metrics.lesion_pooled_scores`, the pipeline's
default scoring). Val first: that is where a choice would be made. Prints one JSON object
and writes ``research/2026-11-model-selection/results/experiment_tta[-NAME].json``; the per-view probabilities
go to the run's ``eval/tta_views.npz``. The pipeline itself scores the single view (the
model Grad-CAM explains); this only measures the option.
"""

from __future__ import annotations

import argparse
import datetime as dt
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


def flip_views(model_path: Path, storage, manifest) -> dict[str, np.ndarray]:
    """The model's probabilities for val and test in the 4 flip views (as stored, left-right, up-down, both).

    Returns, per split: ``{split}_views`` float (4,N), ``{split}_labels`` (N,), ``{split}_lesions`` and
    ``{split}_image_ids`` str (N,), the layout of ``eval/tta_views.npz``.
    """
    from training.data import load_arrays
    from training.predict import load_model, predict_probabilities
    from training.train import flip_variant

    model = load_model(str(model_path))
    saved: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        data = load_arrays(storage, manifest, split)
        saved[f"{split}_views"] = np.stack([predict_probabilities(model, flip_variant(data.images, v)) for v in range(4)])
        saved[f"{split}_labels"] = data.labels
        saved[f"{split}_lesions"] = np.array([r["lesion_id"] for r in data.records]).astype(str)
        saved[f"{split}_image_ids"] = np.array([r["image_id"] for r in data.records]).astype(str)
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="bench", help="bench-quality run folder name")
    parser.add_argument("--processed", default=str(WORK / "data"))
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)

    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage
    from training.bootstrap import lesion_bootstrap_ci
    from training.metrics import lesion_pooled_scores, ranking_metrics

    storage = open_storage(args.processed)
    manifest = latest_manifest(storage)
    run = WORK / "runs" / args.run
    model_path = run / "model" / "model.keras"
    result: dict = {"experiment": "tta-flips", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "model": os.path.relpath(model_path, ROOT), "splits": {}}
    saved = flip_views(model_path, storage, manifest)
    for split in ("val", "test"):
        views, labels, lesions = saved[f"{split}_views"], saved[f"{split}_labels"], saved[f"{split}_lesions"]
        entry = {"images": len(labels), "melanoma": int(labels.sum())}
        mean = views.mean(axis=0)
        candidates = (("single", views[0]), ("flip4_mean", mean),
                      ("single_lesion_pooled", lesion_pooled_scores(views[0], lesions)),
                      ("flip4_mean_lesion_pooled", lesion_pooled_scores(mean, lesions)))
        for name, scores in candidates:
            metrics = ranking_metrics(labels, scores)
            ci = lesion_bootstrap_ci(labels, scores, lesions, lambda y, s: ranking_metrics(y, s)["auroc"], n_boot=args.n_boot)
            entry[name] = {"auroc": round(metrics["auroc"], 4), "auprc": round(metrics["auprc"], 4),
                           "auroc_ci": [round(ci.low, 4), round(ci.high, 4)]}
        result["splits"][split] = entry
        print(split, json.dumps(entry), flush=True)
    np.savez_compressed(run / "eval" / "tta_views.npz", **saved)
    out = HERE / "results" / ("experiment_tta.json" if args.run == "bench" else f"experiment_tta-{args.run}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
