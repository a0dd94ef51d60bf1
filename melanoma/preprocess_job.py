"""Driver side of the Spark ``preprocess`` job (importable, Spark-free, testable).

Flow for one preprocess run (:func:`run_preprocess`):

1. driver: the newest manifest says which requested drops are new; none -> nothing is written
   and no executor is started;
2. driver: each new drop is scanned (metadata and listing only, :func:`plan_drop`); its usable
   inputs, sorted by image id, are cut into chunks of ``shard_size`` images;
3. executors: each chunk is read, validated, decoded and resized, and written as one shard per
   split (:func:`melanoma.preprocess_chunk.process_chunk`); only a small :class:`ChunkResult` goes back to the driver;
4. driver: the quarantine file and per-drop index are written, ``inputs == written +
   quarantined`` is checked per drop, and the manifest is committed last (:func:`finish_drops`).

Chunks depend only on the drop's content, never on the parallelism, so outputs are
byte-identical however many executors run them, and a drop already in the manifest is
skipped: reruns and backfills write nothing new.

Where the work runs is an *engine* (:mod:`melanoma.job_common`: Spark partitions, or this
process for tests); it logs the chunks done, their rate and an ETA as they finish. The driver scans the drops in a thread while the engine starts: on S3 the scan
mostly waits on the listing and metadata GETs, which then overlap Spark's start-up (on a
local folder with two busy cores it is a wash: 2.5 s to a ready SparkContext either way).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from melanoma import drops as drops_mod
from melanoma.colour_constancy import COLOUR_CONSTANCY, colour_constancy_of
from melanoma.drop_scan import scan_drop
from melanoma.imaging import PREPROCESSING
from melanoma.job_common import Engine, count_by_split
from melanoma.manifest import PROCESSED_PREFIX, commit_manifest, latest_manifest
from melanoma.preprocess_chunk import ChunkResult, ChunkTask, process_chunk, quarantine_entry
from melanoma.splits import DEFAULT_FRACTIONS, split_description
from melanoma.storage import Storage, open_storage

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "PREPROCESSING_VERSION",
    "DropPlan",
    "describe",
    "executor_seconds",
    "finish_drops",
    "index_key",
    "known_image_ids",
    "listing_key",
    "pending_drops",
    "plan_drop",
    "plan_drops",
    "quarantine_key",
    "root_colour_constancy",
    "run_preprocess",
]

log = logging.getLogger(__name__)

#: 2: colour constancy (recorded per root, see root_colour_constancy); 3: images sharper than the
#: training data reduced to its detail (melanoma.imaging.match_source_detail).
PREPROCESSING_VERSION = "3"
#: Images per chunk (one Spark task, up to three shards: one per split). 256 images make
#: ~40 tasks for HAM10000's 10,015 (20 per core on local[2], so the last wave is short) and
#: keep a task's memory near 200 MB (arrays, masks and the encoded shard).
DEFAULT_SHARD_SIZE = 256


def quarantine_key(drop_id: str) -> str:
    return f"{PROCESSED_PREFIX}/quarantine-{drop_id}.jsonl"


def index_key(drop_id: str) -> str:
    return f"{PROCESSED_PREFIX}/index/{drop_id}.json"


listing_key = drops_mod.listing_key


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


def root_colour_constancy(previous: dict | None, requested: str | None = None) -> str:
    """The colour constancy of a processed root: what its manifest records, else ``requested``
    (a new root), else the default.

    A root keeps the preprocessing it started with (shards of one root, hence one model's
    training data, never mix two), so a root made before colour constancy goes on without it,
    and asking an existing root for another method is an error, not a silent mix.
    """
    if requested is not None and requested not in COLOUR_CONSTANCY:
        raise ValueError(f"colour_constancy must be one of {COLOUR_CONSTANCY}, got {requested!r}")
    if previous is None:
        return requested or COLOUR_CONSTANCY[0]
    recorded = colour_constancy_of(previous["preprocessing"])
    if requested is not None and requested != recorded:
        raise ValueError(
            f"this processed root was started with colour constancy {recorded!r}; {requested!r} would "
            "mix two preprocessings in one root: use a new processed root for it"
        )
    return recorded


def plan_drop(
    raw_root: str,
    processed_root: str,
    drop_id: str,
    known: dict[str, str],
    *,
    layout: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    colour_constancy: str = COLOUR_CONSTANCY[0],
) -> DropPlan:
    """Scan a drop and cut it into chunk tasks; ``known`` gains this drop's image ids.

    An image id already in ``known`` (ingested from an earlier drop, or from an earlier drop
    of this run) is quarantined as ``duplicate-image-id``: the first drop to bring an image
    keeps it. Chunks are consecutive runs of the usable inputs sorted by image id.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    scan = scan_drop(open_storage(raw_root), drop_id, layout)
    quarantined = [q if isinstance(q, dict) else q.to_json() for q in scan.quarantined]
    usable = []
    for item in scan.inputs:
        if item.image_id in known:
            quarantined.append(
                quarantine_entry(
                    drop_id,
                    item.image_id,
                    "duplicate-image-id",
                    f"image id already ingested from drop {known[item.image_id]!r}",
                )
            )
            continue
        known[item.image_id] = drop_id
        usable.append(asdict(item))
    usable.sort(key=lambda item: item["image_id"])
    tasks = [
        ChunkTask(
            raw_root, processed_root, drop_id, index, usable[start : start + shard_size], colour_constancy
        )
        for index, start in enumerate(range(0, len(usable), shard_size))
    ]
    return DropPlan(drop_id, scan.layout, scan.n_inputs, tasks, quarantined, scan.listing)


def plan_drops(
    raw_root: str,
    processed_root: str,
    previous: dict | None,
    drop_ids: list[str],
    *,
    layout: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    colour_constancy: str | None = None,
) -> list[DropPlan]:
    """Plans for ``drop_ids`` in order, duplicates checked against ``previous`` and each other."""
    known = known_image_ids(open_storage(processed_root), previous)
    colour = root_colour_constancy(previous, colour_constancy)
    return [
        plan_drop(
            raw_root, processed_root, d, known, layout=layout, shard_size=shard_size, colour_constancy=colour
        )
        for d in drop_ids
    ]


def pending_drops(raw: Storage, manifest: dict | None, requested: list[str] | None) -> list[str]:
    """Drops to process now: the requested ones (default: every drop under the raw root), minus those done."""
    done = set((manifest or {}).get("drops", []))
    available = drops_mod.list_drops(raw)
    wanted = requested if requested else available
    missing = [d for d in wanted if d not in available]
    if missing:
        raise FileNotFoundError(f"drop(s) {missing} not found under {raw.root_uri} (found: {available})")
    return sorted(d for d in wanted if d not in done)


def _checked_outputs(plans: list[DropPlan], results: list[ChunkResult]) -> list[tuple]:
    """(plan, its chunk results, quarantine entries, index rows) per drop, once its accounting is checked."""
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
            raise RuntimeError(
                f"drop {plan.drop_id}: chunk results {got} do not match its {len(plan.tasks)} planned chunks"
            )
        quarantined = plan.quarantined + [q for r in chunk_results for q in r.quarantined]
        quarantined.sort(key=lambda q: (q["item"], q["reason"], q["detail"]))
        index = sorted((e for r in chunk_results for e in r.index), key=lambda e: e["image_id"])
        written = len(index)
        if plan.n_inputs != written + len(quarantined):
            raise RuntimeError(
                f"accounting broken for drop {plan.drop_id}: {plan.n_inputs} inputs != {written} written + {len(quarantined)} quarantined"
            )
        if sum(s["count"] for r in chunk_results for s in r.shards) != written:
            raise RuntimeError(
                f"accounting broken for drop {plan.drop_id}: shard counts disagree with the {written} indexed images"
            )
        outputs.append((plan, chunk_results, quarantined, index))
    return outputs


def _drop_accounting(
    plan: DropPlan, chunk_results: list[ChunkResult], quarantined: list[dict], index: list[dict]
) -> dict:
    """The manifest's accounting entry of one drop: counts, quarantine reasons, conversions."""
    conversions: dict[str, int] = {}
    for r in chunk_results:
        for note, n in r.conversions.items():
            conversions[note] = conversions.get(note, 0) + n
    reasons: dict[str, int] = {}
    for q in quarantined:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    return {
        "layout": plan.layout,
        "inputs": plan.n_inputs,
        "written": len(index),
        "quarantined": len(quarantined),
        "quarantine_key": quarantine_key(plan.drop_id),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "conversions": dict(sorted(conversions.items())),
    }


def finish_drops(
    out: Storage,
    previous: dict | None,
    plans: list[DropPlan],
    results: list[ChunkResult],
    *,
    logical_date: str | None,
    colour_constancy: str | None = None,
) -> dict:
    """Driver side: check the accounting, write quarantine files and indexes, and return the
    next manifest (not yet committed). ``results`` may come in any order.

    Raises RuntimeError, before writing anything, when a drop's ``inputs != written +
    quarantined`` or a chunk result is missing, duplicated or foreign.
    """
    shards = list((previous or {}).get("shards", []))
    accounting = dict((previous or {}).get("accounting", {}))
    # Every check first: nothing is written unless every drop's accounting holds.
    outputs = _checked_outputs(plans, results)
    for plan, chunk_results, quarantined, index in outputs:
        out.write_bytes(
            quarantine_key(plan.drop_id),
            "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantined).encode(),
        )
        out.write_bytes(index_key(plan.drop_id), json.dumps(index, sort_keys=True).encode())
        out.write_bytes(listing_key(plan.drop_id), json.dumps(plan.listing, sort_keys=True).encode())
        accounting[plan.drop_id] = _drop_accounting(plan, chunk_results, quarantined, index)
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
            "colour_constancy": root_colour_constancy(previous, colour_constancy),
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


def executor_seconds(results: list[ChunkResult], map_started: float, map_ended: float) -> dict[str, float]:
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
        total["idle_before_first_task"] = sum(
            min(s for s, _ in runs) - map_started for runs in spans.values()
        )
        total["between_tasks"] = sum(
            later[0] - earlier[1]
            for runs in spans.values()
            for earlier, later in zip(sorted(runs), sorted(runs)[1:])
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
    colour_constancy: str | None = None,
) -> dict:
    """One preprocess run, driver side; returns a summary (``manifest_key`` None when there was nothing to do).

    ``colour_constancy`` chooses the method of a new processed root (None: the default); an
    existing root keeps its own, and asking it for another is an error (:func:`root_colour_constancy`).

    The engine is started only when some requested drop is new, and in parallel with the scan.
    """
    started = time.perf_counter()
    raw, out = open_storage(raw_root), open_storage(processed_root)
    previous = latest_manifest(out)
    # Resolved once, before any work (a mismatch with the root's own method is refused here).
    colour_constancy = root_colour_constancy(previous, colour_constancy)
    todo = pending_drops(raw, previous, drops)
    summary: dict = {
        "drops": todo,
        "manifest_key": None,
        "inputs": 0,
        "written": 0,
        "quarantined": 0,
        "tasks": 0,
        "late_files": drops_mod.report_late_files(raw, out, previous, drops),
    }
    if not todo:
        return summary
    timings: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The scan reads metadata only; the engine's start mostly waits on the JVM. On object
        # storage the scan's waits overlap that start; locally it neither helps nor hurts.
        planning = pool.submit(
            plan_drops,
            raw_root,
            processed_root,
            previous,
            todo,
            layout=layout,
            shard_size=shard_size,
            colour_constancy=colour_constancy,
        )
        with engine() as map_tasks:
            timings["engine_start"] = time.perf_counter() - started
            plans = planning.result()
            timings["scan_done"] = time.perf_counter() - started
            tasks = [t for p in plans for t in p.tasks]
            mapped, map_started = time.perf_counter(), time.time()
            results = map_tasks(process_chunk, tasks, "preprocess chunks") if tasks else []
            timings["map"] = time.perf_counter() - mapped
            map_ended = time.time()
    stopped = time.perf_counter()
    manifest = finish_drops(
        out, previous, plans, results, logical_date=logical_date, colour_constancy=colour_constancy
    )
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
        executor_seconds=executor_seconds(results, map_started, map_ended),
    )
    return summary
