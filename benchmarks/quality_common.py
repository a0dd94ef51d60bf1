"""Paths, targets and small helpers that bench_quality.py and its quality_* modules share."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path

from training.machine import numerics

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MELANOMA_SHARED_DATA", ROOT.parent / "shared" / "data"))
WORK = ROOT / "benchmarks" / "work" / "quality"
PROCESSED = WORK / "data"
RESULTS = ROOT / "benchmarks" / "results"
TARGET = {"auroc": 0.93, "auprc": 0.65}
EVAL_RESERVE_S = 240  # evaluate (val + test forward passes, bootstrap) and writing results


LOGGER = logging.getLogger("bench-quality")


def setup_logging() -> None:
    """Log lines to stdout, the benchmark's own and the training's: its per-epoch progress (count,
    rate, ETA) is what shows that a 50-minute training is moving."""
    logging.basicConfig(
        level=logging.INFO, format="[%(name)s %(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )


def log(message: str) -> None:
    LOGGER.info(message)


def rel(path: Path | str) -> str:
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def processed_dir(colour_constancy: str = "none") -> Path:
    """Where the benchmark keeps HAM10000 processed with the given colour constancy: one root per
    method (a processed root keeps the method it started with), so switching does not discard
    the other's data."""
    return PROCESSED if colour_constancy == "none" else WORK / f"data-{colour_constancy}"


def run_processed_root(run_root: Path) -> Path:
    """The processed root a bench run trained on (its model/config.json), so that it is evaluated
    on the same data whichever ``--colour-constancy`` the benchmark is called with now."""
    config = run_root / "model" / "config.json"
    return Path(json.loads(config.read_text())["processed_root"]) if config.exists() else PROCESSED


def processed_manifest(root: Path = PROCESSED) -> dict | None:
    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage

    return latest_manifest(open_storage(root)) if root.is_dir() else None


def machine() -> dict:
    import keras
    import tensorflow as tf

    return {
        **numerics(),
        "cores": os.cpu_count(),
        "gpu": bool(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "platform": platform.platform(),
    }
