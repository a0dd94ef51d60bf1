"""Spark job: add augmented copies of every melanoma training image.

    spark-submit spark_jobs/augment.py --processed-root OUT [--copies 2]

Reads the newest manifest, augments the training shards not augmented yet (seeded per
image and copy, so reruns are identical) and commits a new manifest. Validation and test
shards are never touched.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed-root", required=True)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--logical-date", default=None)
    args = parser.parse_args(argv)

    from pyspark.sql import SparkSession

    from melanoma import ingest
    from melanoma.manifest import commit_manifest, require_manifest
    from melanoma.storage import open_storage

    out = open_storage(args.processed_root)
    previous = require_manifest(out)
    tasks = ingest.augment_tasks(args.processed_root, previous, args.copies)
    if not tasks:
        print("augment: nothing to do, every training shard with melanoma images is already augmented")
        return 0
    spark = SparkSession.builder.appName("melanoma-augment").getOrCreate()
    try:
        new_shards = spark.sparkContext.parallelize(tasks, len(tasks)).map(ingest.augment_shard).collect()
    finally:
        spark.stop()
    manifest = ingest.finish_augment(previous, new_shards, logical_date=args.logical_date or previous.get("logical_date"), copies=args.copies)
    key = commit_manifest(out, manifest)
    added = sum(s["count"] for s in new_shards)
    print(f"augment: {added} augmented images in {len(new_shards)} shards; committed {out.uri(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
