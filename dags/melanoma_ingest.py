"""Melanoma ingestion: each new drop validated, resized and augmented into the data set, in date order.

plan -> has_new_drops (short-circuit when no new drop) -> preprocess (Spark) -> augment (Spark)
-> publish (updates the ``melanoma_manifest`` asset: one event naming the manifest version, its
drops and image counts; ``melanoma_train`` is scheduled on it)

Runs daily on data intervals (the run of logical date D owns the drops dated D, as
``melanoma_pipeline`` did) **or** when an uploader posts an event on the ``melanoma_drops`` asset
(REST ``POST /api/v2/assets/events`` with ``extra={"drop_id": "..."}``): that run ingests the
drops the events name (else every drop not processed yet). ``preprocess`` waits for the previous
run's ``preprocess`` and ``augment``, so a backfill needs ``--reprocess-behavior``:

    airflow backfill create --dag-id melanoma_ingest --from-date 2026-01-01 --to-date 2026-01-31 \\
        --reprocess-behavior failed

and, because only the last run of a batch announces the manifest (see ``pipeline.asset_ops``),
starts one training, on the data set the backfill leaves. This file only wires tasks.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable, dag, get_current_context, task

from pipeline import asset_ops
from pipeline.asset_ops import INGEST_DONE, drops_from_events
from pipeline.dag_parts import (
    DROPS_ASSET,
    MANIFEST_ASSET,
    augment_task,
    dag_args,
    drops_verdict,
    params,
    plan_drops,
    preprocess_task,
)


@dag(
    dag_id="melanoma_ingest",
    # Daily data intervals (the run of D covers [D, D+1) and owns the drops dated D), or an
    # uploader's event on the drops asset, whichever comes first.
    schedule=AssetOrTimeSchedule(
        timetable=CronDataIntervalTimetable("@daily", timezone="UTC"), assets=DROPS_ASSET
    ),
    tags=["melanoma", "spark", "ingest"],
    doc_md=__doc__,
    params=params("drops"),
    **dag_args(),
)
def melanoma_ingest():
    @task(execution_timeout=dt.timedelta(minutes=10))
    def plan() -> dict:
        """Resolve roots, run key and the drops this run owns (pinned in runs/ingest-<run_key>/plan.json)."""
        events = [e for evs in get_current_context()["triggering_asset_events"].values() for e in evs]
        return plan_drops(
            event_drops=drops_from_events(events), key_prefix="ingest-", done_marker=INGEST_DONE
        )

    # ignore_downstream_trigger_rules=False: only preprocess (and augment through it) is skipped;
    # publish still runs, to announce a manifest an earlier run of a batch left unannounced.
    @task.short_circuit(execution_timeout=dt.timedelta(minutes=5), ignore_downstream_trigger_rules=False)
    def has_new_drops(run: dict) -> bool:
        """Skip Spark when this run brings no new drop (or has already been ingested)."""
        return drops_verdict(run, before="ingested")

    @task(
        outlets=[MANIFEST_ASSET],
        inlets=[MANIFEST_ASSET],
        trigger_rule="none_failed",
        depends_on_past=True,
        execution_timeout=dt.timedelta(minutes=5),
    )
    def publish() -> dict:
        """Announce the newest manifest (one asset event), unless announced already or later runs are still to come."""
        return asset_ops.publish(get_current_context(), MANIFEST_ASSET)

    run = plan()
    preprocess, augment = preprocess_task(), augment_task()
    run >> has_new_drops(run) >> preprocess >> augment >> publish()


melanoma_ingest()
