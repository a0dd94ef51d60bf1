"""Executor side of the Spark ``preprocess`` job: one chunk of a drop in, its shards out.

Each chunk (:class:`ChunkTask`, up to ``shard_size`` inputs of one drop) is read,
validated, decoded and resized, and written as one shard per split (:func:`process_chunk`);
only a small :class:`ChunkResult` goes back to the driver (:mod:`melanoma.preprocess_job`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from melanoma.colour_constancy import COLOUR_CONSTANCY
from melanoma.image_decode import decode_mask
from melanoma.image_header import RejectedImage
from melanoma.imaging import preprocess_image_bytes
from melanoma.job_common import executor_setup, executor_storage, label_counts, shard_key
from melanoma.records import IMAGE_SIZE, encode_shard, sha256_hex
from melanoma.splits import SPLITS, assign_split
from melanoma.storage import LocalStorage, ObjectRefused, Storage

__all__ = [
    "READ_AHEAD_THREADS",
    "RESOURCE_ERRORS",
    "ChunkResult",
    "ChunkTask",
    "decode_input",
    "decode_input_mask",
    "process_chunk",
    "quarantine_entry",
    "read_ahead",
    "read_object",
    "record_for",
]

#: Concurrent object reads inside one task: S3/MinIO reads are latency-bound (one GET per
#: image and mask), so a task reads ahead while it decodes; OpenCV releases the GIL.
READ_AHEAD_THREADS = 8


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
    seconds: dict[str, float] = field(
        default_factory=dict
    )  # executor time by step (profiling; not in any output)
    span: tuple[int, float, float] = (0, 0.0, 0.0)  # (worker pid, start, end) in epoch seconds (profiling)


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


def quarantine_entry(drop_id: str, item_id: str, reason: str, detail: str) -> dict:
    return {"drop_id": drop_id, "item": item_id, "reason": reason, "detail": detail}


#: Errors of the machine, not of the bytes (memory, I/O, timeouts): they fail the task so that
#: its retry redoes the work; only a property of the bytes may quarantine an input.
RESOURCE_ERRORS = (MemoryError, OSError)


def read_object(storage: Storage, key: str | None) -> bytes | Exception | None:
    """An object's bytes, or the error saying it is gone or refused for good (other errors propagate)."""
    if key is None:
        return None
    try:
        return storage.read_bytes(key)
    except (FileNotFoundError, ObjectRefused) as lost:
        return lost


def read_ahead(
    storage: Storage, items: list[dict]
) -> Iterator[tuple[bytes | Exception, bytes | Exception | None]]:
    """(image bytes, mask bytes) per item, in order; from object storage, read concurrently ahead.

    A local folder is read in line: a page-cached 250 KB file costs ~0.1 ms, so threads
    would hide nothing and their wake-ups would compete with the decoding for the cores.
    On the first read that fails, the queued reads are cancelled and the error raised at
    once: waiting for them would only meet the same dead store again, read after read.
    """
    if isinstance(storage, LocalStorage):
        for item in items:
            yield read_object(storage, item["image_key"]), read_object(storage, item.get("mask_key"))
        return
    pool = ThreadPoolExecutor(max_workers=READ_AHEAD_THREADS)
    try:
        pending: list[tuple[Future, Future]] = [
            (
                pool.submit(read_object, storage, item["image_key"]),
                pool.submit(read_object, storage, item.get("mask_key")),
            )
            for item in items
        ]
        for image, mask in pending:
            yield image.result(), mask.result()
    finally:
        # Normal end: nothing is queued any more. After a failure (or an abandoned generator):
        # drop the queue and do not wait for reads in flight, each bounded by the client's timeouts.
        pool.shutdown(wait=False, cancel_futures=True)


def decode_input(
    item: dict, data: bytes | Exception, colour_constancy: str = COLOUR_CONSTANCY[0]
) -> tuple[np.ndarray | None, list[str], tuple[str, str] | None]:
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
        return (
            None,
            [],
            ("undecodable", f"unexpected {type(error).__name__} while decoding: {str(error)[:200]}"),
        )


def decode_input_mask(data: bytes | Exception | None) -> tuple[np.ndarray | None, str | None]:
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
    except Exception as error:  # noqa: BLE001 - as in decode_input: the mask's problem, not the task's
        return None, f"undecodable ({type(error).__name__})"


def process_chunk(task: ChunkTask) -> ChunkResult:
    """Executor side: read, validate, decode and resize one chunk and write its shards.

    Returns only metadata (shard entries, index rows, quarantine entries, counts): the
    arrays never travel back to the driver.
    """
    began = time.time()
    executor_setup()
    raw, out = executor_storage(task.raw_root), executor_storage(task.processed_root)
    result = ChunkResult(task.drop_id, task.chunk_index)
    seconds = dict.fromkeys(("read_wait", "decode", "mask", "encode", "write"), 0.0)
    by_split: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    empty_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    clock = time.perf_counter()
    for item, (data, mask_data) in zip(task.items, read_ahead(raw, task.items)):
        now = time.perf_counter()
        seconds["read_wait"] += now - clock
        image, notes, rejection = decode_input(item, data, task.colour_constancy)
        clock, now = now, time.perf_counter()
        seconds["decode"] += now - clock
        if rejection is not None:
            result.quarantined.append(quarantine_entry(task.drop_id, item["image_id"], *rejection))
            clock = time.perf_counter()
            continue
        mask, mask_problem = decode_input_mask(mask_data)
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
            {"image_id": r["image_id"], "lesion_id": r["lesion_id"], "split": split, "label": r["label"]}
            for r in records
        )
    result.seconds = {k: round(v, 4) for k, v in seconds.items()}
    result.span = (os.getpid(), began, time.time())
    return result
