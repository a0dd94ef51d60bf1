"""Benchmark: the Spark preprocess job over all of HAM10000 at 600x450, against a plain loop.

    make bench-preprocess          # = python benchmarks/bench_preprocess.py

1. Builds (or reuses) the corpus with ``make_preprocess_corpus.py``: the 10,015 HAM10000
   images upscaled to 600x450 with noise (~250 KB JPEGs, the originals' cost) and their
   600x450 masks, in ``benchmarks/corpus/`` (gitignored; ~2.5 GB, ~3-9 min once).
2. Times ``spark-submit --master local[2] spark_jobs/preprocess.py`` end to end, from the
   command's launch to its exit (JVM and SparkContext start included), into a fresh processed
   root, and checks its manifest: every image written, nothing quarantined.
3. Times the baselines, one plain Python process each, over the same files: read, decode,
   resize to 224x224, write raw arrays (``np.save``, 256 images per file):
   - ``baseline`` (the one the target is about) runs the job's own per-image code, image and
     mask, without Spark: the job's speedup over it is what Spark's parallelism nets after
     its overheads;
   - ``baseline_plain_reduced`` and ``baseline_plain_full``: plain OpenCV loops, images only,
     decoding at the job's reduced JPEG scale or at full size.
4. Writes ``benchmarks/results/preprocess.json`` and ``preprocess.md`` (a section for
   BENCHMARKS.md).

The timed parts hold the exclusive CPU lock (``/tmp/melanoma-cpu.lock``, ``flock``) so that no
cooperating heavy job runs meanwhile; the load average just before each pass, the CPU time
other processes used during it (sampled from /proc) and the hypervisor's steal time are
recorded. The corpus is read right before each pass, so every pass reads it from the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from melanoma.spark_settings import DRIVER_JAVA_OPTIONS, submit_conf  # noqa: E402

from machine_info import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = Path(os.environ.get("MELANOMA_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ham10000"
DROP_ID = "ham10000-600x450"
TARGET_IMAGES_PER_S = 300
TARGET_SPEEDUP = 1.7
SIZE = 224


@contextlib.contextmanager
def cpu_lock(path: Path, exclusive: bool, wait_s: float):
    """``flock`` on the shared CPU lock file; exclusive around timings, shared around heavy work."""
    path.touch(exist_ok=True)
    with open(path) as handle:
        deadline = time.monotonic() + wait_s
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"could not take the {'exclusive' if exclusive else 'shared'} lock {path} in {wait_s:.0f} s"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def corpus_files(drop: Path) -> tuple[list[Path], list[Path | None]]:
    images = sorted(drop.glob("HAM10000_images_part_*/*.jpg"), key=lambda p: p.name)
    mask_dir = drop / "HAM10000_segmentations"
    masks = [mask_dir / f"{p.stem}_segmentation.png" for p in images]
    return images, [m if m.exists() else None for m in masks]


def warm_page_cache(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                total += len(chunk)
    return total


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


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) for every process /proc shows."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


class ForeignCpu:
    """CPU seconds used by processes that are not this benchmark or its descendants, sampled
    from /proc every 0.25 s while a timed part runs: the contention a load average only hints at.
    (Processes born and gone between two samples are missed; on this machine that is noise.)"""

    def __init__(self) -> None:
        import threading

        self.me = os.getpid()
        self.foreign = 0.0
        self.steal = 0.0  # CPU time the hypervisor gave to other guests (all cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _mine(self, pid: int, table: dict) -> bool:
        seen = 0
        while pid in table and seen < 64:
            if pid == self.me:
                return True
            pid, seen = table[pid][0], seen + 1
        return False

    def _run(self) -> None:
        previous = _process_table()
        while not self._stop.wait(0.25):
            current = _process_table()
            for pid, (_, cpu) in current.items():
                if pid in previous and not self._mine(pid, current):
                    self.foreign += max(0.0, cpu - previous[pid][1])
            previous = current

    @staticmethod
    def _steal() -> float:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0

    def __enter__(self) -> "ForeignCpu":
        self._steal0 = self._steal()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.steal = self._steal() - self._steal0


def machine() -> dict:
    cpu = cpu_model()
    memory = None
    with contextlib.suppress(OSError, ValueError):
        memory = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "pyspark": _pyspark_version(),
    }


def _pyspark_version() -> str | None:
    with contextlib.suppress(ImportError):
        import pyspark

        return pyspark.__version__
    return None


def markdown(result: dict) -> str:
    spark, baselines = result["spark"], result["baselines"]
    targets = result["targets"]
    verdict = (
        f"{'met' if targets['images_per_s_met'] else '**not met**'} for the rate, "
        f"{'met' if targets['speedup_met'] else '**not met**'} for the speed-up"
    )
    runs = "; ".join(
        f"{r['seconds']:.1f} s (load {r['load_average_before'][0]}, other processes {r['foreign_cpu_s']} CPU-s, steal {r['steal_s']} s"
        f"{', contaminated' if r['contaminated'] else ''})"
        for r in result["spark_runs"]
    )
    phases, clock, executor = spark["phases"], spark["wall_clock"], spark["executor_seconds"]
    n = result["images"]
    rows = "\n".join(
        f"| `{name}`: {b['does']} | {b['seconds']:.1f} | {b['images_per_s']:.0f} | {spark['images_per_s'] / b['images_per_s']:.2f}x |"
        for name, b in baselines.items()
    )
    per_image = {k: executor.get(k, 0) / n * 1000 for k in ("decode", "mask", "encode", "write", "read_wait")}
    fixed = (
        clock["launch_to_script_s"]
        + phases.get("engine_start", 0)
        + phases.get("finish", 0)
        + clock["after_script_s"]
    )
    return f"""## Preprocessing (Spark `preprocess` job)

`make bench-preprocess`, {result["date"]}: {result["machine"]["cpu"]}, {result["machine"]["cores"]} cores (shared with other
agents' work; the timed parts held the exclusive CPU lock), pyspark {result["machine"]["pyspark"]}, OpenCV {result["machine"]["opencv"]}.

Corpus: {"all" if n == 10015 else "the first"} {n:,} HAM10000 images upscaled to 600x450 with noise, JPEG q95 4:4:4 (mean
{result["corpus"]["mean_jpeg_bytes"] / 1024:.0f} KB), with their 600x450 PNG masks: {result["corpus"]["bytes"] / 2**30:.2f} GiB
({result["corpus_bytes"]:,} bytes), read from the page cache by every timed pass.

| run | seconds | images/s | Spark vs this |
|---|---:|---:|---:|
| **Spark job**, `local[2]`, end to end: `spark-submit` launch to exit, cold JVM, fresh processed root | {spark["seconds"]:.1f} | **{spark["images_per_s"]:.0f}** | |
{rows}

Targets: >= {TARGET_IMAGES_PER_S} images/s end to end, and >= {TARGET_SPEEDUP}x the single-process baseline (`baseline`, the
same per-image code): {verdict} ({spark["images_per_s"]:.0f} images/s, {result["speedup"]:.2f}x). Spark runs (the median of
those no other process disturbed is reported): {runs}. A pass during which processes outside the benchmark used more
than 5% of the CPU is marked contaminated and run again (up to {result["retries"]} extra times).

Where the {spark["seconds"]:.1f} s go: spark-submit's JVM and the driver's Python start {clock["launch_to_script_s"]:.1f} s;
imports, manifest and drop listing, and SparkContext start {phases.get("engine_start", 0):.1f} s (the drop's scan runs meanwhile and is done
{phases.get("scan_done", 0):.1f} s in); {spark["tasks"]} tasks of 256 images on 2 cores {phases.get("map", 0):.1f} s; quarantine, index and
manifest {phases.get("finish", 0):.2f} s; interpreter and JVM exit {clock["after_script_s"]:.1f} s. That is {fixed:.1f} s fixed cost,
{fixed / spark["seconds"]:.0%} of the run.

Inside the tasks, per image (executor time summed over tasks / {n:,}): decode and checks {per_image["decode"]:.2f} ms, mask
{per_image["mask"]:.2f} ms, shard encoding and sha256 {per_image["encode"]:.2f} ms, writing {per_image["write"]:.2f} ms, reading
{per_image["read_wait"]:.2f} ms. Of the map's {phases.get("map", 0):.1f} s x {executor.get("workers", 2):.0f} workers, summed over the workers: {executor.get("in_tasks", 0):.1f} s in tasks,
{executor.get("idle_before_first_task", 0):.1f} s before their first task (job submission and Python worker start-up), {executor.get("between_tasks", 0):.1f} s
between tasks, {executor.get("idle_after_last_task", 0):.1f} s after their last (the tail, collecting results). Output: {spark["output"]["shards"]} shards,
{spark["output"]["shard_bytes"] / 2**30:.2f} GiB.

Bound: with the per-image code as fast as in `baseline`, two cores and zero overhead would give at most
2 x {baselines["baseline"]["images_per_s"]:.0f} = {2 * baselines["baseline"]["images_per_s"]:.0f} images/s; the fixed {fixed:.1f} s alone caps the end-to-end speedup at
{n / (fixed + n / (2 * baselines["baseline"]["images_per_s"])) / baselines["baseline"]["images_per_s"]:.2f}x on this corpus.

Command: `{result["command"]}`
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help="HAM10000 folder (default: %(default)s)"
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="raw root of the corpus (default: benchmarks/corpus; with --limit, <work>/corpus-small)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "benchmarks" / "work" / "preprocess",
        help="scratch folder (default: %(default)s)",
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results", help="where preprocess.json/.md go"
    )
    parser.add_argument("--master", default="local[2]")
    parser.add_argument(
        "--spark-runs",
        type=int,
        default=3,
        help="timed Spark runs; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="extra attempts when other processes used the CPU meanwhile (default: %(default)s)",
    )
    parser.add_argument(
        "--lock", type=Path, default=Path(os.environ.get("MELANOMA_CPU_LOCK", "/tmp/melanoma-cpu.lock"))
    )
    parser.add_argument("--lock-wait", type=float, default=3600, help="seconds to wait for the CPU lock")
    parser.add_argument("--keep-output", action="store_true", help="keep the processed root")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N images only, in a drop of its own (a quick check, not a result)",
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    if args.corpus is None:
        args.corpus = ROOT / "benchmarks" / "corpus" if args.limit is None else args.work / "corpus-small"
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    drop_id = (
        DROP_ID if args.limit is None else f"{DROP_ID}-first{args.limit}"
    )  # never rebuilds the full corpus
    builder = [
        sys.executable,
        str(ROOT / "benchmarks" / "make_preprocess_corpus.py"),
        "--src",
        str(args.src),
        "--out",
        str(args.corpus),
        "--drop-id",
        drop_id,
    ]
    builder += [] if args.limit is None else ["--limit", str(args.limit)]
    with cpu_lock(args.lock, exclusive=False, wait_s=args.lock_wait):
        subprocess.run(builder, check=True)
    drop = args.corpus / drop_id
    images, masks = corpus_files(drop)
    all_files = [p for p in drop.rglob("*") if p.is_file()]
    corpus = {
        "path": str(drop),
        "images": len(images),
        "masks": sum(m is not None for m in masks),
        "jpeg_bytes": sum(p.stat().st_size for p in images),
        "bytes": sum(p.stat().st_size for p in all_files),
        "size": [600, 450],
        "built_by": "benchmarks/make_preprocess_corpus.py (marker: "
        + str(args.corpus / f"{drop_id}.corpus.json")
        + ")",
    }
    corpus["mean_jpeg_bytes"] = round(corpus["jpeg_bytes"] / max(1, len(images)))

    processed = args.work / "processed-root"
    spark_runs, baselines = [], {}

    # One exclusive hold for every timed pass, so they all run under the same conditions. The
    # corpus is read again right before each pass: this VM pages out file cache that has not
    # been touched for a while (DAMON), which would otherwise turn some reads into disk reads.
    def contaminated(foreign_cpu_s: float, seconds: float) -> bool:
        # Processes that ignore the lock (on a shared machine) used more than 5% of the cores.
        return foreign_cpu_s > max(3.0, 0.05 * seconds * (os.cpu_count() or 1))

    with cpu_lock(args.lock, exclusive=True, wait_s=args.lock_wait):
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
                    "seconds": round(seconds, 2),
                    "images_per_s": round(len(images) / seconds, 1),
                    "load_average_before": load,
                    "foreign_cpu_s": round(foreign.foreign, 1),
                    "steal_s": round(foreign.steal, 1),
                    "contaminated": contaminated(foreign.foreign, seconds),
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
        for name, what in BASELINES.items():
            attempts = []
            while not attempts or (attempts[-1]["contaminated"] and len(attempts) <= args.retries):
                warm_page_cache(all_files)
                load = load_average()
                with ForeignCpu() as foreign:
                    seconds = run_baseline(name, images, masks, args.work / name)
                shutil.rmtree(args.work / name, ignore_errors=True)
                attempts.append(
                    {
                        "seconds": round(seconds, 2),
                        "images_per_s": round(len(images) / seconds, 1),
                        "load_average_before": load,
                        "foreign_cpu_s": round(foreign.foreign, 1),
                        "steal_s": round(foreign.steal, 1),
                        "contaminated": contaminated(foreign.foreign, seconds),
                    }
                )
                print(
                    f"{name}: {seconds:.1f} s, {len(images) / seconds:.0f} images/s (load {load}, other processes "
                    f"{foreign.foreign:.1f} CPU-s, steal {foreign.steal:.1f} s{', CONTAMINATED' if attempts[-1]['contaminated'] else ''})",
                    flush=True,
                )
            # The fastest undisturbed attempt (else the fastest): the baseline at its best, so
            # the speedup is never flattered by a disturbed baseline.
            best = min([a for a in attempts if not a["contaminated"]] or attempts, key=lambda a: a["seconds"])
            baselines[name] = {**best, "does": what, "attempts": attempts}

    clean = [r for r in spark_runs if not r["contaminated"]] or spark_runs
    spark = dict(
        sorted(clean, key=lambda r: r["seconds"])[len(clean) // 2]
    )  # the median of clean runs (upper for even counts)
    images_per_s = spark["images_per_s"]
    speedup = images_per_s / baselines["baseline"]["images_per_s"]
    result = {
        "benchmark": "preprocess",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "make bench-preprocess  (python benchmarks/bench_preprocess.py: spark-submit --master "
        f"{args.master} --conf spark.pyspark.python=<venv python> --conf 'spark.driver.extraJavaOptions={DRIVER_JAVA_OPTIONS}' spark_jobs/preprocess.py --raw-root benchmarks/corpus "
        f"--processed-root <fresh folder> --drops {drop_id})",
        "images": len(images),
        "corpus": corpus,
        "corpus_bytes": corpus["bytes"],
        "seconds": spark["seconds"],
        "images_per_s": images_per_s,
        "baseline_images_per_s": baselines["baseline"]["images_per_s"],
        "speedup": round(speedup, 2),
        "speedups": {name: round(images_per_s / b["images_per_s"], 2) for name, b in baselines.items()},
        "load_average": spark["load_average_before"],
        "spark": spark,
        "spark_runs": spark_runs,
        "retries": args.retries,
        "baselines": baselines,
        "targets": {
            "images_per_s": TARGET_IMAGES_PER_S,
            "speedup": TARGET_SPEEDUP,
            "images_per_s_met": images_per_s >= TARGET_IMAGES_PER_S,
            "speedup_met": speedup >= TARGET_SPEEDUP,
            "met": images_per_s >= TARGET_IMAGES_PER_S and speedup >= TARGET_SPEEDUP,
        },
    }
    if args.limit is None:
        (args.results / "preprocess.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.results / "preprocess.md").write_text(markdown(result))
    else:
        print(f"--limit {args.limit}: a quick check; benchmarks/results/ left as it was")
    print(markdown(result))
    if not args.keep_output:
        shutil.rmtree(processed, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
