"""What the pipeline's DAG files share: Params, assets, default arguments and the Spark tasks.

The DAG files (``dags/``) only wire tasks; the pieces more than one of them needs live here so
that ``melanoma_pipeline`` (deprecated, all in one), ``melanoma_ingest`` and ``melanoma_train``
cannot drift apart. Imported at DAG parse time: Airflow's SDK and the Spark provider only,
nothing heavy.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, Param

from melanoma.airflow_ops import PARAM_DEFAULTS, recheck_history_order, setting, storage_env
from melanoma.drops import DROP_ID_PATTERN
from melanoma.retrain import POLICIES
from melanoma.spark_settings import DRIVER_JAVA_OPTIONS, submit_conf

SPARK_JOBS = Path(__file__).resolve().parents[1] / "spark_jobs"
PLAN = "ti.xcom_pull(task_ids='plan')"
# A drop id: a folder name under the raw root, never a path nor a list (no "/", ",", "..", no leading dot).
DROP_ID_SCHEMA = {"type": "string", "pattern": DROP_ID_PATTERN}
# JSON Schema's bounds are comparisons, and every comparison with NaN is false, so NaN passes
# "minimum"/"maximum". "not exclusiveMaximum: -max" holds only where x >= -max is true: refuses
# NaN and -inf (the maximum every number Param has refuses +inf).
FINITE = {"not": {"exclusiveMaximum": -sys.float_info.max}}

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


PARAMS: dict[str, Param] = {
    # Data
    "drops": Param(
        PARAM_DEFAULTS["drops"],
        title="Drops",
        type="array",
        items=DROP_ID_SCHEMA,
        uniqueItems=True,
        maxItems=1000,
        description=(
            "Drop ids to process (folder names under the raw root, e.g. ham-2026-03-01). Empty: the drops "
            "dated in the run's data interval (scheduled/backfill) or every drop not processed yet (manual)."
        ),
        section="Data",
    ),
    "external_drops": Param(
        PARAM_DEFAULTS["external_drops"],
        title="External test drops",
        type="array",
        items=DROP_ID_SCHEMA,
        uniqueItems=True,
        maxItems=50,
        description="Drops under the raw root to report as external test sets.",
        section="Data",
    ),
    "max_train_images": Param(
        PARAM_DEFAULTS["max_train_images"],
        title="Training images (cap)",
        type="integer",
        minimum=0,
        maximum=10_000_000,
        description="Cap on training images, whole lesions (0 = all). For quick demo runs.",
        section="Data",
    ),
    # Model
    "backbone": Param(
        PARAM_DEFAULTS["backbone"],
        title="Backbone",
        enum=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"],
        description="ImageNet backbone under the seed's head.",
        section="Model",
    ),
    "weights": Param(
        PARAM_DEFAULTS["weights"],
        title="Weights",
        type="string",
        minLength=1,
        maxLength=1000,
        description="'imagenet' or a weights file path/URI. Never silently random.",
        section="Model",
    ),
    "target": Param(
        PARAM_DEFAULTS["target"],
        title="Training target",
        enum=["melanoma", "dx"],
        description=(
            "melanoma: binary training (the seed's); dx: train on the 7 diagnoses, export the melanoma "
            "probability."
        ),
        section="Model",
    ),
    "ensemble_size": Param(
        PARAM_DEFAULTS["ensemble_size"],
        title="Ensemble size",
        type="integer",
        minimum=1,
        maximum=10,
        description=(
            "Models trained with seeds seed..seed+n-1; the exported model averages their melanoma logits "
            "(Grad-CAM explains the average). n times the training time."
        ),
        section="Model",
    ),
    # Training
    "epochs": Param(
        PARAM_DEFAULTS["epochs"],
        title="Epochs (phase 1)",
        type="integer",
        minimum=1,
        maximum=500,
        description="Phase 1 (frozen backbone) epoch budget; early stopping on val AUROC, patience 10.",
        section="Training",
    ),
    "fine_tune_epochs": Param(
        PARAM_DEFAULTS["fine_tune_epochs"],
        title="Fine-tuning epochs (phase 2)",
        type="integer",
        minimum=0,
        maximum=200,
        description="Phase 2 epochs fine-tuning the last blocks at fine_tune_learning_rate (0 = skip).",
        section="Training",
    ),
    "fine_tune_blocks": Param(
        PARAM_DEFAULTS["fine_tune_blocks"],
        title="Fine-tuned blocks",
        type="integer",
        minimum=1,
        maximum=21,
        description=(
            "How many backbone blocks (counted from the top) phase 2 unfreezes: ResNet50 and Lite0 have 16, "
            "Lite1 and Lite2 21; bench-quality uses 11 of Lite0's."
        ),
        section="Training",
    ),
    "class_weight": Param(
        PARAM_DEFAULTS["class_weight"],
        title="Class weights",
        enum=["balanced", "seed", "none"],
        description="balanced: from training labels; seed: the reference's 0.5/28.5.",
        section="Training",
    ),
    "train_flips": Param(
        PARAM_DEFAULTS["train_flips"],
        title="Flip variants",
        enum=[1, 2, 4],
        description=(
            "Flip variants of each training image, one per epoch in turn (1: as stored; 2: + horizontal; 4: +"
            " vertical and both)."
        ),
        section="Training",
    ),
    "train_augment": Param(
        PARAM_DEFAULTS["train_augment"],
        title="Random augmentation",
        type="boolean",
        description=(
            "With train_flips > 1: every variant but the first (as stored) is a random draw, per image, of "
            "the augment job's flips, rotation, zoom and brightness instead of a pure flip (every image's "
            "borders move, not only the melanoma copies')."
        ),
        section="Training",
    ),
    "learning_rate": Param(
        PARAM_DEFAULTS["learning_rate"],
        title="Learning rate (phase 1)",
        type="number",
        **FINITE,
        exclusiveMinimum=0,
        maximum=0.1,
        description="Phase 1 (head) Adam learning rate; the seed's 1e-4.",
        section="Training",
    ),
    "fine_tune_learning_rate": Param(
        PARAM_DEFAULTS["fine_tune_learning_rate"],
        title="Learning rate (phase 2)",
        type="number",
        **FINITE,
        exclusiveMinimum=0,
        maximum=0.1,
        description=(
            "Phase 2 Adam learning rate; the seed's 1e-5 (bench-quality uses 3e-4 on cached activations)."
        ),
        section="Training",
    ),
    "lr_decay_patience": Param(
        PARAM_DEFAULTS["lr_decay_patience"],
        title="Learning-rate decay patience",
        type="integer",
        minimum=0,
        maximum=50,
        description=(
            "Learning rate x0.3 after this many epochs without a better val AUROC (0 = constant, the seed's)."
        ),
        section="Training",
    ),
    "max_train_minutes": Param(
        PARAM_DEFAULTS["max_train_minutes"],
        title="Time budget (minutes)",
        type="number",
        **FINITE,
        minimum=0,
        maximum=720,
        description=(
            "Training time budget: no new epoch starts that would not fit (0 = none; the task's own timeout "
            "is 12 h)."
        ),
        section="Training",
    ),
    # Evaluation
    "threshold_strategy": Param(
        PARAM_DEFAULTS["threshold_strategy"],
        title="Threshold strategy",
        enum=["youden", "sensitivity", "f1"],
        description="How evaluate picks the threshold on the validation split.",
        section="Evaluation",
    ),
    "target_sensitivity": Param(
        PARAM_DEFAULTS["target_sensitivity"],
        title="Target sensitivity",
        type="number",
        **FINITE,
        exclusiveMinimum=0,
        maximum=1,
        description="Used by the 'sensitivity' strategy.",
        section="Evaluation",
    ),
    "score_pooling": Param(
        PARAM_DEFAULTS["score_pooling"],
        title="Score pooling",
        enum=["lesion", "none"],
        description=(
            "lesion: the images of one lesion are scored together (mean logit) before the threshold; none: "
            "each image alone."
        ),
        section="Evaluation",
    ),
    "n_boot": Param(
        PARAM_DEFAULTS["n_boot"],
        title="Bootstrap resamples",
        type="integer",
        minimum=100,
        maximum=20000,
        description="Lesion bootstrap resamples for the 95% intervals.",
        section="Evaluation",
    ),
}

#: The training DAG's own Params: which manifest, and when a new one is worth a retraining.
TRAIN_PARAMS: dict[str, Param] = {
    "manifest_version": Param(
        0,
        title="Manifest version",
        type="integer",
        minimum=0,
        maximum=999_999,
        description=(
            "Train on exactly this manifest (processed/manifest-NNNNNN.json). 0: the one the triggering asset "
            "event names, else (a manual run) the newest as of the run's date."
        ),
        section="Data",
    ),
    "retrain_policy": Param(
        None,
        title="Retraining policy",
        type=["null", "string"],
        enum=[None, *POLICIES],
        description=(
            "every: train on every manifest newer than the last model's; min_new: only once at least "
            "retrain_min_new_images new images or retrain_min_new_melanomas new melanomas have arrived since "
            "it; always: train regardless. Empty: Variable melanoma_retrain_policy / env MELANOMA_RETRAIN_POLICY "
            "(default every)."
        ),
        section="Retraining",
    ),
    "retrain_min_new_images": Param(
        None,
        title="New images needed (min_new)",
        type=["null", "integer"],
        minimum=0,
        maximum=100_000_000,
        description=(
            "min_new: retrain once this many images arrived since the last model's manifest (0 = not this "
            "criterion). Empty: Variable melanoma_retrain_min_new_images / env MELANOMA_RETRAIN_MIN_NEW_IMAGES."
        ),
        section="Retraining",
    ),
    "retrain_min_new_melanomas": Param(
        None,
        title="New melanomas needed (min_new)",
        type=["null", "integer"],
        minimum=0,
        maximum=100_000_000,
        description=(
            "min_new: retrain once this many melanoma images arrived since the last model's manifest (0 = not "
            "this criterion). Empty: Variable melanoma_retrain_min_new_melanomas / env "
            "MELANOMA_RETRAIN_MIN_NEW_MELANOMAS."
        ),
        section="Retraining",
    ),
}


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


def preprocess_task() -> MelanomaSparkSubmitOperator:
    """The drops ``plan`` chose, validated and resized into shards; commits a manifest (Spark)."""
    return MelanomaSparkSubmitOperator(
        task_id="preprocess",
        conn_id="spark_default",
        application=str(SPARK_JOBS / "preprocess.py"),
        name="melanoma-preprocess",
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
    return MelanomaSparkSubmitOperator(
        task_id="augment",
        conn_id="spark_default",
        application=str(SPARK_JOBS / "augment.py"),
        name="melanoma-augment",
        # No --logical-date: the augmented manifest keeps the date of the manifest it extends,
        # so a rerun that augments what an earlier attempt left undone cannot move dates.
        application_args=["--processed-root", "{{ %s['data_root'] }}" % PLAN],
        execution_timeout=dt.timedelta(hours=1),
    )
