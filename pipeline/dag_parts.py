"""What the pipeline's DAG files share: Params, assets, DAG arguments, the ingesting plan and the Spark tasks.

The DAG files (``dags/``) only wire tasks; the pieces more than one of them needs live here so
that ``melanoma_pipeline`` (deprecated, all in one), ``melanoma_ingest`` and ``melanoma_train``
cannot drift apart. Imported at DAG parse time: Airflow's SDK and the Spark provider only,
nothing heavy.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, Param, get_current_context

from melanoma.drops import DROP_ID_PATTERN
from melanoma.settings import SCORE_SETTINGS, SETTINGS, TRAIN_SETTINGS, Setting
from melanoma.spark_settings import DRIVER_JAVA_OPTIONS, submit_conf
from pipeline.airflow_ops import recheck_history_order, resolve_run, setting, storage_env

SPARK_JOBS = Path(__file__).resolve().parents[1] / "spark_jobs"
PLAN = "ti.xcom_pull(task_ids='plan')"
# A drop id: a folder name under the raw root, never a path nor a list (no "/", ",", "..", no leading dot).
DROP_ID_SCHEMA = {"type": "string", "pattern": DROP_ID_PATTERN}

#: The processed data set: updated (one event) when ingestion has committed new manifests; the
#: event's extra names the manifest (version, drops, image counts). ``melanoma_train`` runs on it.
MANIFEST_ASSET = Asset(name="melanoma_manifest", uri="x-melanoma://processed/manifest", group="melanoma")
#: "A drop has landed under the raw root": posted by an uploader (REST API) with extra
#: ``{"drop_id": "..."}`` when a drop is complete; ``melanoma_ingest`` runs on it.
DROPS_ASSET = Asset(name="melanoma_drops", uri="x-melanoma://raw/drops", group="melanoma")


def default_args() -> dict:
    """Retries from the environment (they are needed at parse time, so not a Variable), backoff, a timeout."""
    return {
        "retries": int(os.environ.get("MELANOMA_TASK_RETRIES", "2")),
        "retry_delay": dt.timedelta(seconds=int(os.environ.get("MELANOMA_TASK_RETRY_DELAY_S", "120"))),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=30),
        "execution_timeout": dt.timedelta(minutes=10),
    }


def dag_args(**kwargs) -> dict:
    """The ``@dag`` arguments every melanoma DAG shares, then ``kwargs``.

    One run at a time: drops enter the data set in date order, and manifest events arriving
    during a training coalesce into one run after it.
    """
    return {
        "start_date": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        "catchup": False,
        "max_active_runs": 1,
        "default_args": default_args(),
        **kwargs,
    }


def plan_context() -> dict:
    """A ``plan`` task's context, the object-store settings put into the environment first (plan lists
    drops, manifests and models itself)."""
    os.environ.update(storage_env())
    return get_current_context()


def drops_verdict(run: dict, *, before: str) -> bool:
    """``has_new_drops``: whether the run goes on (``plan``'s ``proceed``), logged with what it rests on;
    ``before``: what the log line calls a run done before ("ingested", "finished")."""
    logging.getLogger(__name__).info(
        "drops selected: %(drops)s; this run's new drops: %(new_drops)s (not processed yet: "
        f"%(pending_drops)s); {before} before: %(finished)s; proceed: %(proceed)s",
        run,
    )
    return bool(run["proceed"])


def plan_drops(**kwargs) -> dict:
    """``plan`` of the DAGs that ingest: :func:`~pipeline.airflow_ops.resolve_run` for the running DAG run
    (its Params, type, id, dates and data interval); ``kwargs`` go to it."""
    context = plan_context()
    dag_run = context["dag_run"]
    return resolve_run(
        dict(context["params"]),
        run_type=str(getattr(dag_run.run_type, "value", dag_run.run_type)),
        run_id=dag_run.run_id,
        logical_date=context.get("logical_date"),
        interval_start=context.get("data_interval_start"),
        interval_end=context.get("data_interval_end"),
        run_after=getattr(dag_run, "run_after", None),
        **kwargs,
    )


def _param(setting: Setting) -> Param:
    """A run setting as an Airflow Param: its schema, title and section; null allowed where the recipe decides."""
    schema = dict(setting.schema)
    # Drop ids: their pattern lives in melanoma.drops; settings itself stays free of imports.
    if schema.get("items") is not None:
        schema["items"] = DROP_ID_SCHEMA
    # null: "take the recipe's value" (melanoma.settings.apply_recipe) or the deployment's.
    if setting.from_recipe or setting.from_deployment:
        if "enum" in schema:
            schema["enum"] = [None, *schema["enum"]]
        if "type" in schema:
            schema["type"] = ["null", schema["type"]]
    return Param(
        setting.param_default,
        title=setting.title,
        description=setting.description,
        section=setting.section,
        **schema,
    )


#: The pipeline's run Params, in the order (and sections) of their declarations in melanoma.settings.
PARAMS: dict[str, Param] = {name: _param(s) for name, s in SETTINGS.items() if s.param}

#: The training DAG's own Params (melanoma_train only): which manifest, and when a new one is worth a retraining.
TRAIN_PARAMS: dict[str, Param] = {name: _param(s) for name, s in TRAIN_SETTINGS.items()}

#: The scoring DAG's Params (melanoma_score): which inbox folders, which model.
SCORE_PARAMS: dict[str, Param] = {name: _param(s) for name, s in SCORE_SETTINGS.items()}


def params(*names: str, exclude: tuple[str, ...] = ()) -> dict[str, Param]:
    """The named Params (all of ``PARAMS`` when none is named), minus ``exclude``, plus none of the others."""
    chosen = names or tuple(PARAMS)
    return {name: PARAMS[name] for name in chosen if name not in exclude}


class MelanomaSparkSubmitOperator(SparkSubmitOperator):
    """spark-submit with object-store credentials and the jobs' Spark settings injected at run time (never templated)."""

    def __init__(self, *, check_history: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.check_history = check_history

    def execute(self, context):
        if self.check_history:
            # plan checked this too, but another run may have committed a manifest since.
            recheck_history_order(context["ti"].xcom_pull(task_ids="plan"))
        self.env_vars = {**(self.env_vars or {}), **storage_env()}
        # Read at run time (Variables, env), not at parse time; a conf given to the operator wins.
        spark = submit_conf(
            setting("spark_python", sys.executable), setting("spark_driver_java_options", DRIVER_JAVA_OPTIONS)
        )
        self.conf = {**spark, **(self.conf or {})}
        return super().execute(context)


def _spark_task(job: str, **kwargs) -> MelanomaSparkSubmitOperator:
    """Task ``job``: ``spark_jobs/<job>.py`` submitted on the ``spark_default`` connection."""
    return MelanomaSparkSubmitOperator(
        task_id=job,
        conn_id="spark_default",
        application=str(SPARK_JOBS / f"{job}.py"),
        name=f"melanoma-{job}",
        **kwargs,
    )


def preprocess_task() -> MelanomaSparkSubmitOperator:
    """The drops ``plan`` chose, validated and resized into shards; commits a manifest (Spark)."""
    return _spark_task(
        "preprocess",
        application_args=[
            "--raw-root",
            "{{ %s['raw_root'] }}" % PLAN,
            "--drops",
            "{{ %s['new_drops'] | tojson }}" % PLAN,
            "--processed-root",
            "{{ %s['data_root'] }}" % PLAN,
            "--logical-date",
            "{{ %s['as_of'] }}" % PLAN,
        ],
        execution_timeout=dt.timedelta(hours=2),
        check_history=True,
        # Drops enter the data set in date order: wait for the previous run's preprocess and augment.
        depends_on_past=True,
        wait_for_downstream=True,
    )


def augment_task() -> MelanomaSparkSubmitOperator:
    """Seeded augmented copies of the new training melanomas; commits a manifest (Spark)."""
    return _spark_task(
        "augment",
        # No --logical-date: the augmented manifest keeps the date of the manifest it extends,
        # so a rerun that augments what an earlier attempt left undone cannot move dates.
        application_args=["--processed-root", "{{ %s['data_root'] }}" % PLAN],
        execution_timeout=dt.timedelta(hours=1),
    )
