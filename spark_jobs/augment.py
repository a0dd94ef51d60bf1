"""Spark job: add augmented copies of every melanoma training image.

    spark-submit spark_jobs/augment.py --processed-root OUT [--copies 2]

Reads the newest manifest, augments the training shards not augmented yet (seeded per
image and copy, so reruns are identical) and commits a new manifest. Validation and test
shards are never touched. When every training shard is already augmented, nothing is
written and no executor is started. The logic lives in :mod:`melanoma.ingest`.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed-root", required=True)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--logical-date", default=None)
    args = parser.parse_args(argv)

    from melanoma import ingest

    summary = ingest.run_augment(
        args.processed_root,
        lambda: ingest.spark_engine("melanoma-augment"),
        copies=args.copies,
        logical_date=args.logical_date or None,
    )
    if summary["manifest_key"] is None:
        print("augment: nothing to do, every training shard with melanoma images is already augmented")
    else:
        print(f"augment: {summary['images']} augmented images in {summary['shards']} shards; committed {summary['manifest_uri']}")
    print("augment: summary " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
