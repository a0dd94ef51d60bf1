"""Ingestion logic behind the Spark ``preprocess`` and ``augment`` jobs (importable, Spark-free, testable).

Flow for one preprocess run (:func:`run_preprocess`):

1. driver: the newest manifest says which requested drops are new; none -> nothing is written
   and no executor is started;
2. driver: each new drop is scanned (metadata and listing only, :func:`plan_drop`); its usable
   inputs, sorted by image id, are cut into chunks of ``shard_size`` images;
3. executors: each chunk is read, validated, decoded and resized, and written as one shard per
   split (:func:`process_chunk`); only a small :class:`ChunkResult` goes back to the driver;
4. driver: the quarantine file and per-drop index are written, ``inputs == written +
   quarantined`` is checked per drop, and the manifest is committed last (:func:`finish_drops`).

Chunks depend only on the drop's content, never on the parallelism, so outputs are
byte-identical however many executors run them, and a drop already in the manifest is
skipped: reruns and backfills write nothing new.

Where the work runs is an *engine*: a context manager yielding ``map_tasks(fn, tasks) ->
results`` (in task order). :func:`spark_engine` runs tasks as Spark partitions (the production
path, ``local[N]`` or ``spark://host:7077``); :func:`local_engine` runs them in this process,
for tests. The driver scans the drops in a thread while the engine starts: on S3 the scan
mostly waits on the listing and metadata GETs, which then overlap Spark's start-up (on a
local folder with two busy cores it is a wash: 2.5 s to a ready SparkContext either way).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from melanoma import drops as drops_mod
from melanoma.imaging import COLOUR_CONSTANCY, PREPROCESSING, RejectedImage, colour_constancy_of, decode_mask, preprocess_image_bytes
from melanoma.manifest import PROCESSED_PREFIX, commit_manifest, latest_manifest, require_manifest
from melanoma.records import IMAGE_SIZE, encode_shard, sha256_hex
from melanoma.spark_settings import SPARK_DEFAULTS
from melanoma.splits import DEFAULT_FRACTIONS, SPLITS, assign_split, split_description
from melanoma.storage import LocalStorage, ObjectRefused, Storage, open_storage, s3_endpoint_from_env

log = logging.getLogger(__name__)

PREPROCESSING_VERSION = "2"  # 2: colour constancy (recorded per root, see root_colour_constancy)
#: Images per chunk (one Spark task, up to three shards: one per split). 256 images make
#: ~40 tasks for HAM10000's 10,015 (20 per core on local[2], so the last wave is short) and
#: keep a task's memory near 200 MB (arrays, masks and the encoded shard).
DEFAULT_SHARD_SIZE = 256
#: Concurrent object reads inside one task: S3/MinIO reads are latency-bound (one GET per
#: image and mask), so a task reads ahead while it decodes; OpenCV releases the GIL.
READ_AHEAD_THREADS = 8

MapTasks = Callable[[Callable, list], list]
Engine = Callable[[], "contextlib.AbstractContextManager[MapTasks]"]


@dataclass
class ChunkTask:
    """One unit of executor work: up to ``shard_size`` inputs of one drop."""

    raw_root: str
    processed_root: str
    drop_id: str
    chunk_index: int
    items: list[dict]  # InputItem fields
    colour_constancy: str = COLOUR_CONSTANCY[0]


@dataclass
class ChunkResult:
    drop_id: str
    chunk_index: int
    shards: list[dict] = field(default_factory=list)  # manifest shard entries
    index: list[dict] = field(default_factory=list)  # {image_id, lesion_id, split, label}
    quarantined: list[dict] = field(default_factory=list)  # QuarantineEntry dicts
    conversions: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # executor time by step (profiling; not in any output)
    span: tuple[int, float, float] = (0, 0.0, 0.0)  # (worker pid, start, end) in epoch seconds (profiling)


def shard_key(drop_id: str, split: str, chunk_index: int, kind: str = "original") -> str:
    suffix = "" if kind == "original" else f"-{kind}"
    return f"{PROCESSED_PREFIX}/shards/{drop_id}/{split}-{chunk_index:05d}{suffix}.zip"


def quarantine_key(drop_id: str) -> str:
    return f"{PROCESSED_PREFIX}/quarantine-{drop_id}.jsonl"


def index_key(drop_id: str) -> str:
    return f"{PROCESSED_PREFIX}/index/{drop_id}.json"


listing_key = drops_mod.listing_key


def label_counts(records: list[dict]) -> dict[str, int]:
    labels = [int(r["label"]) for r in records]
    return {"0": labels.count(0), "1": labels.count(1)}


def record_for(item: dict, split: str, conversions: list[str], has_mask: bool) -> dict:
    return {
        "image_id": item["image_id"],
        "lesion_id": item["lesion_id"],
        "label": int(item["label"]),
        "dx": item["dx"],
        "split": split,
        "source_drop": item["source_drop"],
        "kind": "original",
        "augment_of": None,
        "age": item.get("age"),
        "sex": item.get("sex"),
        "localization": item.get("localization"),
        "has_mask": has_mask,
        "conversions": conversions,
    }


def _quarantine(drop_id: str, item_id: str, reason: str, detail: str) -> dict:
    return {"drop_id": drop_id, "item": item_id, "reason": reason, "detail": detail}


# --- executor side ----------------------------------------------------------------------------

_STORAGES: dict[tuple[str, str | None], Storage] = {}


def _storage(uri: str) -> Storage:
    """One storage object per root and process: executors (reused Python workers) build one
    boto3 client per root, not one per task."""
    key = (uri, s3_endpoint_from_env())
    if key not in _STORAGES:
        storage = open_storage(uri)
        if hasattr(storage, "client"):
            storage.client  # noqa: B018 - create it now, before read-ahead threads share it
        _STORAGES[key] = storage
    return _STORAGES[key]


def _executor_setup() -> None:
    # One OpenCV thread per task: Spark already runs one task per core, and OpenCV's own
    # thread pool on top of that oversubscribes the cores (resize and warpAffine use it).
    import cv2

    cv2.setNumThreads(1)


#: Errors of the machine, not of the bytes (memory, I/O, timeouts): they fail the task so that
#: its retry redoes the work; only a property of the bytes may quarantine an input.
RESOURCE_ERRORS = (MemoryError, OSError)


def _read(storage: Storage, key: str | None) -> bytes | Exception | None:
    """An object's bytes, or the error saying it is gone or refused for good (other errors propagate)."""
    if key is None:
        return None
    try:
        return storage.read_bytes(key)
    except (FileNotFoundError, ObjectRefused) as lost:
        return lost


def _read_ahead(storage: Storage, items: list[dict]) -> Iterator[tuple[bytes | Exception, bytes | Exception | None]]:
    """(image bytes, mask bytes) per item, in order; from object storage, read concurrently ahead.

    A local folder is read in line: a page-cached 250 KB file costs ~0.1 ms, so threads
    would hide nothing and their wake-ups would compete with the decoding for the cores.
    On the first read that fails, the queued reads are cancelled and the error raised at
    once: waiting for them would only meet the same dead store again, read after read.
    """
    if isinstance(storage, LocalStorage):
        for item in items:
            yield _read(storage, item["image_key"]), _read(storage, item.get("mask_key"))
        return
    pool = ThreadPoolExecutor(max_workers=READ_AHEAD_THREADS)
    try:
        pending: list[tuple[Future, Future]] = [
            (pool.submit(_read, storage, item["image_key"]), pool.submit(_read, storage, item.get("mask_key"))) for item in items
        ]
        for image, mask in pending:
            yield image.result(), mask.result()
    finally:
        # Normal end: nothing is queued any more. After a failure (or an abandoned generator):
        # drop the queue and do not wait for reads in flight, each bounded by the client's timeouts.
        pool.shutdown(wait=False, cancel_futures=True)


def _decode(item: dict, data: bytes | Exception, colour_constancy: str = COLOUR_CONSTANCY[0]) -> tuple[np.ndarray | None, list[str], tuple[str, str] | None]:
    """(image, notes, None) or (None, [], (reason, detail)) for one input's bytes."""
    if isinstance(data, FileNotFoundError):
        # Listed at scan time, gone now (deleted mid-run): the row's image is missing.
        return None, [], ("missing-image", str(data))
    if isinstance(data, ObjectRefused):
        return None, [], ("refused-object", str(data))
    try:
        image, notes = preprocess_image_bytes(data, IMAGE_SIZE, colour_constancy=colour_constancy)
        return image, notes, None
    except RejectedImage as rejected:
        return None, [], (rejected.reason, rejected.message)  # the reason is its own field, not repeated
    except RESOURCE_ERRORS:
        raise
    except Exception as error:  # noqa: BLE001 - a decoder failure we did not foresee is this input's problem
        # Storage errors never reach here (they propagate from the reads) and resource
        # errors are re-raised above, so Spark retries the task instead of quarantining.
        return None, [], ("undecodable", f"unexpected {type(error).__name__} while decoding: {str(error)[:200]}")


def _decode_mask(data: bytes | Exception | None) -> tuple[np.ndarray | None, str | None]:
    """(mask, None), or (None, why) when there is no usable mask."""
    if data is None:
        return None, None
    if isinstance(data, FileNotFoundError):
        return None, "missing"
    if isinstance(data, ObjectRefused):
        return None, "refused-object"
    try:
        return decode_mask(data, IMAGE_SIZE), None
    except RejectedImage as rejected:
        return None, rejected.reason
    except RESOURCE_ERRORS:
        raise
    except Exception as error:  # noqa: BLE001 - as in _decode: the mask's problem, not the task's
        return None, f"undecodable ({type(error).__name__})"


def process_chunk(task: ChunkTask) -> ChunkResult:
    """Executor side: read, validate, decode and resize one chunk and write its shards.

    Returns only metadata (shard entries, index rows, quarantine entries, counts): the
    arrays never travel back to the driver.
    """
    began = time.time()
    _executor_setup()
    raw, out = _storage(task.raw_root), _storage(task.processed_root)
    result = ChunkResult(task.drop_id, task.chunk_index)
    seconds = dict.fromkeys(("read_wait", "decode", "mask", "encode", "write"), 0.0)
    by_split: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    empty_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    clock = time.perf_counter()
    for item, (data, mask_data) in zip(task.items, _read_ahead(raw, task.items)):
        now = time.perf_counter()
        seconds["read_wait"] += now - clock
        image, notes, rejection = _decode(item, data, task.colour_constancy)
        clock, now = now, time.perf_counter()
        seconds["decode"] += now - clock
        if rejection is not None:
            result.quarantined.append(_quarantine(task.drop_id, item["image_id"], *rejection))
            clock = time.perf_counter()
            continue
        mask, mask_problem = _decode_mask(mask_data)
        if mask_problem is not None:
            # A bad mask costs the image its lesion-focus score, not its place in training.
            notes = [*notes, f"mask-unusable: {mask_problem}"]
        split = assign_split(item["lesion_id"])
        images, masks, records = by_split[split]
        images.append(image)
        masks.append(empty_mask if mask is None else mask)
        records.append(record_for(item, split, notes, mask is not None))
        for note in notes:
            result.conversions[note] = result.conversions.get(note, 0) + 1
        clock = time.perf_counter()
        seconds["mask"] += clock - now
    for split, (images, masks, records) in by_split.items():
        if not records:
            continue
        started = time.perf_counter()
        data = encode_shard(np.stack(images), np.stack(masks), records)
        digest = sha256_hex(data)
        key = shard_key(task.drop_id, split, task.chunk_index)
        written = time.perf_counter()
        out.write_bytes(key, data)
        seconds["encode"] += written - started
        seconds["write"] += time.perf_counter() - written
        result.shards.append(
            {
                "key": key,
                "drop": task.drop_id,
                "split": split,
                "kind": "original",
                "count": len(records),
                "sha256": digest,
                "labels": label_counts(records),
            }
        )
        result.index.extend(
            {"image_id": r["image_id"], "lesion_id": r["lesion_id"], "split": split, "label": r["label"]} for r in records
        )
    result.seconds = {k: round(v, 4) for k, v in seconds.items()}
    result.span = (os.getpid(), began, time.time())
    return result


# --- driver side ------------------------------------------------------------------------------


@dataclass
class DropPlan:
    """Driver side: what one drop contributes before any image is decoded."""

    drop_id: str
    layout: str
    n_inputs: int
    tasks: list[ChunkTask]
    quarantined: list[dict]
    listing: dict[str, int] = field(default_factory=dict)  # key -> size at scan time


def known_image_ids(out: Storage, manifest: dict | None) -> dict[str, str]:
    """image_id -> drop id, over every drop already processed (read from per-drop indexes)."""
    known: dict[str, str] = {}
    for drop_id in (manifest or {}).get("drops", []):
        for entry in json.loads(out.read_bytes(index_key(drop_id))):
            known[entry["image_id"]] = drop_id
    return known


def root_colour_constancy(previous: dict | None) -> str:
    """The colour constancy of a processed root: what its manifest records, else the default.

    A root keeps the preprocessing it started with (shards of one root, hence one model's
    training data, never mix two), so a root made before colour constancy goes on without it.
    """
    return colour_constancy_of(previous["preprocessing"]) if previous else COLOUR_CONSTANCY[0]


def plan_drop(raw_root: str, processed_root: str, drop_id: str, known: dict[str, str], *, layout: str = "auto",
              shard_size: int = DEFAULT_SHARD_SIZE, colour_constancy: str = COLOUR_CONSTANCY[0]) -> DropPlan:
    """Scan a drop and cut it into chunk tasks; ``known`` gains this drop's image ids.

    An image id already in ``known`` (ingested from an earlier drop, or from an earlier drop
    of this run) is quarantined as ``duplicate-image-id``: the first drop to bring an image
    keeps it. Chunks are consecutive runs of the usable inputs sorted by image id.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    scan = drops_mod.scan_drop(open_storage(raw_root), drop_id, layout)
    quarantined = [q if isinstance(q, dict) else q.to_json() for q in scan.quarantined]
    usable = []
    for item in scan.inputs:
        if item.image_id in known:
            quarantined.append(
                _quarantine(drop_id, item.image_id, "duplicate-image-id", f"image id already ingested from drop {known[item.image_id]!r}")
            )
            continue
        known[item.image_id] = drop_id
        usable.append(asdict(item))
    usable.sort(key=lambda item: item["image_id"])
    tasks = [
        ChunkTask(raw_root, processed_root, drop_id, index, usable[start : start + shard_size], colour_constancy)
        for index, start in enumerate(range(0, len(usable), shard_size))
    ]
    return DropPlan(drop_id, scan.layout, scan.n_inputs, tasks, quarantined, scan.listing)


def plan_drops(raw_root: str, processed_root: str, previous: dict | None, drop_ids: list[str], *, layout: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE) -> list[DropPlan]:
    """Plans for ``drop_ids`` in order, duplicates checked against ``previous`` and each other."""
    known = known_image_ids(open_storage(processed_root), previous)
    colour = root_colour_constancy(previous)
    return [plan_drop(raw_root, processed_root, d, known, layout=layout, shard_size=shard_size, colour_constancy=colour)
            for d in drop_ids]


def pending_drops(raw: Storage, manifest: dict | None, requested: list[str] | None) -> list[str]:
    """Drops to process now: the requested ones (default: every drop under the raw root), minus those done."""
    done = set((manifest or {}).get("drops", []))
    available = drops_mod.list_drops(raw)
    wanted = requested if requested else available
    missing = [d for d in wanted if d not in available]
    if missing:
        raise FileNotFoundError(f"drop(s) {missing} not found under {raw.root_uri} (found: {available})")
    return sorted(d for d in wanted if d not in done)


def count_by_split(shards: list[dict], kind: str) -> dict[str, dict[str, int]]:
    counts = {s: {"0": 0, "1": 0} for s in SPLITS}
    for shard in shards:
        if shard["kind"] == kind:
            for label, n in shard["labels"].items():
                counts[shard["split"]][label] += n
    return counts


def finish_drops(out: Storage, previous: dict | None, plans: list[DropPlan], results: list[ChunkResult], *, logical_date: str | None) -> dict:
    """Driver side: check the accounting, write quarantine files and indexes, and return the
    next manifest (not yet committed). ``results`` may come in any order.

    Raises RuntimeError, before writing anything, when a drop's ``inputs != written +
    quarantined`` or a chunk result is missing, duplicated or foreign.
    """
    shards = list((previous or {}).get("shards", []))
    accounting = dict((previous or {}).get("accounting", {}))
    by_drop: dict[str, list[ChunkResult]] = {}
    for result in results:
        by_drop.setdefault(result.drop_id, []).append(result)
    unknown = set(by_drop) - {p.drop_id for p in plans}
    if unknown:
        raise RuntimeError(f"chunk results for drops not planned in this run: {sorted(unknown)}")
    outputs = []
    for plan in plans:
        chunk_results = sorted(by_drop.get(plan.drop_id, []), key=lambda r: r.chunk_index)
        got = [r.chunk_index for r in chunk_results]
        if got != [t.chunk_index for t in plan.tasks]:
            raise RuntimeError(f"drop {plan.drop_id}: chunk results {got} do not match its {len(plan.tasks)} planned chunks")
        quarantined = plan.quarantined + [q for r in chunk_results for q in r.quarantined]
        quarantined.sort(key=lambda q: (q["item"], q["reason"], q["detail"]))
        index = sorted((e for r in chunk_results for e in r.index), key=lambda e: e["image_id"])
        written = len(index)
        if plan.n_inputs != written + len(quarantined):
            raise RuntimeError(
                f"accounting broken for drop {plan.drop_id}: {plan.n_inputs} inputs != {written} written + {len(quarantined)} quarantined"
            )
        if sum(s["count"] for r in chunk_results for s in r.shards) != written:
            raise RuntimeError(f"accounting broken for drop {plan.drop_id}: shard counts disagree with the {written} indexed images")
        outputs.append((plan, chunk_results, quarantined, index))
    for plan, chunk_results, quarantined, index in outputs:
        out.write_bytes(quarantine_key(plan.drop_id), "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantined).encode())
        out.write_bytes(index_key(plan.drop_id), json.dumps(index, sort_keys=True).encode())
        out.write_bytes(listing_key(plan.drop_id), json.dumps(plan.listing, sort_keys=True).encode())
        conversions: dict[str, int] = {}
        for r in chunk_results:
            for note, n in r.conversions.items():
                conversions[note] = conversions.get(note, 0) + n
        reasons: dict[str, int] = {}
        for q in quarantined:
            reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        accounting[plan.drop_id] = {
            "layout": plan.layout,
            "inputs": plan.n_inputs,
            "written": len(index),
            "quarantined": len(quarantined),
            "quarantine_key": quarantine_key(plan.drop_id),
            "quarantine_reasons": dict(sorted(reasons.items())),
            "conversions": dict(sorted(conversions.items())),
        }
        shards.extend(s for r in chunk_results for s in r.shards)
    shards.sort(key=lambda s: s["key"])
    return {
        "logical_date": logical_date,
        "drops": sorted(accounting),
        "preprocessing": {
            "version": PREPROCESSING_VERSION,
            "function": "melanoma.imaging.preprocess_image_bytes",
            "mask_function": "melanoma.imaging.decode_mask",
            **PREPROCESSING,
            "colour_constancy": root_colour_constancy(previous),
        },
        "split": split_description(DEFAULT_FRACTIONS),
        "shards": shards,
        "counts": count_by_split(shards, "original"),
        "augmented_counts": count_by_split(shards, "augmented"),
        "accounting": dict(sorted(accounting.items())),
        "augmentation": (previous or {}).get("augmentation"),
    }


def describe(manifest: dict) -> str:
    """One line for logs: drops, images per split, quarantined."""
    counts = manifest["counts"]
    per_split = ", ".join(f"{s} {c['0'] + c['1']} ({c['1']} mel)" for s, c in counts.items())
    quarantined = sum(a["quarantined"] for a in manifest["accounting"].values())
    return f"drops {manifest['drops']}: {per_split}; quarantined {quarantined}"


def _executor_seconds(results: list[ChunkResult], map_started: float, map_ended: float) -> dict[str, float]:
    """Executor time by step, summed over tasks, and how the map's wall time was used.

    ``idle_before_first_task``: from the map's start to each worker's first task (Python
    worker start-up, task shipping), summed over workers; ``between_tasks``: gaps between a
    worker's tasks; ``idle_after_last_task``: from each worker's last task to the map's end
    (the tail, and collecting the results). Epoch times, so only meaningful on one machine.
    """
    total: dict[str, float] = {}
    for r in results:
        for step, s in r.seconds.items():
            total[step] = total.get(step, 0.0) + s
    spans: dict[int, list[tuple[float, float]]] = {}
    for r in results:
        pid, start, end = r.span
        spans.setdefault(pid, []).append((start, end))
    if spans:
        total["workers"] = len(spans)
        total["in_tasks"] = sum(end - start for runs in spans.values() for start, end in runs)
        total["idle_before_first_task"] = sum(min(s for s, _ in runs) - map_started for runs in spans.values())
        total["between_tasks"] = sum(
            later[0] - earlier[1] for runs in spans.values() for earlier, later in zip(sorted(runs), sorted(runs)[1:])
        )
        total["idle_after_last_task"] = sum(map_ended - max(e for _, e in runs) for runs in spans.values())
    return {k: round(v, 2) for k, v in total.items()}


def run_preprocess(
    raw_root: str,
    processed_root: str,
    engine: Engine,
    *,
    drops: list[str] | None = None,
    layout: str = "auto",
    logical_date: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> dict:
    """One preprocess run, driver side; returns a summary (``manifest_key`` None when there was nothing to do).

    The engine is started only when some requested drop is new, and in parallel with the scan.
    """
    started = time.perf_counter()
    raw, out = open_storage(raw_root), open_storage(processed_root)
    previous = latest_manifest(out)
    todo = pending_drops(raw, previous, drops)
    summary: dict = {"drops": todo, "manifest_key": None, "inputs": 0, "written": 0, "quarantined": 0, "tasks": 0,
                     "late_files": drops_mod.report_late_files(raw, out, previous, drops)}
    if not todo:
        return summary
    timings: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The scan reads metadata only; the engine's start mostly waits on the JVM. On object
        # storage the scan's waits overlap that start; locally it neither helps nor hurts.
        planning = pool.submit(plan_drops, raw_root, processed_root, previous, todo, layout=layout, shard_size=shard_size)
        with engine() as map_tasks:
            timings["engine_start"] = time.perf_counter() - started
            plans = planning.result()
            timings["scan_done"] = time.perf_counter() - started
            tasks = [t for p in plans for t in p.tasks]
            mapped, map_started = time.perf_counter(), time.time()
            results = map_tasks(process_chunk, tasks) if tasks else []
            timings["map"] = time.perf_counter() - mapped
            map_ended = time.time()
    stopped = time.perf_counter()
    manifest = finish_drops(out, previous, plans, results, logical_date=logical_date)
    key = commit_manifest(out, manifest)
    timings["finish"] = time.perf_counter() - stopped
    timings["total"] = time.perf_counter() - started
    summary.update(
        manifest_key=key,
        manifest_uri=out.uri(key),
        inputs=sum(p.n_inputs for p in plans),
        written=sum(manifest["accounting"][p.drop_id]["written"] for p in plans),
        quarantined=sum(manifest["accounting"][p.drop_id]["quarantined"] for p in plans),
        tasks=len(tasks),
        layouts={p.drop_id: p.layout for p in plans},
        description=describe(manifest),
        seconds={k: round(v, 2) for k, v in timings.items()},
        executor_seconds=_executor_seconds(results, map_started, map_ended),
    )
    return summary


# --- engines ----------------------------------------------------------------------------------

@contextlib.contextmanager
def spark_engine(app_name: str) -> Iterator[MapTasks]:
    """Run tasks as Spark partitions, one task per partition, on whatever master spark-submit gave.

    Uses a bare SparkContext: the jobs are RDD maps, and SparkSession would add the SQL
    machinery's start-up for nothing.
    """
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

        def map_tasks(fn: Callable, tasks: list) -> list:
            # One partition per task: outputs depend on the chunking, never on the cluster size.
            return sc.parallelize(tasks, len(tasks)).map(fn).collect() if tasks else []

        yield map_tasks
    finally:
        sc.stop()


@contextlib.contextmanager
def local_engine(workers: int = 1) -> Iterator[MapTasks]:
    """Run tasks in this process (``workers`` threads): tests and tools without Spark."""
    if workers <= 1:
        yield lambda fn, tasks: [fn(t) for t in tasks]
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield lambda fn, tasks: list(pool.map(fn, tasks))


# --- augmentation (the Spark ``augment`` job) -------------------------------------------------

COPIES_PER_MELANOMA = 2


@dataclass
class AugmentTask:
    """Augment the melanoma images of one original training shard."""

    processed_root: str
    source: dict  # the manifest entry of the original shard
    copies: int = COPIES_PER_MELANOMA


def augmented_key(source_key: str) -> str:
    return source_key.removesuffix(".zip") + "-augmented.zip"


def augment_tasks(processed_root: str, manifest: dict, copies: int = COPIES_PER_MELANOMA) -> list[AugmentTask]:
    """Training shards with melanoma images whose augmented shard is not in the manifest yet.

    Validation and test shards never get a task, whatever their labels.
    """
    done = {s.get("augment_of") for s in manifest["shards"] if s["kind"] == "augmented"}
    return [
        AugmentTask(processed_root, s, copies)
        for s in manifest["shards"]
        if s["kind"] == "original" and s["split"] == "train" and s["labels"]["1"] > 0 and s["key"] not in done
    ]


def augment_shard(task: AugmentTask) -> dict:
    """Executor side: write ``copies`` augmented versions of each melanoma image; returns the shard entry."""
    from melanoma.augment import augment_pair, augmented_image_id
    from melanoma.manifest import read_verified_shard

    if task.source["split"] != "train" or task.source["kind"] != "original":
        raise ValueError(f"refusing to augment {task.source['key']}: only original training shards are augmented")
    _executor_setup()
    out = _storage(task.processed_root)
    shard = read_verified_shard(out, task.source)
    images, masks, records = [], [], []
    for image, mask, record in zip(shard.images, shard.masks, shard.records):
        if record["label"] != 1:
            continue
        for copy_index in range(1, task.copies + 1):
            new_image, new_mask = augment_pair(image, mask, record["image_id"], copy_index)
            images.append(new_image)
            masks.append(new_mask)
            records.append(
                dict(record, image_id=augmented_image_id(record["image_id"], copy_index), kind="augmented", augment_of=record["image_id"])
            )
    data = encode_shard(np.stack(images), np.stack(masks), records)
    key = augmented_key(task.source["key"])
    out.write_bytes(key, data)
    return {
        "key": key,
        "drop": task.source["drop"],
        "split": "train",
        "kind": "augmented",
        "augment_of": task.source["key"],
        "count": len(records),
        "sha256": sha256_hex(data),
        "labels": label_counts(records),
    }


def finish_augment(previous: dict, new_shards: list[dict], *, logical_date: str | None, copies: int) -> dict:
    """The next manifest: the previous one plus the augmented shards."""
    from melanoma.augment import AUGMENT_PARAMS

    shards = sorted([*previous["shards"], *new_shards], key=lambda s: s["key"])
    return dict(
        previous,
        logical_date=logical_date,
        shards=shards,
        augmented_counts=count_by_split(shards, "augmented"),
        augmentation={"copies_per_melanoma": copies, "applies_to": "train split, label 1", "params": AUGMENT_PARAMS},
    )


def run_augment(processed_root: str, engine: Engine, *, copies: int = COPIES_PER_MELANOMA, logical_date: str | None = None) -> dict:
    """One augment run, driver side; returns a summary (``manifest_key`` None when there was nothing to do)."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    out = open_storage(processed_root)
    previous = require_manifest(out)
    tasks = augment_tasks(processed_root, previous, copies)
    summary: dict = {"manifest_key": None, "shards": 0, "images": 0}
    if not tasks:
        return summary
    with engine() as map_tasks:
        new_shards = map_tasks(augment_shard, tasks)
    manifest = finish_augment(previous, new_shards, logical_date=logical_date or previous.get("logical_date"), copies=copies)
    key = commit_manifest(out, manifest)
    summary.update(manifest_key=key, manifest_uri=out.uri(key), shards=len(new_shards), images=sum(s["count"] for s in new_shards))
    return summary
