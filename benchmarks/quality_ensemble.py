"""``--ensemble-of``: the ensemble of finished bench-quality runs, built and evaluated as a run of its own."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import time
from pathlib import Path

from benchmarks.quality_common import WORK, log, machine, processed_manifest, rel, run_processed_root
from benchmarks.quality_evaluation import evaluate, evaluation_fields, split_counts
from benchmarks.quality_report import write_ensemble_markdown, write_results


def member_summary(run_root: Path) -> dict:
    """Training figures of one finished run, from its own files."""
    config = json.loads((run_root / "model" / "config.json").read_text())
    history = json.loads((run_root / "model" / "history.json").read_text())
    # The checkpoints (GBs of cached activations) are a training-time folder a user may prune once
    # the run is finished; only the stop reason lives there, so a pruned member says it is unknown.
    state_path = run_root / "model" / "checkpoints" / "state.json"
    if state_path.exists():
        stop_reason = json.loads(state_path.read_text()).get("stop_reason")
    else:
        stop_reason = "not recorded: checkpoints pruned"
    phases = {}
    for phase, h in history.items():
        seconds = h.get("epoch_seconds", [])
        phases[phase] = {
            "epochs": len(h.get("val_auroc", [])),
            "best_val_auroc": max(h.get("val_auroc", [float("nan")])),
            "mean_epoch_seconds": round(sum(seconds) / len(seconds), 1) if seconds else None,
            "train_seconds": round(sum(seconds), 1),
        }
    return {
        "model_uri": rel(run_root / "model" / "model.keras"),
        "seed": config["seed"],
        "fine_tune_blocks": config["fine_tune_blocks"],
        "target": config["target"],
        "train_flips": config["train_flips"],
        "train_augment": config.get("train_augment", False),
        "budget_seconds": config.get("max_train_seconds"),
        "phases": phases,
        "phase2_stop_reason": stop_reason,
    }


def ensemble_of_runs(args: argparse.Namespace, command: str) -> int:
    """Build the ensemble of the ``--ensemble-of`` runs under ``runs/<--name>`` and evaluate it."""
    from training.ensemble import save_ensemble

    names = [n.strip() for n in args.ensemble_of.split(",") if n.strip()]
    if len(names) < 2 or args.name in names:
        raise SystemExit("--ensemble-of needs two or more finished runs, and a --name of its own")
    members = {name: member_summary(WORK / "runs" / name) for name in names}
    roots = {run_processed_root(WORK / "runs" / name) for name in names}
    if len(roots) != 1:
        raise SystemExit(
            f"the runs trained on different processed data ({sorted(map(str, roots))}): no ensemble"
        )
    processed_root = roots.pop()
    run_root = WORK / "runs" / args.name
    shutil.rmtree(run_root, ignore_errors=True)
    started = time.perf_counter()
    save_ensemble(
        [str(WORK / "runs" / name / "model" / "model.keras") for name in names],
        str(run_root / "model" / "model.keras"),
    )
    focus = evaluate(args, run_root, processed_root)
    metrics = json.loads((run_root / "eval" / "metrics.json").read_text())
    manifest = processed_manifest(processed_root)
    test = metrics["test"]
    result = {
        **evaluation_fields(metrics, focus),
        "ensemble_of": members,
        "evaluate_seconds": round(time.perf_counter() - started, 1),
        "model_uri": rel(run_root / "model" / "model.keras"),
        "metrics_uri": rel(run_root / "eval" / "metrics.json"),
        "counts": split_counts(manifest, test),
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "notes": args.notes,
    }
    write_results(result, write_ensemble_markdown)
    log(
        f"ensemble of {names}: test AUROC {result['auroc']:.4f} {result['auroc_ci']}, AUPRC {result['auprc']:.4f} {result['auprc_ci']}; "
        f"val {result['val']['auroc']:.4f} / {result['val']['auprc']:.4f}"
    )
    return 0
