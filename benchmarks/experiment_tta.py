"""Experiment: does averaging the model over flips of each image (test-time augmentation) help?

    python benchmarks/experiment_tta.py [--model M] [--processed P]

Scores the val and test splits of the quality benchmark's data with the benchmark's model,
once per flip variant (as stored, left-right, up-down, both), and compares the single view
with the mean probability over the four. Val first: that is where a choice would be made.
Prints one JSON object and writes ``benchmarks/results/experiment_tta.json``. The pipeline
itself scores the single view (the model Grad-CAM explains); this only measures the option.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WORK = ROOT / "benchmarks" / "work" / "quality"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(WORK / "runs" / "bench" / "model" / "model.keras"))
    parser.add_argument("--processed", default=str(WORK / "data"))
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)

    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage
    from training.data import load_arrays
    from training.metrics import lesion_bootstrap_ci, ranking_metrics
    from training.predict import load_model, predict_probabilities
    from training.train import flip_variant

    storage = open_storage(args.processed)
    manifest = latest_manifest(storage)
    model = load_model(args.model)
    result: dict = {"experiment": "tta-flips", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "model": os.path.relpath(args.model, ROOT), "splits": {}}
    for split in ("val", "test"):
        data = load_arrays(storage, manifest, split)
        views = np.stack([predict_probabilities(model, flip_variant(data.images, v)) for v in range(4)])
        lesions = np.array([r["lesion_id"] for r in data.records])
        entry = {"images": len(data), "melanoma": int(data.labels.sum())}
        for name, scores in (("single", views[0]), ("flip4_mean", views.mean(axis=0))):
            metrics = ranking_metrics(data.labels, scores)
            ci = lesion_bootstrap_ci(data.labels, scores, lesions, lambda y, s: ranking_metrics(y, s)["auroc"], n_boot=args.n_boot)
            entry[name] = {"auroc": round(metrics["auroc"], 4), "auprc": round(metrics["auprc"], 4),
                           "auroc_ci": [round(ci.low, 4), round(ci.high, 4)]}
        result["splits"][split] = entry
        print(split, json.dumps(entry), flush=True)
    out = ROOT / "benchmarks" / "results" / "experiment_tta.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
