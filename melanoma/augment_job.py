"""The Spark ``augment`` job: augmented copies of every melanoma image of the training shards.

Driver side (:func:`run_augment`): the newest manifest says which original training shards
with melanoma images have no augmented shard yet (none -> nothing is written and no executor
is started); executors write one augmented shard per such shard (:func:`augment_shard`,
seeded per image and copy, so reruns are identical); the driver commits the next manifest.
Validation and test shards are never touched. The transform is :mod:`melanoma.augment`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from melanoma.augment import AUGMENT_PARAMS, augment_pair, augmented_image_id
from melanoma.job_common import Engine, count_by_split, executor_setup, executor_storage, label_counts
from melanoma.manifest import commit_manifest, read_verified_shard, require_manifest
from melanoma.records import encode_shard, sha256_hex
from melanoma.storage import open_storage

__all__ = [
    "COPIES_PER_MELANOMA",
    "AugmentTask",
    "augment_shard",
    "augment_tasks",
    "augmented_key",
    "finish_augment",
    "run_augment",
]

COPIES_PER_MELANOMA = 2


@dataclass
class AugmentTask:
    """Augment the melanoma images of one original training shard."""

    processed_root: str
    source: dict  # the manifest entry of the original shard
    copies: int = COPIES_PER_MELANOMA


def augmented_key(source_key: str) -> str:
    return source_key.removesuffix(".zip") + "-augmented.zip"


def augment_tasks(
    processed_root: str, manifest: dict, copies: int = COPIES_PER_MELANOMA
) -> list[AugmentTask]:
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
    if task.source["split"] != "train" or task.source["kind"] != "original":
        raise ValueError(
            f"refusing to augment {task.source['key']}: only original training shards are augmented"
        )
    executor_setup()
    out = executor_storage(task.processed_root)
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
                dict(
                    record,
                    image_id=augmented_image_id(record["image_id"], copy_index),
                    kind="augmented",
                    augment_of=record["image_id"],
                )
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
    shards = sorted([*previous["shards"], *new_shards], key=lambda s: s["key"])
    return dict(
        previous,
        logical_date=logical_date,
        shards=shards,
        augmented_counts=count_by_split(shards, "augmented"),
        augmentation={
            "copies_per_melanoma": copies,
            "applies_to": "train split, label 1",
            "params": AUGMENT_PARAMS,
        },
    )


def run_augment(
    processed_root: str, engine: Engine, *, copies: int = COPIES_PER_MELANOMA, logical_date: str | None = None
) -> dict:
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
        new_shards = map_tasks(augment_shard, tasks, "augment shards")
    manifest = finish_augment(
        previous, new_shards, logical_date=logical_date or previous.get("logical_date"), copies=copies
    )
    key = commit_manifest(out, manifest)
    summary.update(
        manifest_key=key,
        manifest_uri=out.uri(key),
        shards=len(new_shards),
        images=sum(s["count"] for s in new_shards),
    )
    return summary
