"""Time a 5-drop backfill under ``airflow standalone``: the deprecated single DAG against the ingest DAG.

    PYTHONPATH=. .venv/bin/python tests/backfill_timing.py --dag melanoma_pipeline --out output/backfill-before
    PYTHONPATH=. .venv/bin/python tests/backfill_timing.py --dag melanoma_ingest --out output/backfill-after

The same five SYNTHETIC drops as tests/test_data_aware.py (30 images each, dated 2026-01-01..05),
the same standalone settings (retraining policy ``every``), default Params (what a scheduled or
backfill run gets). Prints one JSON line: wall clock from standalone start to the last run's end,
runs per DAG, trainings started (``train`` tasks that ran) and the manifest each trained on.
Not a test: it asserts nothing but that every task succeeded or was skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_data_aware import DROPS, INGEST, TRAIN, Standalone, idle  # noqa: E402
from test_runs import stop_process_group  # noqa: E402

from melanoma.synthetic import write_drop  # noqa: E402

log = logging.getLogger("backfill_timing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dag", choices=["melanoma_pipeline", INGEST], required=True)
    parser.add_argument(
        "--out", required=True, help="a folder for the Airflow home, roots and logs (emptied first)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    for index, drop in enumerate(DROPS):
        write_drop(
            root / "raw", n_images=30, seed=10 + index, drop_id=drop, id_prefix=f"SYN{chr(65 + index)}"
        )
    server = Standalone(root, root / "raw")
    server.env.update({"MELANOMA_RETRAIN_POLICY": "every", "MELANOMA_RETRAIN_MIN_NEW_IMAGES": "0"})
    server.home.mkdir(parents=True)
    dags = [args.dag] + ([TRAIN] if args.dag == INGEST else [])
    for step in (("db", "migrate"), ("dags", "reserialize"), *(("dags", "unpause", d) for d in dags)):
        server.airflow(*step)
    server.backfill(args.dag)
    started = time.monotonic()
    server.start()
    try:

        def done():
            runs = {d: server.runs(d) for d in dags}
            queued = server.rows("select count(*) from asset_dag_run_queue")[0][0]
            backfill = [
                r for r in runs[args.dag] if r["run_type"] == "backfill"
            ]  # (a scheduled run of today may exist too)
            finished = len(backfill) == 5 and all(idle(r) for r in runs.values()) and not queued
            return runs if finished and (args.dag != INGEST or runs[TRAIN]) else None

        runs = server.wait_for(done, "the backfill and the trainings it starts", timeout=7200)
        seconds = time.monotonic() - started
    finally:
        stop_process_group(server.process)
    trained = [
        (d, r["run_id"]) for d, rs in runs.items() for r in rs if r["states"].get("train") == "success"
    ]
    versions = [
        json.loads(
            (server.data / "runs" / r["plan_xcom"]["run_key"] / "model" / "provenance.json").read_text()
        )["manifest_version"]
        for d, rs in runs.items()
        for r in rs
        if r["states"].get("train") == "success"
    ]
    print(
        json.dumps(
            {
                "dag": args.dag,
                "wall_clock_s": round(seconds),
                "runs": {d: len(r) for d, r in runs.items()},
                "trainings": len(trained),
                "trained_on_manifest_versions": versions,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
