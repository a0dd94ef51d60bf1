"""Running a bench-quality training: the Spark preprocessing, the cached vs uncached timing, a
run continued from another, and the run's figures for quality.json."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.quality_common import (
    ROOT,
    SHARED,
    WORK,
    log,
    machine,
    processed_dir,
    processed_manifest,
    rel,
    run_processed_root,
)
from benchmarks.quality_evaluation import evaluation_fields, split_counts

# --------------------------------------------------------------------------- preprocessing


def preprocess(reprocess: bool, colour_constancy: str = "none") -> dict:
    """Run the two Spark jobs unless augmented processed data with this colour constancy and the
    current preprocessing version is already there; returns what was done and the root."""
    from melanoma.colour_constancy import colour_constancy_of
    from melanoma.preprocess_job import PREPROCESSING_VERSION

    root = processed_dir(colour_constancy)
    manifest = processed_manifest(root)
    if manifest is not None and manifest.get("augmentation") and not reprocess:
        recorded = manifest["preprocessing"]
        if colour_constancy_of(recorded) != colour_constancy:
            raise SystemExit(
                f"{rel(root)} holds data with another colour constancy: remove it or --reprocess"
            )
        if recorded.get("version") == PREPROCESSING_VERSION:
            log(f"reusing processed data {rel(root)} (manifest v{manifest['version']})")
            return {"reused": True, "seconds": 0.0, "manifest_version": manifest["version"], "root": root}
        log(
            f"{rel(root)} was preprocessed by version {recorded.get('version', '1')}, not {PREPROCESSING_VERSION}: again"
        )
    if not (SHARED / "ham10000").is_dir():
        raise SystemExit(f"HAM10000 not found at {SHARED / 'ham10000'} (see README: ../shared/data)")
    if shutil.which("java") is None:
        raise SystemExit("java not found: Spark needs Java 17+")
    if root.exists():
        shutil.rmtree(root)
    venv_bin = ROOT / ".venv" / "bin"
    env = dict(
        os.environ, SPARK_LOCAL_IP="127.0.0.1", PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    spark_submit = str(venv_bin / "spark-submit") if (venv_bin / "spark-submit").exists() else "spark-submit"
    common = [spark_submit, "--master", "local[2]", "--conf", f"spark.pyspark.python={sys.executable}"]
    commands = [
        [
            *common,
            "spark_jobs/preprocess.py",
            "--raw-root",
            str(SHARED),
            "--drops",
            "ham10000",
            "--processed-root",
            rel(root),
            "--colour-constancy",
            colour_constancy,
        ],
        [*common, "spark_jobs/augment.py", "--processed-root", rel(root)],
    ]
    started = time.perf_counter()
    for command in commands:
        log("running " + " ".join(command[4:]))
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        for line in done.stdout.splitlines():
            if line.startswith(("preprocess:", "augment:")):
                log(line)
    manifest = processed_manifest(root)
    return {
        "reused": False,
        "seconds": round(time.perf_counter() - started, 1),
        "manifest_version": manifest["version"],
        "root": root,
    }


# --------------------------------------------------------------------------- cached vs uncached


def speedup(n_images: int, blocks: int, target: str, processed_root: Path) -> dict:
    """One short training each way on the first ``n_images`` training images (whole lesions)."""
    from melanoma.storage import open_storage
    from training.train import TrainConfig, run_training

    runs = {}
    for cached in (True, False):
        root = WORK / "runs" / f"speedup-{'cached' if cached else 'uncached'}"
        shutil.rmtree(root, ignore_errors=True)
        cfg = TrainConfig(
            str(processed_root),
            str(root),
            epochs=2,
            fine_tune_epochs=1,
            fine_tune_blocks=blocks,
            target=target,
            feature_cache=cached,
            fine_tune_cache=cached,
            cache_dtype="float32",
            limit_train=n_images,
            limit_val=n_images,
        )
        log(f"speed-up: {'cached' if cached else 'uncached'} run on {n_images} train / {n_images} val images")
        result = run_training(cfg)
        history = json.loads(open_storage(str(root)).read_bytes("model/history.json"))
        runs["cached" if cached else "uncached"] = {
            "train_images": n_images,
            "total_seconds": round(result["train_seconds"] - result["cpu_lock_wait_seconds"], 1),
            "cache_seconds": result.get("cache_seconds", 0.0),
            "phase1_epoch_seconds": history["phase1"]["epoch_seconds"],
            "phase2_epoch_seconds": history["phase2"]["epoch_seconds"],
            "phase1_fit_seconds": history["phase1"]["train_seconds"],
            "phase2_fit_seconds": history["phase2"]["train_seconds"],
            "phase1_val_auroc": history["phase1"]["val_auroc"],
            "phase2_val_auroc": history["phase2"]["val_auroc"],
        }
        shutil.rmtree(root, ignore_errors=True)
    c, u = runs["cached"], runs["uncached"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary = {
        "images": n_images,
        "fine_tune_blocks": blocks,
        **runs,
        "phase1_epoch_speedup": round(mean(u["phase1_epoch_seconds"]) / mean(c["phase1_epoch_seconds"]), 1),
        "phase2_epoch_speedup": round(mean(u["phase2_epoch_seconds"]) / mean(c["phase2_epoch_seconds"]), 1),
        "phase1_fit_speedup": round(mean(u["phase1_fit_seconds"]) / mean(c["phase1_fit_seconds"]), 1),
        "phase2_fit_speedup": round(mean(u["phase2_fit_seconds"]) / mean(c["phase2_fit_seconds"]), 1),
        "max_val_auroc_difference": max(
            abs(a - b)
            for a, b in zip(
                c["phase1_val_auroc"] + c["phase2_val_auroc"], u["phase1_val_auroc"] + u["phase2_val_auroc"]
            )
        ),
        "note": "epoch_seconds = fit + validation pass + checkpoint; fit_seconds = the training pass alone; "
        "the cached run also pays cache_seconds once (train + val images through the frozen part)",
    }
    log(
        f"speed-up on {n_images} images: phase 1 epoch x{summary['phase1_epoch_speedup']} (fit x{summary['phase1_fit_speedup']}), "
        f"phase 2 epoch x{summary['phase2_epoch_speedup']} (fit x{summary['phase2_fit_speedup']}); "
        f"largest val AUROC difference {summary['max_val_auroc_difference']:.5f}"
    )
    return summary


# --------------------------------------------------------------------------- continuing a run


def continue_run(source_name: str, run_root: Path) -> tuple[dict, dict]:
    """Copy the finished run ``source_name`` to ``run_root`` to train on from its last epoch;
    returns (what quality.json records as ``continued_from``, the source run's settings)."""
    source = WORK / "runs" / source_name
    source_state = source / "model" / "checkpoints" / "state.json"
    if not source_state.exists() or not (source / "model" / "config.json").exists():
        raise SystemExit(f"--continue-from {source_name}: {rel(source)} holds no finished run")
    if not run_root.exists():  # else an interrupted continuation resumes where it stopped
        shutil.copytree(source, run_root)
    before = json.loads(source_state.read_text())
    settings = json.loads((source / "model" / "config.json").read_text())
    continued = {
        "run": source_name,
        "phase": before["phase"],
        "epochs_before": before["epoch"] + 1,
        "stop_reason_before": before.get("stop_reason"),
    }
    return continued, settings


def continued_config(settings: dict, run_root: Path, train_budget: float):
    """The TrainConfig of a continued run: the source run's own settings, under this call's budget."""
    from training.train import TrainConfig

    return TrainConfig.from_dict(
        {
            **settings,
            "run_root": str(run_root),
            "max_train_seconds": train_budget,
            "continue_after_budget": True,
        }
    )


# --------------------------------------------------------------------------- the run's figures


def phase_info(history: dict, state: dict, name: str) -> tuple[int, int | str, float]:
    """(epochs run, best epoch, mean seconds per epoch) of one training phase."""
    h = history.get(name, {})
    aurocs = h.get("val_auroc", [])
    seconds = h.get("epoch_seconds", [])
    best = (aurocs.index(max(aurocs)) + 1) if aurocs else 0
    if (
        name == "phase2"
        and state.get("baseline")
        and (not aurocs or max(aurocs) <= state["baseline"]["val_auroc"])
    ):
        best = "0 (phase 1 weights kept)"
    return len(aurocs), best, (sum(seconds) / len(seconds) if seconds else 0.0)


def run_result(
    args: argparse.Namespace,
    run_root: Path,
    trained: dict,
    *,
    started: float,
    evaluate_seconds: float,
    focus: dict,
    prep: dict,
    sp: dict | None,
    continued: dict | None,
    command: str,
) -> tuple[dict, float]:
    """quality.json of a trained and evaluated run, and the benchmark's seconds so far."""
    from melanoma.storage import open_storage
    from training.train import CpuTurns

    run = open_storage(str(run_root))
    metrics = json.loads(run.read_bytes("eval/metrics.json"))
    history = json.loads(run.read_bytes("model/history.json"))
    state = json.loads(run.read_bytes("model/checkpoints/state.json"))
    manifest = processed_manifest(run_processed_root(run_root))
    total = time.perf_counter() - started
    waited = CpuTurns.waited
    p1, p2 = phase_info(history, state, "phase1"), phase_info(history, state, "phase2")
    test = metrics["test"]
    result = {
        **evaluation_fields(metrics, focus),
        "train_seconds": round(trained["train_seconds"] - trained["cpu_lock_wait_seconds"], 1),
        "train_wall_seconds": trained["train_seconds"],
        "cache_seconds": trained.get("cache_seconds", 0.0),
        "evaluate_seconds": round(evaluate_seconds, 1),
        "total_seconds": round(total, 1),
        "cpu_lock_wait_seconds": round(waited, 1),
        "total_seconds_excluding_lock_waits": round(total - waited, 1),
        "budget_minutes": args.budget_minutes,
        "model_uri": rel(run_root / "model" / "model.keras"),
        "metrics_uri": rel(run_root / "eval" / "metrics.json"),
        "best_val_auroc": trained["best_val_auroc"],
        "epochs": {
            "phase1": p1[0],
            "phase1_best": p1[1],
            "phase2": p2[0],
            "phase2_best": p2[1],
            "phase2_stopped_by_budget": str(
                (trained.get("stop_reason") or {}).get("phase2") or ""
            ).startswith("time budget"),
            "stop_reason": trained.get("stop_reason"),
        },
        "epoch_seconds": {"phase1": round(p1[2], 2), "phase2": round(p2[2], 1)},
        "settings": {
            k: v
            for k, v in json.loads(run.read_bytes("model/config.json")).items()
            if k not in ("processed_root", "run_root", "extra")
        },
        "counts": split_counts(manifest, test),
        "preprocess": prep,
        "speedup": sp,
        "continued_from": continued,
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "notes": args.notes,
    }
    return result, total
