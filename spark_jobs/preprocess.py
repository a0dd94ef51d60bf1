"""Spark job: validate, decode and resize new data drops into sharded records.

    spark-submit [--master local[2] | spark://host:7077] spark_jobs/preprocess.py \\
        --raw-root RAW --processed-root OUT [--drops d1,d2] [--layout auto|ham10000|isic]

RAW and OUT are folders or ``s3://bucket/prefix`` URIs (executors read and write them
directly, so on a cluster they must be reachable from every node: S3/MinIO, or a shared
folder). Drops already in the newest manifest are skipped, so a rerun writes nothing and
starts no executor. The logic lives in :mod:`melanoma.preprocess_job` (driver) and
:mod:`melanoma.preprocess_chunk` (executors); this file only parses arguments and hands the
run to Spark. Log lines (progress per chunk, with rate and ETA) go to stderr.

The last line printed is ``preprocess: summary {...}`` (JSON: counts, manifest key, time
per phase), for callers that want numbers rather than logs.
"""

from __future__ import annotations

import time

SCRIPT_STARTED = time.time()  # before any import: lets a caller see JVM + interpreter start-up

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from melanoma.colour_constancy import COLOUR_CONSTANCY  # noqa: E402
from melanoma.job_common import spark_engine  # noqa: E402
from melanoma.preprocess_job import run_preprocess  # noqa: E402

log = logging.getLogger("spark_jobs.preprocess")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-root", required=True, help="folder or s3:// URI holding <drop_id>/ folders")
    parser.add_argument(
        "--processed-root", required=True, help="folder or s3:// URI for processed/ and runs/"
    )
    parser.add_argument(
        "--drops",
        default="",
        help='drop ids as a JSON list (["a", "b"]; what the DAG passes) or comma-separated (default: every unprocessed drop)',
    )
    parser.add_argument("--layout", default="auto", choices=["auto", "ham10000", "isic"])
    parser.add_argument("--logical-date", default=None, help="ISO date recorded in the manifest")
    parser.add_argument(
        "--shard-size", type=int, default=256, help="images per chunk/task (changing it changes the shards)"
    )
    parser.add_argument(
        "--colour-constancy",
        default=None,
        choices=list(COLOUR_CONSTANCY),
        help=f"colour constancy of a NEW processed root (default {COLOUR_CONSTANCY[0]}); an existing root "
        "keeps the one it started with, and asking it for another is an error",
    )
    return parser.parse_args(argv)


def parse_drops(text: str) -> list[str]:
    """A JSON list (exact, whatever the ids hold) or, for people typing, comma-separated ids."""
    text = text.strip()
    if text.startswith("["):
        drops = json.loads(text)
        if not isinstance(drops, list) or not all(isinstance(d, str) for d in drops):
            raise SystemExit(f"--drops must be a JSON list of strings, got {text[:200]!r}")
        return drops
    return [d for d in text.split(",") if d]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    summary = run_preprocess(
        args.raw_root,
        args.processed_root,
        lambda: spark_engine("melanoma-preprocess"),
        drops=parse_drops(args.drops) or None,
        layout=args.layout,
        logical_date=args.logical_date or None,
        shard_size=args.shard_size,
        colour_constancy=args.colour_constancy,
    )
    if summary["manifest_key"] is None:
        log.info(
            "nothing to do, every requested drop is already in the manifest under %s", args.processed_root
        )
    else:
        seconds = summary["seconds"]["total"]
        log.info(
            "%d inputs (%d written, %d quarantined) in %.1f s (%.0f/s); %s",
            summary["inputs"],
            summary["written"],
            summary["quarantined"],
            seconds,
            summary["inputs"] / max(seconds, 1e-9),
            summary["description"],
        )
        log.info("committed %s", summary["manifest_uri"])
    summary["wall_clock"] = {"script_started": SCRIPT_STARTED, "finished": time.time()}
    # The machine-read line: stdout, last.
    print("preprocess: summary " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
