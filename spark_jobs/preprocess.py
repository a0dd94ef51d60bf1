"""Spark job: validate, decode and resize new data drops into sharded records.

    spark-submit spark_jobs/preprocess.py --raw-root RAW --processed-root OUT [--drops d1,d2]

RAW and OUT are folders or ``s3://bucket/prefix`` URIs. Drops already in the newest
manifest are skipped, so a rerun writes nothing. The logic lives in :mod:`melanoma.ingest`;
this file only wires it to Spark.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-root", required=True, help="folder or s3:// URI holding <drop_id>/ folders")
    parser.add_argument("--processed-root", required=True, help="folder or s3:// URI for processed/ and runs/")
    parser.add_argument("--drops", default="", help="comma-separated drop ids (default: every unprocessed drop)")
    parser.add_argument("--layout", default="auto", choices=["auto", "ham10000", "isic"])
    parser.add_argument("--logical-date", default=None, help="ISO date recorded in the manifest")
    parser.add_argument("--shard-size", type=int, default=256)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pyspark.sql import SparkSession

    from melanoma import ingest
    from melanoma.manifest import commit_manifest, latest_manifest
    from melanoma.storage import open_storage

    started = time.perf_counter()
    raw, out = open_storage(args.raw_root), open_storage(args.processed_root)
    previous = latest_manifest(out)
    requested = [d for d in args.drops.split(",") if d] or None
    todo = ingest.pending_drops(raw, previous, requested)
    if not todo:
        print(f"preprocess: nothing to do, every requested drop is already in the manifest under {out.root_uri}")
        return 0
    known = ingest.known_image_ids(out, previous)
    plans = [ingest.plan_drop(args.raw_root, args.processed_root, d, known, layout=args.layout, shard_size=args.shard_size) for d in todo]
    tasks = [t for p in plans for t in p.tasks]

    spark = SparkSession.builder.appName("melanoma-preprocess").getOrCreate()
    try:
        # One partition per chunk: outputs depend on the chunking, never on the cluster size.
        results = spark.sparkContext.parallelize(tasks, max(1, len(tasks))).map(ingest.process_chunk).collect() if tasks else []
    finally:
        spark.stop()

    manifest = ingest.finish_drops(out, previous, plans, results, logical_date=args.logical_date)
    key = commit_manifest(out, manifest)
    images = sum(p.n_inputs for p in plans)
    seconds = time.perf_counter() - started
    print(f"preprocess: {images} inputs in {seconds:.1f} s ({images / seconds:.0f}/s); {ingest.describe(manifest)}")
    print(f"preprocess: committed {out.uri(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
