"""Melanoma scoring: new, unlabelled images scored by the approved model, the registry's champion.

plan (which inbox folders) -> has_images (short-circuit when none) -> score

``score`` runs the training CLI's ``score`` step (a subprocess or a container of the training
image, like training): per folder, ``scores/<folder>/predictions.csv`` under the data root (the
model version and its validated threshold in every row), a Grad-CAM overlay per image,
``quarantine.jsonl`` for unreadable files (ingestion's reasons) and ``index.html``.

Triggered by hand (Param ``inbox_drops``; empty: every folder under the inbox root not scored
yet) or when an uploader posts an event on the ``melanoma_inbox`` asset (REST ``POST
/api/v2/assets/events`` with ``extra={"drop_id": "..."}``). The inbox root is Variable
``melanoma_inbox_root`` / env ``MELANOMA_INBOX_ROOT``. This file only wires tasks.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from pipeline.asset_ops import drops_from_events
from pipeline.dag_parts import SCORE_PARAMS, dag_args, plan_context
from pipeline.score_plan import INBOX_ASSET, score_plan
from pipeline.training_tasks import MACROS, training_task


@dag(
    dag_id="melanoma_score",
    schedule=[INBOX_ASSET],
    tags=["melanoma", "keras", "score"],
    doc_md=__doc__,
    user_defined_macros=MACROS,
    params=SCORE_PARAMS,
    **dag_args(),
)
def melanoma_score():
    @task(execution_timeout=dt.timedelta(minutes=10))
    def plan() -> dict:
        """The inbox folders this run scores, where the scores go and the model that scores them."""
        context = plan_context()
        events = [e for evs in context["triggering_asset_events"].values() for e in evs]
        return score_plan(dict(context["params"]), drops_from_events(events))

    @task.short_circuit(execution_timeout=dt.timedelta(minutes=5))
    def has_images(run: dict) -> bool:
        """Skip scoring when no folder waits (the reason is logged)."""
        import logging

        logging.getLogger(__name__).info("inbox %s: folders to score: %s", run["inbox_root"], run["drops"])
        return bool(run["drops"])

    score = training_task("score", execution_timeout=dt.timedelta(hours=2))

    run = plan()
    run >> has_images(run) >> score


melanoma_score()
