"""DEPRECATED all-in-one melanoma pipeline: kept so that old runs and deployments keep working.

Use ``melanoma_ingest`` (per drop, in date order; updates the ``melanoma_manifest`` asset) and
``melanoma_train`` (scheduled on that asset: one training per state of the data set) instead.
This DAG trains a model in every run, so a 30-day backfill trains 30 models. It is paused when
created; do not run it beside ``melanoma_ingest`` on the same data root (both would ingest the
same drops). Its run folders (``runs/<run_key>/``) and manifests stay readable by the new DAGs:
``melanoma_train`` counts its models as "the last model" for the retraining policy.

plan -> has_new_drops (short-circuit when no new drop) -> preprocess (Spark) -> augment (Spark)
-> train -> evaluate (threshold chosen on validation, pushed to XCom) -> gradcam (reads it) -> report

Scheduling: daily data intervals (``CronDataIntervalTimetable``): the run of logical date D
owns the drops dated D (``<raw_root>/<anything-D>/``) and trains on the manifest as of D.
A manual run takes the drops named in its ``drops`` Param, else every drop not processed
yet. ``preprocess`` waits for the previous run's ``preprocess`` and ``augment``
(``depends_on_past`` + ``wait_for_downstream``), so drops enter the data set in date order
even when a backfill runs several dates at once; for that reason a backfill needs
``--reprocess-behavior failed`` (or ``completed``), which Airflow requires of such DAGs:

    airflow backfill create --dag-id melanoma_pipeline --from-date 2026-01-01 --to-date 2026-01-31 \
        --reprocess-behavior failed

This file only wires tasks; the logic lives in ``melanoma`` (Spark-side and Airflow-side
helpers) and ``training`` (the model CLI, run as a subprocess or in its container). Nothing
heavy is imported at parse time.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import CronDataIntervalTimetable, dag, task

from pipeline.dag_parts import augment_task, dag_args, drops_verdict, params, plan_drops, preprocess_task
from pipeline.training_tasks import MACROS, training_steps


@dag(
    dag_id="melanoma_pipeline",
    # Data intervals, not trigger times: the run of logical date D covers [D, D+1 day) and
    # starts once that day is over, so it sees every drop dated D.
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    # Deprecated: never scheduled by surprise beside melanoma_ingest (see the docstring).
    is_paused_upon_creation=True,
    tags=["melanoma", "spark", "keras", "deprecated"],
    doc_md=__doc__,
    user_defined_macros=MACROS,
    params=params(),
    **dag_args(),
)
def melanoma_pipeline():
    @task(execution_timeout=dt.timedelta(minutes=10))
    def plan() -> dict:
        """Resolve roots, run key and the drops this run owns (pinned in runs/<run_key>/plan.json)."""
        return plan_drops()

    @task.short_circuit(execution_timeout=dt.timedelta(minutes=5))
    def has_new_drops(run: dict) -> bool:
        """Skip Spark and training when this run brings no new drop (or has already finished)."""
        return drops_verdict(run, before="finished")

    preprocess, augment = preprocess_task(), augment_task()

    # train >> evaluate >> gradcam >> report >> promote: the training CLI's steps, subprocesses (local
    # runner) or containers of the training image (docker runner), arguments rendered from XCom.
    train, _ = training_steps()

    run = plan()
    run >> has_new_drops(run) >> preprocess >> augment >> train


melanoma_pipeline()
