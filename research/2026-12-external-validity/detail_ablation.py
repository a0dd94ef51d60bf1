"""Ablation, not selection: one trained model scored on the external sets with preprocessing v3
(the shipped one: sharper images reduced to the training data's detail first) and with v2 (without
that step). The v3 decision was committed before this ran (HAM inputs are identical under both, so
HAM validation cannot tell them apart); this only says how much of the external shift came from
the images' resolution.

    .venv/bin/python research/2026-12-external-validity/detail_ablation.py RUN_ROOT OUT.json

For a run trained without colour constancy (both variants here apply none): others are refused.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from melanoma.colour_constancy import colour_constancy_of  # noqa: E402
from melanoma.drop_scan import scan_drop  # noqa: E402
from melanoma.image_decode import decode_rgb  # noqa: E402
from melanoma.imaging import preprocess_image_bytes, resize_for_model  # noqa: E402
from melanoma.manifest import latest_manifest  # noqa: E402
from melanoma.storage import open_storage  # noqa: E402
from training.metrics import binary_metrics, clipped_logits, ranking_metrics  # noqa: E402
from training.model_io import load_model  # noqa: E402
from training.predict import predict_probabilities  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
VARIANTS = {
    "v3_shipped": lambda data: preprocess_image_bytes(data)[0],
    "v2_without_detail_step": lambda data: resize_for_model(decode_rgb(data)[0]),
}


def score_drop(model, drop: str) -> dict:
    raw = open_storage(str(SHARED))
    scan = scan_drop(raw, drop)
    labels = np.array([item.label for item in scan.inputs])
    blobs = [raw.read_bytes(item.image_key) for item in scan.inputs]
    out = {}
    for name, prepare in VARIANTS.items():
        images = np.stack([prepare(blob) for blob in blobs])
        out[name] = predict_probabilities(model, images, what=f"{drop} {name}")
    return {"labels": labels, **out}


def main(run_root: str, out_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = Path(run_root)
    processed = json.loads((run / "model" / "config.json").read_text())["processed_root"]
    manifest = latest_manifest(open_storage(processed))
    if colour_constancy_of(manifest["preprocessing"]) != "none":
        raise SystemExit(f"{run} was trained with colour constancy: this ablation applies none")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    threshold = metrics["threshold"]["value"]
    model = load_model(str(run / "model" / "model.keras"))
    result = {"run": str(run), "threshold": threshold}
    for drop in ("ph2", "isic_uda1_sample"):
        scored = score_drop(model, drop)
        labels = scored.pop("labels")
        result[drop] = {
            name: {
                "auroc": ranking_metrics(labels, p)["auroc"],
                **{k: binary_metrics(labels, p, threshold)[k] for k in ("sensitivity", "specificity")},
                "median_logit": float(np.median(clipped_logits(p))),
            }
            for name, p in scored.items()
        }
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
    logging.info("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
