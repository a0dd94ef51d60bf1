"""Evaluating a bench-quality run: the pipeline's evaluate step (internal and external sets,
lesion focus), the evaluation figures of quality.json, and ``--reevaluate``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

from benchmarks.quality_common import RESULTS, SHARED, TARGET, WORK, log, rel, run_processed_root
from benchmarks.quality_external import external_fields, external_specs
from benchmarks.quality_report import write_markdown, write_results
from training.tta import views_of


def estimate(metrics: dict, name: str) -> dict:
    block = metrics["test"][name]
    return {"value": block["value"], "ci_low": block["ci_low"], "ci_high": block["ci_high"]}


def evaluate(args: argparse.Namespace, run_root: Path, processed_root: Path | None = None) -> dict:
    """The pipeline's evaluate step on the run (internal + external sets), then Grad-CAM lesion
    focus on the external sets that have lesion masks; returns ``{name: focus summary}``.
    The data: ``processed_root``, else the root the run trained on."""
    from training.tasks import evaluate_run, external_focus_run
    from training.tracking import record_step

    processed = processed_root or run_processed_root(run_root)
    specs = external_specs(args.external)
    payload = evaluate_run(
        str(processed),
        str(run_root),
        strategy="youden",
        n_boot=args.n_boot,
        pooling=args.pooling,
        external=specs,
        test_time_augmentation=args.test_time_augmentation,
    )
    record_step("evaluate", str(run_root), payload)  # the benchmark's runs are tracked like the DAG's
    focus = {}
    for spec in specs:
        drop = spec.rpartition("::")[2]
        if (SHARED / drop / "masks").is_dir():
            focus[drop] = external_focus_run(str(processed), str(run_root), spec)
            log(f"external {drop}: lesion focus {json.dumps(focus[drop]['check'])}")
    return focus


def evaluation_fields(metrics: dict, focus: dict | None = None) -> dict:
    """The figures of quality.json that come from ``eval/metrics.json`` (and external lesion focus)."""
    test, scores = metrics["test"], metrics["scores"]
    return {
        "auroc": test["auroc"]["value"],
        "auprc": test["auprc"]["value"],
        "threshold": metrics["threshold"]["value"],
        "sensitivity": test["sensitivity"]["value"],
        "specificity": test["specificity"]["value"],
        "auroc_ci": estimate(metrics, "auroc"),
        "auprc_ci": estimate(metrics, "auprc"),
        "sensitivity_ci": estimate(metrics, "sensitivity"),
        "specificity_ci": estimate(metrics, "specificity"),
        "pooling": scores["pooling"],
        "views": views_of(metrics),
        "per_image": scores.get("per_image"),  # the unpooled figures when pooled
        "threshold_strategy": metrics["threshold"]["strategy"],
        "threshold_chosen_on": metrics["threshold"]["chosen_on"],
        "val": {k: metrics["threshold"]["val"][k] for k in ("auroc", "auprc", "sensitivity", "specificity")},
        "target": TARGET,
        "target_met": test["auroc"]["value"] >= TARGET["auroc"] and test["auprc"]["value"] >= TARGET["auprc"],
        "external": external_fields(metrics, focus or {}),
        "warnings": metrics.get("warnings", []),
    }


def reevaluate(args: argparse.Namespace, command: str) -> int:
    """Evaluate the recorded run's model again; training figures stay as recorded."""
    recorded = json.loads((RESULTS / "quality.json").read_text())
    run_root = WORK / "runs" / args.name
    if Path(recorded["model_uri"]) != Path(rel(run_root / "model" / "model.keras")):
        raise SystemExit(f"results/quality.json records {recorded['model_uri']}, not the run {args.name!r}")
    started = time.perf_counter()
    focus = evaluate(args, run_root)
    metrics = json.loads((run_root / "eval" / "metrics.json").read_text())
    result = {
        **recorded,
        **evaluation_fields(metrics, focus),
        "evaluate_seconds": round(time.perf_counter() - started, 1),
        "reevaluated": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command,
        },
    }
    write_results(result, write_markdown)
    log(
        f"re-evaluated {args.name}: test AUROC {result['auroc']:.4f}, AUPRC {result['auprc']:.4f} ({result['pooling']} pooling)"
    )
    return 0


def split_counts(manifest: dict, test: dict) -> dict:
    """Image counts of the processed data set, from its manifest and the test block of metrics.json."""
    return {
        "train": manifest["counts"]["train"]["0"] + manifest["counts"]["train"]["1"],
        "train_augmented": manifest["augmented_counts"]["train"]["1"],
        "val": manifest["counts"]["val"]["0"] + manifest["counts"]["val"]["1"],
        "test": test["n_images"],
        "test_melanoma": test["n_melanoma"],
        "test_lesions": test["n_lesions"],
    }
