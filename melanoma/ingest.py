"""The two Spark jobs' logic in one import, for callers that predate the split.

The jobs live in their own modules: :mod:`melanoma.preprocess_job` (driver side of
``preprocess``), :mod:`melanoma.preprocess_chunk` (its executor side),
:mod:`melanoma.augment_job` (``augment``) and :mod:`melanoma.job_common` (engines, executor
storage, shard keys and counts). ``spark_jobs/*.py``, the tests and the chaos drivers use
the names below.
"""

from __future__ import annotations

from melanoma.augment_job import (
    COPIES_PER_MELANOMA,
    AugmentTask,
    augment_shard,
    augment_tasks,
    augmented_key,
    finish_augment,
    run_augment,
)
from melanoma.job_common import (
    Engine,
    MapTasks,
    count_by_split,
    label_counts,
    local_engine,
    shard_key,
    spark_engine,
)
from melanoma.preprocess_chunk import (
    READ_AHEAD_THREADS,
    RESOURCE_ERRORS,
    ChunkResult,
    ChunkTask,
    process_chunk,
    record_for,
)
from melanoma.preprocess_job import (
    DEFAULT_SHARD_SIZE,
    PREPROCESSING_VERSION,
    DropPlan,
    describe,
    finish_drops,
    index_key,
    known_image_ids,
    listing_key,
    pending_drops,
    plan_drop,
    plan_drops,
    quarantine_key,
    root_colour_constancy,
    run_preprocess,
)

__all__ = [
    "COPIES_PER_MELANOMA", "DEFAULT_SHARD_SIZE", "PREPROCESSING_VERSION", "READ_AHEAD_THREADS", "RESOURCE_ERRORS",
    "AugmentTask", "ChunkResult", "ChunkTask", "DropPlan", "Engine", "MapTasks", "augment_shard", "augment_tasks",
    "augmented_key", "count_by_split", "describe", "finish_augment", "finish_drops", "index_key", "known_image_ids",
    "label_counts", "listing_key", "local_engine", "pending_drops", "plan_drop", "plan_drops",
    "process_chunk", "quarantine_key", "record_for", "root_colour_constancy", "run_augment", "run_preprocess",
    "shard_key", "spark_engine",
]  # fmt: skip
