"""Paired lesion-bootstrap interval of the AUROC difference between two scored runs.

How far apart are two models on the same images, beyond the noise of 151 validation melanomas?
Each resample draws lesions with replacement and scores both models on the same draw (lesions:
the resampling unit of every interval in this project). Reads the ``eval/predictions.csv`` of
two ``bench_quality.py`` runs; HAM scores are lesion-pooled, as the rule reads them.

    python research/2026-12-external-validity/paired_delta.py RUNS_DIR ens-mix ens-res --out delta.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from training.bootstrap import lesion_bootstrap_ci
from training.metrics import lesion_pooled_scores

log = logging.getLogger("paired_delta")


def scored(runs: Path, name: str) -> pd.DataFrame:
    frame = pd.read_csv(runs / name / "eval" / "predictions.csv")
    frame["set"] = np.where(frame["split"] == "external", frame["source"], frame["split"])
    return frame.set_index("image_id")


def paired_delta(labels, a, b, lesions, n_boot: int) -> dict:
    """AUROC(a) - AUROC(b) and its 95% interval, both models scored on each resample's images."""
    a, b = np.asarray(a, float), np.asarray(b, float)

    def delta(y, rows):  # the bootstrap passes row numbers as "scores": the pair stays aligned
        rows = rows.astype(int)
        return roc_auc_score(y, a[rows]) - roc_auc_score(y, b[rows])

    ci = lesion_bootstrap_ci(labels, np.arange(len(a), dtype=float), lesions, delta, n_boot=n_boot)
    auroc_a, auroc_b = roc_auc_score(labels, a), roc_auc_score(labels, b)
    return {
        "delta_auroc": auroc_a - auroc_b,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "auroc_a": auroc_a,
        "auroc_b": auroc_b,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", type=Path, help="benchmarks/work/quality/runs of the worktree that scored them"
    )
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    a, b = scored(args.runs, args.a), scored(args.runs, args.b)
    if set(a.index) != set(b.index):
        raise SystemExit(f"{args.a} and {args.b} scored different images")
    b = b.loc[a.index]
    result = {"a": args.a, "b": args.b, "n_boot": args.n_boot, "pooling": "lesion (HAM), none (external)"}
    for name, rows in a.groupby("set"):
        pa, pb = rows["probability"].to_numpy(), b.loc[rows.index, "probability"].to_numpy()
        if name in ("val", "test"):
            pa, pb = lesion_pooled_scores(pa, rows["lesion_id"]), lesion_pooled_scores(pb, rows["lesion_id"])
        result[name] = paired_delta(
            rows["label"].to_numpy(), pa, pb, rows["lesion_id"].to_numpy(), args.n_boot
        )
        log.info("%s: %s - %s = %+.4f (%s)", name, args.a, args.b, result[name]["delta_auroc"], result[name])
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
