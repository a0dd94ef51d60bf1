"""Benchmark: the Spark preprocess job over all of HAM10000 at 600x450, against a plain loop.

    make bench-preprocess          # = python benchmarks/bench_preprocess.py

1. Builds (or reuses) the corpus with ``make_preprocess_corpus.py``: the 10,015 HAM10000
   images upscaled to 600x450 with noise (~250 KB JPEGs, the originals' cost) and their
   600x450 masks, in ``benchmarks/corpus/`` (gitignored; ~2.5 GB, ~3-9 min once).
2. Times ``spark-submit --master local[2] spark_jobs/preprocess.py`` end to end, from the
   command's launch to its exit (JVM and SparkContext start included), into a fresh processed
   root, and checks its manifest: every image written, nothing quarantined.
3. Times the baselines, one plain Python process each, over the same files: read, decode,
   resize to 224x224, write raw arrays (``np.save``, 256 images per file):
   - ``baseline`` (the one the target is about) runs the job's own per-image code, image and
     mask, without Spark: the job's speedup over it is what Spark's parallelism nets after
     its overheads;
   - ``baseline_plain_reduced`` and ``baseline_plain_full``: plain OpenCV loops, images only,
     decoding at the job's reduced JPEG scale or at full size.
4. Writes ``benchmarks/results/preprocess.json`` and ``preprocess.md`` (a section for
   BENCHMARKS.md).

The timed parts hold the exclusive CPU lock (``/tmp/melanoma-cpu.lock``, ``flock``) so that no
cooperating heavy job runs meanwhile; the load average just before each pass, the CPU time
other processes used during it (sampled from /proc) and the hypervisor's steal time are
recorded. The corpus is read right before each pass, so every pass reads it from the page cache.

This script parses the flags and runs the steps; the steps live beside it, imported as
``benchmarks.preprocess_*``: ``preprocess_corpus`` (building and reading the corpus),
``preprocess_passes`` (the timed Spark runs and baselines), ``preprocess_contention`` (the CPU
lock and what else ran meanwhile) and ``preprocess_report`` (preprocess.json and preprocess.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.preprocess_contention import cpu_lock  # noqa: E402
from benchmarks.preprocess_corpus import build_corpus, corpus_files, describe_corpus  # noqa: E402
from benchmarks.preprocess_passes import time_baselines, time_spark_runs  # noqa: E402
from benchmarks.preprocess_report import markdown, result_document  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = Path(os.environ.get("MELANOMA_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ham10000"
DROP_ID = "ham10000-600x450"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help="HAM10000 folder (default: %(default)s)"
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="raw root of the corpus (default: benchmarks/corpus; with --limit, <work>/corpus-small)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "benchmarks" / "work" / "preprocess",
        help="scratch folder (default: %(default)s)",
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results", help="where preprocess.json/.md go"
    )
    parser.add_argument("--master", default="local[2]")
    parser.add_argument(
        "--spark-runs",
        type=int,
        default=3,
        help="timed Spark runs; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="extra attempts when other processes used the CPU meanwhile (default: %(default)s)",
    )
    parser.add_argument(
        "--lock", type=Path, default=Path(os.environ.get("MELANOMA_CPU_LOCK", "/tmp/melanoma-cpu.lock"))
    )
    parser.add_argument("--lock-wait", type=float, default=3600, help="seconds to wait for the CPU lock")
    parser.add_argument("--keep-output", action="store_true", help="keep the processed root")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N images only, in a drop of its own (a quick check, not a result)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    sys.path.insert(0, str(ROOT))
    if args.corpus is None:
        args.corpus = ROOT / "benchmarks" / "corpus" if args.limit is None else args.work / "corpus-small"
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    drop_id = (
        DROP_ID if args.limit is None else f"{DROP_ID}-first{args.limit}"
    )  # never rebuilds the full corpus
    build_corpus(args.src, args.corpus, drop_id, args.limit, args.lock, args.lock_wait)
    drop = args.corpus / drop_id
    images, masks = corpus_files(drop)
    all_files = [p for p in drop.rglob("*") if p.is_file()]
    corpus = describe_corpus(args.corpus, drop_id, images, masks, all_files)

    processed = args.work / "processed-root"
    # One exclusive hold for every timed pass, so they all run under the same conditions. The
    # corpus is read again right before each pass: this VM pages out file cache that has not
    # been touched for a while (DAMON), which would otherwise turn some reads into disk reads.
    with cpu_lock(args.lock, exclusive=True, wait_s=args.lock_wait):
        spark_runs = time_spark_runs(args, drop_id, processed, images, all_files)
        baselines = time_baselines(args, images, masks, all_files)

    result = result_document(args, drop_id, images, corpus, spark_runs, baselines)
    if args.limit is None:
        (args.results / "preprocess.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.results / "preprocess.md").write_text(markdown(result))
    else:
        print(f"--limit {args.limit}: a quick check; benchmarks/results/ left as it was")
    print(markdown(result))
    if not args.keep_output:
        shutil.rmtree(processed, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
