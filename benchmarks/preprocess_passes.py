"""The timed passes of bench_preprocess.py: the Spark job end to end (and a check of what it
wrote), and the single-process baselines over the same files."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.preprocess_contention import ForeignCpu, contaminated, load_average
from benchmarks.preprocess_corpus import warm_page_cache
from melanoma.spark_settings import submit_conf

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224


def run_spark(
    corpus: Path, drop_id: str, processed: Path, master: str, log: Path
) -> tuple[float, dict, list[str]]:
    """Launch spark-submit and time it to its exit; returns (seconds, the job's summary, command)."""
    if processed.exists():
        shutil.rmtree(processed)
    venv_bin = Path(sys.executable).parent
    env = dict(
        os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", SPARK_LOCAL_IP="127.0.0.1"
    )
    command = [
        "spark-submit",
        "--master",
        master,
        # The DAG's own spark-submit settings (Python, driver JVM options).
        *[arg for key, value in submit_conf(sys.executable).items() for arg in ("--conf", f"{key}={value}")],
        str(ROOT / "spark_jobs" / "preprocess.py"),
        "--raw-root",
        str(corpus),
        "--processed-root",
        str(processed),
        "--drops",
        drop_id,
    ]
    launched, started = time.time(), time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    exited = time.time()
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"spark-submit failed ({code}); see {log}:\n{text[-3000:]}")
    lines = [line for line in text.splitlines() if line.startswith("preprocess: summary ")]
    summary = json.loads(lines[-1].removeprefix("preprocess: summary "))
    clock = summary["wall_clock"]
    summary["outside"] = {
        "launch_to_script_s": round(
            clock["script_started"] - launched, 2
        ),  # JVM (spark-submit) + Python start
        "script_s": round(
            clock["finished"] - clock["script_started"], 2
        ),  # imports, SparkContext, scan, tasks, manifest
        "after_script_s": round(
            exited - clock["finished"], 2
        ),  # SparkContext already stopped: interpreter + JVM exit
    }
    return seconds, summary, command


def check_output(processed: Path, drop_id: str, n_images: int) -> dict:
    manifests = sorted((processed / "processed").glob("manifest-*.json"))
    manifest = json.loads(manifests[-1].read_text())
    accounting = manifest["accounting"][drop_id]
    if accounting["written"] != n_images or accounting["quarantined"] != 0:
        raise SystemExit(f"the job did not write every image: {accounting}")
    shard_bytes = sum((processed / s["key"]).stat().st_size for s in manifest["shards"])
    return {"shards": len(manifest["shards"]), "shard_bytes": shard_bytes, "counts": manifest["counts"]}


def jpeg_reduced_flag(data: bytes) -> int:
    """The IMREAD_REDUCED_COLOR_* flag the job's decoder picks for this JPEG (short side >= 224)."""
    from melanoma.image_decode import jpeg_scale_factor
    from melanoma.image_header import read_image_header

    header = read_image_header(data)
    factor = jpeg_scale_factor(header.width, header.height, SIZE)
    return {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }[factor]


#: name -> what the single-process loop does per image (all read the file and write raw arrays).
BASELINES = {
    "baseline": "the job's own per-image code (melanoma.imaging.preprocess_image_bytes + decode_mask: checks, "
    "reduced-scale decode, resize; the mask decoded and resized), no Spark",
    "baseline_plain_reduced": "cv2.imdecode at the job's reduced JPEG scale (1/2 here) + bilinear resize; images only",
    "baseline_plain_full": "cv2.imdecode at full size + bilinear resize; images only",
}


def run_baseline(name: str, images: list[Path], masks: list[Path | None], out: Path) -> float:
    """One process, one image after another, arrays saved 256 images per file; returns seconds."""
    from melanoma.image_decode import decode_mask
    from melanoma.imaging import preprocess_image_bytes

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cv2.setNumThreads(1)
    flag = jpeg_reduced_flag(images[0].read_bytes()) if name == "baseline_plain_reduced" else cv2.IMREAD_COLOR
    started = time.perf_counter()
    batch_images, batch_masks, n_files = [], [], 0

    def flush() -> None:
        nonlocal n_files
        np.save(out / f"images-{n_files:05d}.npy", np.stack(batch_images))
        if batch_masks:
            np.save(out / f"masks-{n_files:05d}.npy", np.stack(batch_masks))
        batch_images.clear()
        batch_masks.clear()
        n_files += 1

    for image_path, mask_path in zip(images, masks):
        data = image_path.read_bytes()
        if name == "baseline":
            batch_images.append(preprocess_image_bytes(data, SIZE)[0])
            if mask_path is not None:
                batch_masks.append(decode_mask(mask_path.read_bytes(), SIZE))
        else:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            batch_images.append(
                cv2.cvtColor(cv2.resize(bgr, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
            )
        if len(batch_images) == 256:
            flush()
    if batch_images:
        flush()
    return time.perf_counter() - started


def time_spark_runs(
    args: argparse.Namespace, drop_id: str, processed: Path, images: list[Path], all_files: list[Path]
) -> list[dict]:
    """``--spark-runs`` undisturbed Spark runs (at most ``--retries`` more attempts), each timed
    from a warm page cache; every attempt is returned, the contaminated ones marked."""
    spark_runs = []
    attempt = 0
    while (
        sum(not r["contaminated"] for r in spark_runs) < args.spark_runs
        and attempt < args.spark_runs + args.retries
    ):
        warm_page_cache(all_files)
        load = load_average()
        with ForeignCpu() as foreign:
            seconds, summary, command = run_spark(
                args.corpus, drop_id, processed, args.master, args.work / f"spark-{attempt}.log"
            )
        output = check_output(processed, drop_id, len(images))
        spark_runs.append(
            {
                **timed_pass(seconds, len(images), load, foreign),
                "phases": summary["seconds"],
                "executor_seconds": summary["executor_seconds"],
                "tasks": summary["tasks"],
                "wall_clock": summary["outside"],
                "output": output,
            }
        )
        attempt += 1
        print(
            f"spark run {attempt}: {seconds:.1f} s, {len(images) / seconds:.0f} images/s (load {load}, other processes "
            f"{foreign.foreign:.1f} CPU-s, steal {foreign.steal:.1f} s{', CONTAMINATED' if spark_runs[-1]['contaminated'] else ''}); "
            f"phases {summary['seconds']}; executors {summary['executor_seconds']}",
            flush=True,
        )
    return spark_runs


def timed_pass(seconds: float, n_images: int, load: list[float], foreign) -> dict:
    """What every timed pass records: its time and rate, and what else ran meanwhile."""
    return {
        "seconds": round(seconds, 2),
        "images_per_s": round(n_images / seconds, 1),
        "load_average_before": load,
        "foreign_cpu_s": round(foreign.foreign, 1),
        "steal_s": round(foreign.steal, 1),
        "contaminated": contaminated(foreign.foreign, seconds),
    }


def time_baseline(
    name: str, images: list[Path], masks: list[Path | None], all_files: list[Path], work: Path, retries: int
) -> list[dict]:
    """One baseline, timed from a warm page cache until a pass is undisturbed (at most ``retries`` more)."""
    attempts = []
    while not attempts or (attempts[-1]["contaminated"] and len(attempts) <= retries):
        warm_page_cache(all_files)
        load = load_average()
        with ForeignCpu() as foreign:
            seconds = run_baseline(name, images, masks, work / name)
        shutil.rmtree(work / name, ignore_errors=True)
        attempts.append(timed_pass(seconds, len(images), load, foreign))
        print(
            f"{name}: {seconds:.1f} s, {len(images) / seconds:.0f} images/s (load {load}, other processes "
            f"{foreign.foreign:.1f} CPU-s, steal {foreign.steal:.1f} s{', CONTAMINATED' if attempts[-1]['contaminated'] else ''})",
            flush=True,
        )
    return attempts


def time_baselines(
    args: argparse.Namespace, images: list[Path], masks: list[Path | None], all_files: list[Path]
) -> dict:
    """Every baseline of :data:`BASELINES`: name -> its best attempt, what it does, all attempts."""
    baselines = {}
    for name, what in BASELINES.items():
        attempts = time_baseline(name, images, masks, all_files, args.work, args.retries)
        # The fastest undisturbed attempt (else the fastest): the baseline at its best, so
        # the speedup is never flattered by a disturbed baseline.
        best = min([a for a in attempts if not a["contaminated"]] or attempts, key=lambda a: a["seconds"])
        baselines[name] = {**best, "does": what, "attempts": attempts}
    return baselines
