"""Experiment: how much each trained model leans on the image borders vs the lesion (validation split).

Grad-CAM shows where a model's evidence sits; occlusion checks whether the score depends on
it. Every validation image (224x224) is scored three times: as it is, with its top and
bottom 32 rows painted its own mean colour (the borders, where some of HAM10000's sources
differ in vignetting and framing), and with its central 96x96 block painted so (where the
lesion usually is). Reported per run: val AUROC per image and lesion-pooled, for each
variant. A model whose AUROC falls more when the borders go than others' do uses border
content for its decision. The test split is not read.

    python research/2026-11-model-selection/experiment_occlusion.py --runs deeper8,deeper11,seed1-long
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent  # research/2026-11-model-selection
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "benchmarks" / "work" / "quality"
RESULTS = HERE / "results"
BORDER_ROWS = 32
CENTRE = slice(64, 160)


def occluded(images: np.ndarray) -> dict[str, np.ndarray]:
    """images (N,224,224,3) uint8 -> {variant: (N,224,224,3) uint8}, each occluded with the image's mean colour."""
    mean = images.reshape(len(images), -1, 3).mean(axis=1).round().astype(np.uint8)[:, None, None, :]
    borders = images.copy()
    borders[:, :BORDER_ROWS] = mean
    borders[:, -BORDER_ROWS:] = mean
    centre = images.copy()
    centre[:, CENTRE, CENTRE] = mean
    return {"as is": images, "borders occluded": borders, "centre occluded": centre}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="deeper8,deeper11,seed1-long", help="comma-separated runs under benchmarks/work/quality/runs")
    parser.add_argument("--name", default="", help="writes results/experiment_occlusion-<name>.json (default: experiment_occlusion.json)")
    args = parser.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from melanoma.manifest import latest_manifest, load_split
    from melanoma.storage import open_storage
    from training.metrics import lesion_pooled_scores
    from training.predict import load_model

    processed = open_storage(str(WORK / "data"))
    val = load_split(processed, latest_manifest(processed), ["val"])
    labels = np.array([r["label"] for r in val.records])
    lesions = np.array([r["lesion_id"] for r in val.records], dtype=object)
    variants = occluded(val.images)
    results = {}
    for run in args.runs.split(","):
        model = load_model(str(WORK / "runs" / run / "model" / "model.keras"))
        results[run] = {}
        for name, images in variants.items():
            p = model.predict(images, batch_size=64, verbose=0)[:, 0].astype(np.float64)
            results[run][name] = {"auroc": round(float(roc_auc_score(labels, p)), 4),
                                  "auroc_lesion_pooled": round(float(roc_auc_score(labels, lesion_pooled_scores(p, lesions))), 4)}
        print(run, " | ".join(f"{k}: {v['auroc']:.3f} / {v['auroc_lesion_pooled']:.3f}" for k, v in results[run].items()), flush=True)
    doc = {
        "command": "python research/2026-11-model-selection/experiment_occlusion.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "split": "val",
        "n_images": len(val),
        "border_rows": BORDER_ROWS,
        "centre_block": [CENTRE.start, CENTRE.stop],
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"experiment_occlusion{'-' + args.name if args.name else ''}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
