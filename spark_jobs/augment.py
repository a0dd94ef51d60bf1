"""Spark job: add augmented copies of every melanoma training image.

    spark-submit spark_jobs/augment.py --processed-root OUT [--copies 2]

Reads the newest manifest, augments the training shards not augmented yet (seeded per
image and copy, so reruns are identical) and commits a new manifest. Validation and test
shards are never touched. When every training shard is already augmented, nothing is
written and no executor is started. The logic lives in :mod:`melanoma.augment_job`. Log
lines (progress per shard, with rate and ETA) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from melanoma.augment_job import run_augment
from melanoma.job_common import spark_engine

log = logging.getLogger("spark_jobs.augment")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed-root", required=True)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--logical-date", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    summary = run_augment(
        args.processed_root,
        lambda: spark_engine("melanoma-augment"),
        copies=args.copies,
        logical_date=args.logical_date or None,
    )
    if summary["manifest_key"] is None:
        log.info("nothing to do, every training shard with melanoma images is already augmented")
    else:
        log.info(
            "%d augmented images in %d shards; committed %s",
            summary["images"],
            summary["shards"],
            summary["manifest_uri"],
        )
    # The machine-read line: stdout, last.
    print("augment: summary " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
