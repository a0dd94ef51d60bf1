"""Melanoma training: one model per state of the data set, on the manifest the asset event names.

plan -> should_train (short-circuit: the retraining policy, with its reason) -> train -> evaluate
(threshold chosen on validation, pushed to XCom) -> gradcam (reads it) -> report

Scheduled on the ``melanoma_manifest`` asset, which ``melanoma_ingest`` updates: several updates
while a training runs coalesce into the next run (``max_active_runs=1``), which trains on the
newest manifest version its triggering events name. The run's ``plan`` pins that version in
``runs/train-<run_key>/plan.json``: a rerun trains on the same data, never on the newest. A manual
run takes the pipeline's training Params, ``manifest_version`` (0: the newest as of its date) and
the policy Params; the policy (every new manifest, at least N new images / M new melanomas, or
always) comes from Params, else Variables ``melanoma_retrain_*`` / env ``MELANOMA_RETRAIN_*``.
This file only wires tasks.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from pipeline.asset_ops import event_manifest_versions
from pipeline.dag_parts import MANIFEST_ASSET, TRAIN_PARAMS, dag_args, params, plan_context
from pipeline.retrain import resolve_training
from pipeline.training_tasks import MACROS, training_steps


@dag(
    dag_id="melanoma_train",
    schedule=[MANIFEST_ASSET],
    tags=["melanoma", "keras", "train"],
    doc_md=__doc__,
    user_defined_macros=MACROS,
    params={**params(exclude=("drops",)), **TRAIN_PARAMS},
    # One training at a time (max_active_runs=1); manifest events arriving meanwhile make one run after it.
    **dag_args(),
)
def melanoma_train():
    @task(execution_timeout=dt.timedelta(minutes=10))
    def plan() -> dict:
        """The manifest this run trains on (pinned in runs/train-<run_key>/plan.json) and the policy's verdict."""
        context = plan_context()
        dag_run = context["dag_run"]
        events = list(context["triggering_asset_events"].get(MANIFEST_ASSET, []))
        return resolve_training(
            dict(context["params"]),
            run_id=dag_run.run_id,
            logical_date=context.get("logical_date"),
            run_after=getattr(dag_run, "run_after", None),
            event_versions=event_manifest_versions(events),
        )

    @task.short_circuit(execution_timeout=dt.timedelta(minutes=5))
    def should_train(run: dict) -> bool:
        """Train only when the retraining policy says so; the reason is logged either way."""
        import logging

        logging.getLogger(__name__).info(
            "manifest v%s (%s; drops %s, %s images, %s melanoma); last model: %s; train: %s: %s",
            run["manifest_version"],
            run["manifest_source"],
            run["drops"],
            run["images"],
            run["melanomas"],
            run["last_model"],
            run["proceed"],
            run["reason"],
        )
        return bool(run["proceed"])

    # train >> evaluate >> gradcam >> report >> promote: the training CLI's steps, subprocesses (local
    # runner) or containers of the training image (docker runner), arguments rendered from XCom.
    train, _ = training_steps()

    run = plan()
    run >> should_train(run) >> train


melanoma_train()
