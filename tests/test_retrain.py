"""The ingest and training DAGs as Airflow sees them, the retraining policy and the manifest announcements.

Fast: no DAG run, no Spark, no TensorFlow. Real runs under a scheduler are in tests/test_data_aware.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("airflow")

from melanoma.manifest import ManifestError, commit_manifest, require_manifest  # noqa: E402
from melanoma.storage import open_storage  # noqa: E402
from pipeline.asset_ops import drops_from_events, event_manifest_versions, manifest_summary, publish_decision  # noqa: E402
from pipeline.retrain import decide, image_counts, last_model, resolve_policy, resolve_training  # noqa: E402
from pipeline.training_tasks import training_args  # noqa: E402

from fresh_python import import_dag_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def serialized(dagbag):
    from airflow.serialization.serialized_objects import DagSerialization

    return {
        dag_id: DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        for dag_id, dag in dagbag.dags.items()
    }


# --- the DAG files --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["melanoma_ingest", "melanoma_train"])
def test_dag_file_imports_without_tensorflow_or_pyspark(name):
    assert import_dag_file(DAGS / f"{name}.py")["heavy"] == []


def test_the_three_dags_load_and_the_old_one_is_deprecated_and_paused_at_creation(dagbag):
    assert dagbag.import_errors == {}
    assert {"melanoma_pipeline", "melanoma_ingest", "melanoma_train"} <= set(dagbag.dag_ids)
    old = dagbag.dags["melanoma_pipeline"]
    assert "deprecated" in old.tags and old.is_paused_upon_creation is True


def test_ingest_is_daily_or_on_an_uploaders_event_and_ends_by_announcing_the_manifest(dagbag, serialized):
    from airflow.timetables.assets import AssetOrTimeSchedule
    from airflow.timetables.interval import CronDataIntervalTimetable

    dag = dagbag.dags["melanoma_ingest"]
    assert [t.task_id for t in dag.topological_sort()] == [
        "plan",
        "has_new_drops",
        "preprocess",
        "augment",
        "publish",
    ]
    timetable = serialized["melanoma_ingest"].timetable
    assert isinstance(timetable, AssetOrTimeSchedule) and isinstance(
        timetable.timetable, CronDataIntervalTimetable
    )
    assert timetable.periodic  # backfills are possible
    assert [key.name for key, _ in timetable.asset_condition.iter_assets()] == ["melanoma_drops"]
    preprocess, publish = dag.get_task("preprocess"), dag.get_task("publish")
    assert preprocess.depends_on_past and preprocess.wait_for_downstream and dag.max_active_runs == 1
    assert [o.name for o in publish.outlets] == ["melanoma_manifest"] and [
        i.name for i in publish.inlets
    ] == ["melanoma_manifest"]
    # It runs after a short-circuit too (to announce what earlier runs of a batch left), and in run order.
    assert publish.trigger_rule == "none_failed" and publish.depends_on_past
    assert dag.get_task("has_new_drops").ignore_downstream_trigger_rules is False
    assert set(dag.params) == {"drops"}
    assert not any(t.outlets for t in dag.tasks if t.task_id != "publish")


def test_training_runs_on_the_manifest_asset_one_at_a_time_with_the_pipelines_params(dagbag, serialized):
    from airflow.timetables.simple import AssetTriggeredTimetable

    from pipeline.airflow_ops import PARAM_DEFAULTS

    dag = dagbag.dags["melanoma_train"]
    assert [t.task_id for t in dag.topological_sort()] == [
        "plan",
        "should_train",
        "train",
        "evaluate",
        "gradcam",
        "report",
        "promote",
    ]
    assert isinstance(serialized["melanoma_train"].timetable, AssetTriggeredTimetable)
    assert dag.max_active_runs == 1  # manifest events arriving during a training coalesce into one run
    assert set(dag.params) == (set(PARAM_DEFAULTS) - {"drops"}) | {
        "manifest_version",
        "retrain_policy",
        "retrain_min_new_images",
        "retrain_min_new_melanomas",
    }
    for name in dag.params:
        schema = dag.params.get_param(name).schema
        assert (
            schema.get("title") and schema.get("section") and len(dag.params.get_param(name).description) > 20
        ), name


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"retrain_policy": "sometimes"}, "retrain_policy"),
        ({"retrain_min_new_images": -1}, "retrain_min_new_images"),
        ({"retrain_min_new_melanomas": 1.5}, "retrain_min_new_melanomas"),
        ({"manifest_version": -2}, "manifest_version"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_training_params_are_refused_naming_the_field(serialized, conf, field):
    from airflow.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {field}:"):
        serialized["melanoma_train"].params.deep_merge(conf).validate()
    good = {"retrain_policy": "min_new", "retrain_min_new_images": 500, "manifest_version": 3, "epochs": 2}
    assert serialized["melanoma_train"].params.deep_merge(good).validate()["retrain_policy"] == "min_new"
    assert serialized["melanoma_train"].params.deep_merge({}).validate()["retrain_policy"] is None


# --- the retraining policy ------------------------------------------------------------------------


def manifest(version: int, images: int, melanomas: int, drops: list[str], date: str = "2026-01-01") -> dict:
    return {
        "version": version,
        "logical_date": date,
        "drops": drops,
        "counts": {"train": {"0": images - melanomas, "1": melanomas}, "val": {"0": 0, "1": 0}},
    }


def test_image_counts_add_up_every_split():
    assert image_counts({"counts": {"train": {"0": 5, "1": 2}, "val": {"0": 3, "1": 1}}}) == (11, 3)
    assert image_counts({}) == (0, 0)


def test_policy_every_always_and_min_new():
    base, new = manifest(2, 100, 10, ["a"]), manifest(4, 130, 12, ["a", "b"])
    last = {"run_key": "train-x", "manifest_version": 2}
    every, always = (
        {"policy": "every", "min_new_images": 0, "min_new_melanomas": 0},
        {"policy": "always", "min_new_images": 0, "min_new_melanomas": 0},
    )
    assert decide(every, new, None, None)[0] is True  # the first model
    assert decide(every, new, last, base) == (
        True,
        "policy every: 30 new images (2 melanoma) since manifest v2 (the data of runs/train-x)",
    )
    assert decide(every, base, last, base)[0] is False  # already trained on this very manifest
    assert decide(always, base, last, base)[0] is True
    images = {"policy": "min_new", "min_new_images": 50, "min_new_melanomas": 0}
    ok, why = decide(images, new, last, base)
    assert not ok and "30 new images" in why and "at least 50 images" in why and "not reached" in why
    assert decide({**images, "min_new_images": 30}, new, last, base)[0] is True
    either = {"policy": "min_new", "min_new_images": 50, "min_new_melanomas": 2}
    ok, why = decide(either, new, last, base)
    assert ok and "at least 50 images or 2 melanomas" in why and why.endswith("reached")


def test_policy_settings_come_from_params_then_variables_or_env(monkeypatch):
    for name in ("RETRAIN_POLICY", "RETRAIN_MIN_NEW_IMAGES", "RETRAIN_MIN_NEW_MELANOMAS"):
        monkeypatch.delenv(f"MELANOMA_{name}", raising=False)
        monkeypatch.delenv(f"AIRFLOW_VAR_MELANOMA_{name}", raising=False)
    assert resolve_policy({}) == {"policy": "every", "min_new_images": 0, "min_new_melanomas": 0}
    monkeypatch.setenv("MELANOMA_RETRAIN_POLICY", "min_new")
    monkeypatch.setenv("MELANOMA_RETRAIN_MIN_NEW_IMAGES", "200")
    assert resolve_policy({"retrain_policy": None}) == {
        "policy": "min_new",
        "min_new_images": 200,
        "min_new_melanomas": 0,
    }
    monkeypatch.setenv("AIRFLOW_VAR_MELANOMA_RETRAIN_MIN_NEW_IMAGES", "300")  # a Variable beats the env
    assert resolve_policy({})["min_new_images"] == 300
    assert resolve_policy({"retrain_min_new_images": 5, "retrain_policy": "every"})["policy"] == "every"
    with pytest.raises(ValueError, match="needs retrain_min_new_images or retrain_min_new_melanomas"):
        resolve_policy({"retrain_min_new_images": 0})
    monkeypatch.setenv("MELANOMA_RETRAIN_POLICY", "weekly")
    with pytest.raises(ValueError, match="retrain_policy='weekly'"):
        resolve_policy({})
    monkeypatch.setenv("MELANOMA_RETRAIN_POLICY", "min_new")
    monkeypatch.setenv("AIRFLOW_VAR_MELANOMA_RETRAIN_MIN_NEW_IMAGES", "lots")
    with pytest.raises(ValueError, match="'lots' is not a whole number"):
        resolve_policy({})


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("MELANOMA_DATA_ROOT", str(data))
    monkeypatch.setenv("MELANOMA_RAW_ROOT", str(tmp_path / "raw"))
    for name in ("RETRAIN_POLICY", "RETRAIN_MIN_NEW_IMAGES", "RETRAIN_MIN_NEW_MELANOMAS"):
        monkeypatch.delenv(f"MELANOMA_{name}", raising=False)
        monkeypatch.delenv(f"AIRFLOW_VAR_MELANOMA_{name}", raising=False)
    storage = open_storage(str(data))
    for version, (images, melanomas, drops, date) in enumerate(
        [
            (100, 10, ["a"], "2026-01-01"),
            (100, 10, ["a"], "2026-01-01"),
            (160, 14, ["a", "b"], "2026-01-02"),
            (160, 14, ["a", "b"], "2026-01-02"),
        ],
        1,
    ):
        m = manifest(version, images, melanomas, drops, date)
        commit_manifest(storage, {k: v for k, v in m.items() if k != "version"})
    return data


def model_trained(data: Path, key: str, version: int) -> None:
    (data / "runs" / key / "model").mkdir(parents=True, exist_ok=True)
    (data / "runs" / key / "model" / "provenance.json").write_text(json.dumps({"manifest_version": version}))


def train_plan(
    params: dict | None = None,
    run_id: str = "asset_triggered__2026-12-01T10:00:00+00:00",
    versions=(),
    **kwargs,
) -> dict:
    return resolve_training(
        params or {},
        run_id=run_id,
        logical_date=kwargs.get("logical_date"),
        run_after=kwargs.get("run_after", dt.datetime(2026, 12, 1, 10, tzinfo=UTC)),
        event_versions=list(versions),
    )


def test_the_run_trains_on_the_version_its_events_name_and_a_rerun_on_the_same_one(data_root):
    first = train_plan(versions=[2, 4])
    assert first["manifest_version"] == 4 and first["proceed"] and first["last_model"] is None
    assert (
        first["train_config"]["manifest_version"] == 4
        and first["as_of"] == "2026-01-02"
        and first["run_key"].startswith("train-")
    )
    assert (
        "--manifest-version" in training_args("evaluate", first)
        and training_args("evaluate", first)[-1] == "4"
    )
    record = json.loads((data_root / "runs" / first["run_key"] / "plan.json").read_text())
    assert record["manifest_version"] == 4 and record["drops"] == ["a", "b"]
    # Later data arrives (v5); the rerun of this run still trains on v4, and its own model is not "the last model".
    commit_manifest(open_storage(str(data_root)), manifest(0, 400, 40, ["a", "b", "c"], "2026-01-03"))
    model_trained(data_root, first["run_key"], 4)
    rerun = train_plan(versions=[5])
    assert rerun["manifest_version"] == 4 and "pinned" in rerun["manifest_source"] and rerun["proceed"]
    assert train_plan({"manifest_version": 2}, run_id="manual__x")["manifest_version"] == 2
    # A manual run without a version: the newest manifest as of its date.
    assert (
        train_plan(run_id="manual__y", logical_date=dt.datetime(2026, 1, 2, tzinfo=UTC))["manifest_version"]
        == 4
    )
    with pytest.raises(ManifestError, match="manifest version 9 not found"):
        train_plan({"manifest_version": 9}, run_id="manual__z")


def test_the_policy_counts_from_the_last_models_data_old_pipeline_runs_included(data_root):
    model_trained(data_root, "scheduled__20260101T000000Z", 2)  # a melanoma_pipeline run of before the split
    skipped = train_plan({"retrain_policy": "min_new", "retrain_min_new_images": 100}, versions=[4])
    assert not skipped["proceed"] and skipped["last_model"] == {
        "run_key": "scheduled__20260101T000000Z",
        "manifest_version": 2,
    }
    assert "60 new images (4 melanoma) since manifest v2" in skipped["reason"]
    assert not (data_root / "runs" / skipped["run_key"]).exists()  # a skipped run writes nothing
    assert train_plan({"retrain_policy": "min_new", "retrain_min_new_melanomas": 4}, versions=[4])["proceed"]
    model_trained(data_root, "train-other", 4)
    again = train_plan(versions=[4])
    assert not again["proceed"] and "already trained on manifest v4" in again["reason"]
    # A model of newer data is no baseline for an older manifest.
    assert last_model(open_storage(str(data_root)), up_to=3, exclude="") == {
        "run_key": "scheduled__20260101T000000Z",
        "manifest_version": 2,
    }


def test_a_finished_run_is_not_trained_again(data_root):
    first = train_plan(versions=[4])
    (data_root / "runs" / first["run_key"] / "promotion.json").write_text("{}")  # promote's, written last
    again = train_plan(versions=[4])
    assert again["finished"] and not again["proceed"] and "finished" in again["reason"]


def test_require_manifest_by_version_or_as_of(data_root):
    storage = open_storage(str(data_root))
    assert require_manifest(storage, version=3)["version"] == 3
    assert require_manifest(storage, as_of="2026-01-01")["version"] == 2
    assert require_manifest(storage, as_of="2026-01-01", version=4)["version"] == 4  # the version wins


# --- announcing manifests -------------------------------------------------------------------------


def test_publish_announces_each_new_manifest_once_and_only_at_the_end_of_a_batch():
    latest = {"version": 6}
    assert publish_decision(None, None, []) == (False, "no manifest yet: nothing to announce")
    assert publish_decision(latest, None, [])[0] is True
    assert publish_decision(latest, 4, [])[0] is True
    emit, why = publish_decision(latest, 6, [])
    assert not emit and "announced already" in why
    emit, why = publish_decision(latest, 4, ["backfill__2026-01-05"])
    assert not emit and "backfill__2026-01-05" in why


def test_events_name_drops_and_manifest_versions():
    events = [
        SimpleNamespace(extra={"drop_id": "ham-2026-03-01", "from_rest_api": True}),
        SimpleNamespace(extra={"drops": ["b", "ham-2026-03-01"]}),
        SimpleNamespace(extra={}),
        SimpleNamespace(extra=None),
    ]
    assert drops_from_events(events) == ["ham-2026-03-01", "b"]
    versions = [
        SimpleNamespace(extra={"manifest_version": 7}),
        SimpleNamespace(extra={"manifest_version": "8"}),
        SimpleNamespace(extra={"manifest_version": True}),
        SimpleNamespace(extra={}),
    ]
    assert event_manifest_versions(versions) == [7]
    summary = manifest_summary(
        {
            "version": 3,
            "logical_date": "2026-01-02",
            "drops": ["a"],
            "counts": {"train": {"0": 4, "1": 2}},
            "augmented_counts": {"train": {"0": 0, "1": 4}},
        }
    )
    assert summary == {
        "manifest_version": 3,
        "manifest_key": "processed/manifest-000003.json",
        "logical_date": "2026-01-02",
        "drops": ["a"],
        "images": 6,
        "melanomas": 2,
        "augmented_images": 4,
        "counts": {"train": {"0": 4, "1": 2}},
    }


def test_the_training_dag_trains_its_recipe_and_params_override_it(data_root):
    """melanoma_train's plan fills empty recipe-controlled Params from the recipe (best unless told)."""
    default = train_plan(versions=[2])["train_config"]
    assert (default["target"], default["fine_tune_blocks"], default["train_augment"]) == ("dx", 11, True)
    seed = train_plan(params={"recipe": "reference", "epochs": 7}, versions=[2], run_id="manual__seed")[
        "train_config"
    ]
    assert (seed["backbone"], seed["class_weight"], seed["epochs"]) == ("resnet50", "reference", 7)


def test_an_asset_triggered_run_trains_the_deployments_recipe(data_root, monkeypatch):
    """Asset-triggered runs carry no conf: the recipe comes from Variable/env, a Param still wins."""
    monkeypatch.setenv("MELANOMA_RECIPE", "quick")
    quick = train_plan(versions=[2])["train_config"]
    assert (quick["target"], quick["fine_tune_epochs"], quick["train_flips"]) == ("melanoma", 0, 1)
    chosen = train_plan(params={"recipe": "best"}, versions=[2], run_id="manual__best")["train_config"]
    assert (chosen["target"], chosen["fine_tune_blocks"]) == ("dx", 11)
    monkeypatch.setenv("MELANOMA_RECIPE", "fastest")
    with pytest.raises(ValueError, match="recipe must be one of"):
        train_plan(versions=[2], run_id="asset_triggered__2026-12-01T11:00:00+00:00")
