"""What the two Spark jobs (:mod:`melanoma.preprocess_job`, :mod:`melanoma.augment_job`) share.

Where the work runs is an *engine*: a context manager yielding ``map_tasks(fn, tasks, what)
-> results`` (in task order). :func:`spark_engine` runs tasks as Spark partitions (the
production path, ``local[N]`` or ``spark://host:7077``); :func:`local_engine` runs them in this
process, for tests. Both log progress (tasks done, rate, ETA) on the driver as tasks finish.
Executors get one storage object per root (:func:`executor_storage`) and one OpenCV thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import cv2

from melanoma.manifest import PROCESSED_PREFIX
from melanoma.progress import Progress
from melanoma.spark_settings import SPARK_DEFAULTS
from melanoma.splits import SPLITS
from melanoma.storage import Storage, open_storage, s3_endpoint_from_env

__all__ = [
    "Engine",
    "MapTasks",
    "count_by_split",
    "executor_setup",
    "executor_storage",
    "label_counts",
    "local_engine",
    "shard_key",
    "spark_engine",
]

log = logging.getLogger(__name__)

MapTasks = Callable[..., list]  # (fn, tasks, what="tasks") -> results, in task order
Engine = Callable[[], "contextlib.AbstractContextManager[MapTasks]"]

#: Seconds between two looks at Spark's task counts (a log line still comes at most every 30 s).
SPARK_POLL_SECONDS = 2.0


def shard_key(drop_id: str, split: str, chunk_index: int, kind: str = "original") -> str:
    suffix = "" if kind == "original" else f"-{kind}"
    return f"{PROCESSED_PREFIX}/shards/{drop_id}/{split}-{chunk_index:05d}{suffix}.zip"


def label_counts(records: list[dict]) -> dict[str, int]:
    labels = [int(r["label"]) for r in records]
    return {"0": labels.count(0), "1": labels.count(1)}


def count_by_split(shards: list[dict], kind: str) -> dict[str, dict[str, int]]:
    counts = {s: {"0": 0, "1": 0} for s in SPLITS}
    for shard in shards:
        if shard["kind"] == kind:
            for label, n in shard["labels"].items():
                counts[shard["split"]][label] += n
    return counts


# --- executor side ----------------------------------------------------------------------------

_STORAGES: dict[tuple[str, str | None], Storage] = {}


def executor_storage(uri: str) -> Storage:
    """One storage object per root and process: executors (reused Python workers) build one
    boto3 client per root, not one per task."""
    key = (uri, s3_endpoint_from_env())
    if key not in _STORAGES:
        storage = open_storage(uri)
        if hasattr(storage, "client"):
            storage.client  # noqa: B018 - create it now, before read-ahead threads share it
        _STORAGES[key] = storage
    return _STORAGES[key]


def executor_setup() -> None:
    # One OpenCV thread per task: Spark already runs one task per core, and OpenCV's own
    # thread pool on top of that oversubscribes the cores (resize and warpAffine use it).
    cv2.setNumThreads(1)


# --- engines ----------------------------------------------------------------------------------


def _completed_tasks(sc, group: str) -> int:
    """Tasks finished so far by the jobs of ``group`` (Spark's status tracker, driver side)."""
    tracker = sc.statusTracker()
    done = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        for stage_id in job.stageIds if job else ():
            stage = tracker.getStageInfo(stage_id)
            done += stage.numCompletedTasks if stage else 0
    return done


def _spark_map(sc, fn: Callable, tasks: list, what: str) -> list:
    """``collect`` in a thread, under its own job group, while this thread logs the tasks done."""
    if not tasks:
        return []
    group, outcome = f"melanoma-{uuid.uuid4().hex}", {}

    def collect() -> None:
        try:
            sc.setJobGroup(group, what)  # a thread-local property: names this thread's jobs
            # One partition per task: outputs depend on the chunking, never on the cluster size.
            outcome["results"] = sc.parallelize(tasks, len(tasks)).map(fn).collect()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = error

    progress = Progress(len(tasks), what, log.info)
    worker = threading.Thread(target=collect, name=f"collect {what}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(SPARK_POLL_SECONDS)
        progress.update(max(progress.done, _completed_tasks(sc, group)))
    if "error" in outcome:
        raise outcome["error"]
    progress.update(len(tasks))
    return outcome["results"]


@contextlib.contextmanager
def spark_engine(app_name: str) -> Iterator[MapTasks]:
    """Run tasks as Spark partitions, one task per partition, on whatever master spark-submit gave.

    Uses a bare SparkContext: the jobs are RDD maps, and SparkSession would add the SQL
    machinery's start-up for nothing.
    """
    # Lazy: only the Spark driver needs pyspark; executors and tests of the jobs' logic do not.
    from pyspark import SparkConf, SparkContext

    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Launched by spark-submit: join its JVM first. A SparkConf made before the gateway
        # exists sees none of spark-submit's --conf settings, and would then override them.
        SparkContext._ensure_initialized()
    conf = SparkConf()
    if not conf.contains("spark.app.name"):
        conf.setAppName(app_name)
    if not conf.contains("spark.master"):
        conf.setMaster("local[2]")  # a plain `python spark_jobs/...py`: spark-submit always sets it
    for key, value in SPARK_DEFAULTS.items():
        if not conf.contains(key):
            conf.set(key, value)
    sc = SparkContext.getOrCreate(conf)
    try:
        yield lambda fn, tasks, what="tasks": _spark_map(sc, fn, tasks, what)
    finally:
        sc.stop()


@contextlib.contextmanager
def local_engine(workers: int = 1) -> Iterator[MapTasks]:
    """Run tasks in this process (``workers`` threads): tests and tools without Spark."""

    def run(results: Iterator, total: int, what: str) -> list:
        progress, out = Progress(total, what, log.info), []
        for result in results:
            out.append(result)
            progress.advance()
        return out

    if workers <= 1:
        yield lambda fn, tasks, what="tasks": run(map(fn, tasks), len(tasks), what)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield lambda fn, tasks, what="tasks": run(pool.map(fn, tasks), len(tasks), what)
