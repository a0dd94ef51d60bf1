"""The DAG as Airflow sees it (DagBag, serialized Params, timetable) and the plan step's drop selection.

Fast: no DAG run, no Spark, no TensorFlow. What a real run does is in tests/test_runs.py.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("airflow")

from melanoma.manifest import commit_manifest  # noqa: E402
from melanoma.settings import apply_recipe  # noqa: E402
from melanoma.storage import open_storage  # noqa: E402
from pipeline import airflow_ops  # noqa: E402
from pipeline.airflow_ops import (  # noqa: E402
    PARAM_DEFAULTS,
    HistoryOrderError,
    check_history_order,
    drops_in_interval,
    resolve_run,
    run_key,
)

from fresh_python import import_dag_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
DAG_ID = "melanoma_pipeline"
UTC = dt.timezone.utc
CHAIN = [
    "plan",
    "has_new_drops",
    "preprocess",
    "augment",
    "train",
    "evaluate",
    "gradcam",
    "report",
    "promote",
]


def day(y: int, m: int, d: int, h: int = 0) -> dt.datetime:
    return dt.datetime(y, m, d, h, tzinfo=UTC)


# --- the DAG file ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    saved = os.environ.pop("MELANOMA_TASK_RETRIES", None)  # parse with the production default
    try:
        return DagBag(dag_folder=str(DAGS))
    finally:
        if saved is not None:
            os.environ["MELANOMA_TASK_RETRIES"] = saved


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags[DAG_ID]


@pytest.fixture(scope="module")
def serialized_dag(dag):
    """The DAG as the scheduler and API server hold it (what validates a trigger's conf)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))


def test_dagbag_loads_the_dags_folder_without_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert DAG_ID in dagbag.dag_ids


def test_dag_file_imports_in_under_a_second_without_tensorflow_or_pyspark():
    """Measured in a fresh interpreter after what any DagBag has already imported (the SDK, the Spark provider)."""
    measured = import_dag_file(DAGS / "melanoma_pipeline.py")
    print(f"DAG file import: {measured['seconds']:.3f} s")
    assert measured["heavy"] == [], f"the DAG file imports {measured['heavy']} at parse time"
    assert measured["seconds"] < 1.0, f"the DAG file took {measured['seconds']:.2f} s to import"


def test_task_ids_and_order_are_as_documented(dag):
    assert set(dag.task_ids) == set(CHAIN)
    for upstream, downstream in zip(CHAIN, CHAIN[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream} missing"
    # Nothing may run before plan, and nothing Spark or model-side before the short-circuit.
    assert dag.get_task("plan").upstream_task_ids == set()
    assert dag.get_task("has_new_drops").upstream_task_ids == {"plan"}
    assert dag.get_task("preprocess").upstream_task_ids == {"has_new_drops"}
    topological = [t.task_id for t in dag.topological_sort()]
    assert topological == CHAIN


def test_every_task_retries_with_backoff_and_has_an_execution_timeout(dag):
    for task in dag.tasks:
        assert task.retries == 2, f"{task.task_id}: retries {task.retries}"
        assert task.retry_exponential_backoff, task.task_id
        assert task.retry_delay == dt.timedelta(minutes=2), task.task_id
        assert task.max_retry_delay is not None, task.task_id
        assert task.execution_timeout is not None, f"{task.task_id} has no execution_timeout"
        assert dt.timedelta(0) < task.execution_timeout <= dt.timedelta(hours=12), task.task_id
    quick = {t: dag.get_task(t).execution_timeout for t in ("plan", "has_new_drops", "report")}
    assert all(timeout <= dt.timedelta(minutes=30) for timeout in quick.values()), quick


def test_retries_come_from_the_environment_at_parse_time():
    """``airflow dags test`` (the demo, the e2e tests) runs with MELANOMA_TASK_RETRIES=0."""
    script = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        f"print(sorted({{t.retries for t in bag.dags[{DAG_ID!r}].tasks}}))\n"
    )
    env = {**os.environ, "MELANOMA_TASK_RETRIES": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[0]"


def test_preprocess_waits_for_the_previous_runs_data_steps(dag):
    """Drops enter the data set in date order even when a backfill runs several dates at once."""
    preprocess = dag.get_task("preprocess")
    assert preprocess.depends_on_past and preprocess.wait_for_downstream
    assert dag.get_task("preprocess").downstream_task_ids == {"augment"}
    # Model-side tasks read "the manifest as of the run's date": they need not wait.
    assert not any(
        dag.get_task(t).depends_on_past
        for t in ("plan", "has_new_drops", "train", "evaluate", "gradcam", "report")
    )
    assert dag.max_active_runs == 1


def test_augment_keeps_the_date_of_the_manifest_it_extends(dag):
    """No --logical-date: a rerun's augment cannot stamp another run's shards with its own date."""
    assert "--logical-date" not in dag.get_task("augment").application_args
    assert "--logical-date" in dag.get_task("preprocess").application_args


def test_schedule_is_daily_data_intervals_and_each_interval_owns_its_days_drops(serialized_dag):
    """What ``airflow backfill create --from-date 2026-01-01 --to-date 2026-01-03`` will create."""
    from airflow.timetables.interval import CronDataIntervalTimetable

    assert isinstance(serialized_dag.timetable, CronDataIntervalTimetable)
    infos = list(serialized_dag.iter_dagrun_infos_between(day(2026, 1, 1), day(2026, 1, 3)))
    assert [i.logical_date for i in infos] == [day(2026, 1, 1), day(2026, 1, 2), day(2026, 1, 3)]
    assert [(i.data_interval.start, i.data_interval.end) for i in infos] == [
        (day(2026, 1, d), day(2026, 1, d + 1)) for d in (1, 2, 3)
    ]
    drops = ["ham-2026-01-01", "isic_20260102", "ham-2026-01-03", "ham-2026-01-03-late", "no-date"]
    owned = [drops_in_interval(drops, i.data_interval.start, i.data_interval.end) for i in infos]
    assert owned == [["ham-2026-01-01"], ["isic_20260102"], ["ham-2026-01-03", "ham-2026-01-03-late"]]


# --- Params ----------------------------------------------------------------------------------


def test_params_have_descriptions_and_the_documented_defaults(dag):
    assert set(dag.params) == set(PARAM_DEFAULTS)
    for name in PARAM_DEFAULTS:
        param = dag.params.get_param(name)
        assert param.value == PARAM_DEFAULTS[name], name
        assert param.description and len(param.description) > 20, (
            f"{name} has no description for the trigger form"
        )


def test_default_params_validate(serialized_dag):
    assert serialized_dag.params.deep_merge({}).validate() == PARAM_DEFAULTS
    good = {
        "epochs": 2,
        "n_boot": 100,
        "max_train_images": 200,
        "drops": ["ham-2026-01-01", "isic_20260102"],
        "backbone": "resnet50",
        "threshold_strategy": "sensitivity",
        "target_sensitivity": 0.9,
    }
    assert serialized_dag.params.deep_merge(good).validate()["drops"] == ["ham-2026-01-01", "isic_20260102"]


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"epochs": -1}, "epochs"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": "5"}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"backbone": "vgg"}, "backbone"),
        ({"drops": ["../etc"]}, "drops"),
        ({"drops": [".."]}, "drops"),
        ({"drops": ["a/b"]}, "drops"),
        ({"drops": ["ok-2026-01-01", "ok-2026-01-01"]}, "drops"),
        ({"drops": ".hidden"}, "drops"),
        ({"drops": [""]}, "drops"),
        ({"external_drops": ["../../secrets"]}, "external_drops"),
        ({"weights": ""}, "weights"),
        ({"class_weight": "auto"}, "class_weight"),
        ({"max_train_images": -5}, "max_train_images"),
        ({"threshold_strategy": "max"}, "threshold_strategy"),
        ({"target_sensitivity": 0}, "target_sensitivity"),
        ({"target_sensitivity": 1.5}, "target_sensitivity"),
        ({"n_boot": 10}, "n_boot"),
        ({"fine_tune_blocks": 0}, "fine_tune_blocks"),
        ({"target": "binary"}, "target"),
        ({"train_flips": 3}, "train_flips"),
        ({"train_augment": "yes"}, "train_augment"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"fine_tune_learning_rate": 1}, "fine_tune_learning_rate"),
        ({"lr_decay_patience": -1}, "lr_decay_patience"),
        ({"max_train_minutes": -1}, "max_train_minutes"),
        # Issue #20: NaN passed every bound (each comparison with NaN is false); infinities too.
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"fine_tune_learning_rate": float("nan")}, "fine_tune_learning_rate"),
        ({"max_train_minutes": float("nan")}, "max_train_minutes"),
        ({"target_sensitivity": float("nan")}, "target_sensitivity"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"max_train_minutes": float("-inf")}, "max_train_minutes"),
        ({"drops": ["a,b"]}, "drops"),  # would be split by a comma-joined argument
    ],
)
def test_bad_params_are_refused_naming_the_field(serialized_dag, conf, field):
    """The same check Airflow runs when a run is created (trigger form, REST API, backfill --dag-run-conf)."""
    from airflow.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError) as caught:
        serialized_dag.params.deep_merge(conf).validate()
    message = str(caught.value)
    assert f"Invalid input for param {field}:" in message, message


def test_backbone_param_offers_exactly_the_buildable_backbones(dag):
    """The DAG file cannot import training.model at parse time (Keras), so its enum is a copy: keep it in step."""
    from training.model import BACKBONES

    # None: "the recipe's backbone" (recipe-controlled Params may be left empty).
    assert dag.params.get_param("backbone").schema["enum"][0] is None
    assert sorted(dag.params.get_param("backbone").schema["enum"][1:]) == sorted(BACKBONES)


def test_sdk_params_refuse_bad_values_too(dag):
    """Param.resolve (the SDK side, used when the DAG file is parsed and in tasks)."""
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="minimum"):
        dag.params.get_param("epochs").resolve(-1)
    with pytest.raises(ParamValidationError, match="vgg"):
        dag.params.get_param("backbone").resolve("vgg")
    with pytest.raises(ParamValidationError, match="does not match"):
        dag.params.get_param("drops").resolve(["../x"])
    assert dag.params.get_param("drops").resolve(["ham-2026-01-01"]) == ["ham-2026-01-01"]


# --- run keys and drop selection --------------------------------------------------------------


def test_run_key_is_stable_per_run_and_distinct_between_runs():
    d = day(2026, 3, 1)
    assert run_key("scheduled__2026-03-02T00:00:00+00:00", d) == "scheduled__20260301T000000Z"
    assert run_key("backfill__2026-03-02T00:00:00+00:00", d) == "backfill__20260301T000000Z"
    assert run_key("manual__2026-11-26T16:00:00.123+00:00", d) == "manual__20260301T000000Z"
    # `airflow dags test` on the same date again (a new run id, the same logical date): the same folder.
    assert run_key("manual__2026-11-26T17:00:00+00:00", d) == run_key("manual__2026-11-26T16:00:00+00:00", d)
    # A custom run id with a logical date; a pendulum/naive date is read as UTC.
    assert run_key("my run", dt.datetime(2026, 3, 1)) == "run__20260301T000000Z"
    # Without a logical date: the run id, made safe, and still unique.
    a, b = (
        run_key("manual__2026-03-01T10:00:00+00:00_abc", None),
        run_key("manual__2026-03-01T10_00_00_00_00_abc", None),
    )
    assert a != b and "/" not in a and ":" not in a and "+" not in a
    assert run_key("../../etc", None).startswith("etc-")


def test_drops_in_interval_is_half_open_and_never_overlaps():
    drops = [f"ham-2026-01-{d:02d}" for d in range(1, 6)] + ["undated", "isic-20260103-part2"]
    assert drops_in_interval(drops, day(2026, 1, 2), day(2026, 1, 3)) == ["ham-2026-01-02"]
    assert drops_in_interval(drops, day(2026, 1, 2), day(2026, 1, 4)) == [
        "ham-2026-01-02",
        "ham-2026-01-03",
        "isic-20260103-part2",
    ]
    # Hourly intervals: each drop is owned by exactly one of them (the one holding its midnight).
    hours = [day(2026, 1, 1) + dt.timedelta(hours=h) for h in range(24 * 6)]
    owners = [d for start in hours for d in drops_in_interval(drops, start, start + dt.timedelta(hours=1))]
    assert sorted(owners) == sorted(d for d in drops if d != "undated")
    assert drops_in_interval(drops, day(2026, 1, 2), day(2026, 1, 2)) == []  # zero-width
    assert drops_in_interval(drops, None, None) == []
    assert drops_in_interval(drops, dt.datetime(2026, 1, 5), dt.datetime(2026, 1, 6)) == [
        "ham-2026-01-05"
    ]  # naive = UTC


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """A raw root with four drops and an empty data root, set as the run's configuration."""
    raw, data = tmp_path / "raw", tmp_path / "data"
    for drop in ("ham-2026-01-01", "ham-2026-01-02", "ham-2026-01-03", "undated-extra"):
        (raw / drop).mkdir(parents=True)
        (raw / drop / "HAM10000_metadata.csv").write_text("image_id,dx\n")
    (raw / "_staging-2026-01-02").mkdir()
    (raw / "_staging-2026-01-02" / "x.csv").write_text("")
    monkeypatch.setenv("MELANOMA_RAW_ROOT", str(raw))
    monkeypatch.setenv("MELANOMA_DATA_ROOT", str(data))
    return raw, data


def resolve(
    run_type: str = "scheduled",
    date: dt.datetime | None = day(2026, 1, 2),  # noqa: B008 - a constant, computed once, never mutated
    params: dict | None = None,
    **kwargs,
) -> dict:
    interval = (date, date + dt.timedelta(days=1)) if date else (None, None)
    defaults = {
        "run_id": f"{run_type}__{(date or day(2026, 1, 9)).isoformat()}",
        "logical_date": date,
        "interval_start": interval[0],
        "interval_end": interval[1],
        "run_after": day(2026, 1, 9, 12),
    }
    return resolve_run(params or {}, run_type=run_type, **{**defaults, **kwargs})


def commit(data: Path, drops: list[str], logical_date: str) -> None:
    commit_manifest(open_storage(data), {"logical_date": logical_date, "drops": sorted(drops), "shards": []})


def listing(data: Path) -> list[str]:
    return sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) if data.exists() else []


def test_training_params_reach_a_valid_training_config(roots):
    """Every training Param lands in train_config under a name the trainer knows."""
    from training.train import TrainConfig

    params = {
        "target": "dx",
        "train_flips": 4,
        "train_augment": True,
        "learning_rate": 3e-4,
        "fine_tune_learning_rate": 2e-4,
        "lr_decay_patience": 2,
        "max_train_minutes": 1.5,
        "fine_tune_epochs": 3,
        "fine_tune_blocks": 5,
    }
    run = resolve("manual", params=params)
    cfg = TrainConfig.from_dict({"processed_root": "p", "run_root": "r", **run["train_config"]})
    assert (cfg.target, cfg.train_flips, cfg.learning_rate, cfg.fine_tune_learning_rate) == (
        "dx",
        4,
        3e-4,
        2e-4,
    ) and cfg.train_augment
    assert (cfg.lr_decay_patience, cfg.max_train_seconds, cfg.fine_tune_epochs, cfg.fine_tune_blocks) == (
        2,
        90.0,
        3,
        5,
    )
    quick = TrainConfig.from_dict(
        {
            "processed_root": "p",
            "run_root": "r",
            **resolve("manual", params={"recipe": "quick"})["train_config"],
        }
    )
    # The quick recipe: head only, binary target, lr 1e-4 then 1e-5, no decay, no budget.
    assert (quick.target, quick.train_flips, quick.learning_rate, quick.fine_tune_learning_rate) == (
        "melanoma",
        1,
        1e-4,
        1e-5,
    )
    assert quick.fine_tune_epochs == 0 and quick.lr_decay_patience == 0 and quick.max_train_seconds is None
    assert not quick.train_augment


def test_no_param_given_trains_the_best_recipe(roots):
    run = resolve("scheduled")
    cfg = run["train_config"]
    assert (cfg["target"], cfg["fine_tune_blocks"], cfg["train_flips"], cfg["train_augment"]) == (
        "dx",
        11,
        4,
        True,
    )
    assert (cfg["fine_tune_learning_rate"], cfg["lr_decay_patience"], cfg["fine_tune_epochs"]) == (
        3e-4,
        2,
        40,
    )
    assert cfg["max_train_seconds"] == 75 * 60


def test_the_seed_recipe_is_the_reference_report(roots):
    cfg = resolve("manual", params={"recipe": "reference"})["train_config"]
    assert (cfg["backbone"], cfg["target"], cfg["class_weight"]) == ("resnet50", "melanoma", "reference")
    assert (cfg["learning_rate"], cfg["fine_tune_learning_rate"], cfg["fine_tune_epochs"] > 0) == (
        1e-4,
        1e-5,
        True,
    )
    assert (cfg["train_flips"], cfg["train_augment"], cfg["lr_decay_patience"]) == (1, False, 0)


def test_a_param_overrides_the_recipe_and_an_empty_one_takes_it(roots, serialized_dag):
    # What the trigger form sends: every Param, the recipe-controlled ones left empty (null).
    form = serialized_dag.params.deep_merge({"recipe": "reference", "fine_tune_blocks": 5}).validate()
    assert form["backbone"] is None and form["fine_tune_blocks"] == 5
    cfg = resolve("manual", params=form)["train_config"]
    assert (cfg["backbone"], cfg["class_weight"], cfg["fine_tune_blocks"]) == ("resnet50", "reference", 5)
    explicit = resolve("manual", params={"recipe": "best", "target": "melanoma", "train_flips": 1})
    assert (explicit["train_config"]["target"], explicit["train_config"]["train_flips"]) == ("melanoma", 1)
    assert explicit["train_config"]["fine_tune_blocks"] == 11  # the rest still the recipe's


def test_the_best_recipe_evaluates_with_test_time_augmentation_and_a_param_turns_it_off(roots):
    from pipeline.training_tasks import training_args

    best = resolve("manual", params={"recipe": "best"})
    assert best["test_time_augmentation"] is True
    assert "--test-time-augmentation" in training_args("evaluate", best)
    off = resolve("manual", params={"recipe": "best", "test_time_augmentation": False})
    assert "--test-time-augmentation" not in training_args("evaluate", off)
    quick = resolve("manual", params={"recipe": "quick"})
    assert "--test-time-augmentation" not in training_args("evaluate", quick)


def test_an_unknown_recipe_is_refused(serialized_dag):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        serialized_dag.params.deep_merge({"recipe": "fastest"}).validate()
    with pytest.raises(ValueError, match="recipe must be one of"):
        apply_recipe({"recipe": "fastest"})


def test_bench_quality_without_flags_trains_a_default_scheduled_runs_config(roots):
    """make bench-quality measures what a scheduled run trains (issue #23.1)."""
    import importlib.util
    from dataclasses import asdict

    from training.train import TrainConfig

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args([])
    benched = asdict(bench.train_config(args, "p", "r", train_budget=1.0))
    scheduled = asdict(
        TrainConfig.from_dict(
            {"processed_root": "p", "run_root": "r", **resolve("scheduled")["train_config"]}
        )
    )
    # Run-specific, not the recipe: the budget (bench-quality's covers preprocessing too), the
    # seed (a bench flag), the data date and cap.
    for run_specific in ("max_train_seconds", "seed", "as_of", "limit_train"):
        benched.pop(run_specific), scheduled.pop(run_specific)
    assert benched == scheduled
    assert args.budget_minutes == resolve("scheduled")["train_config"]["max_train_seconds"] / 60


def test_scheduled_and_backfill_runs_take_their_intervals_drops(roots):
    for run_type in ("scheduled", "backfill"):
        run = resolve(run_type, day(2026, 1, 2))
        assert run["drops"] == ["ham-2026-01-02"] and run["new_drops"] == ["ham-2026-01-02"], run
        assert run["proceed"] and run["as_of"] == "2026-01-02"
        assert run["run_key"] == f"{run_type}__20260102T000000Z"
        assert run["train_config"]["as_of"] == "2026-01-02"
    assert resolve("scheduled", day(2026, 1, 7))["drops"] == []


def test_a_manual_run_takes_every_drop_not_processed_yet(roots):
    raw, data = roots
    run = resolve("manual", day(2026, 1, 1))
    assert run["drops"] == ["ham-2026-01-01", "ham-2026-01-02", "ham-2026-01-03", "undated-extra"]
    assert run["new_drops"] == run["drops"]
    commit(data, ["ham-2026-01-01", "ham-2026-01-02"], "2026-01-02")
    later = resolve("manual", day(2026, 1, 3))
    assert later["drops"] == ["ham-2026-01-01", "ham-2026-01-02", "ham-2026-01-03", "undated-extra"]
    assert later["new_drops"] == ["ham-2026-01-03", "undated-extra"]


def test_explicit_drops_are_taken_as_given_and_unknown_ones_fail_clearly(roots):
    run = resolve("scheduled", day(2026, 1, 2), {"drops": ["ham-2026-01-03", "ham-2026-01-01"]})
    assert run["drops"] == ["ham-2026-01-03", "ham-2026-01-01"]
    with pytest.raises(
        ValueError, match=r"drops \['ham-2099-01-01'\] not found under .*available: \['ham-2026-01-01'"
    ):
        resolve("manual", day(2026, 1, 2), {"drops": ["ham-2026-01-01", "ham-2099-01-01"]})
    with pytest.raises(ValueError, match=r"external_drops \['isic-missing'\] not found"):
        resolve("manual", day(2026, 1, 2), {"external_drops": ["isic-missing"]})
    with pytest.raises(ValueError, match=r"unknown Params \['epoch'\]"):
        resolve("manual", day(2026, 1, 2), {"epoch": 5})


def test_a_run_without_a_new_drop_proceeds_no_further_and_writes_nothing(roots):
    raw, data = roots
    commit(data, ["ham-2026-01-02"], "2026-01-02")
    before = listing(data)
    run = resolve("scheduled", day(2026, 1, 2), run_id="scheduled__other")
    assert run["drops"] == ["ham-2026-01-02"] and run["new_drops"] == [] and not run["proceed"]
    assert listing(data) == before


def test_a_run_pins_its_drops_so_a_rerun_resumes_and_a_finished_one_is_skipped(roots):
    raw, data = roots
    first = resolve("scheduled", day(2026, 1, 2))
    record = json.loads((data / "runs" / first["run_key"] / "plan.json").read_text())
    assert record["new_drops"] == ["ham-2026-01-02"] and record["as_of"] == "2026-01-02"
    # preprocess committed the drop, then training failed: a cleared rerun must still train.
    commit(data, ["ham-2026-01-02"], "2026-01-02")
    before = listing(data)
    resumed = resolve("scheduled", day(2026, 1, 2))
    assert (
        resumed["new_drops"] == ["ham-2026-01-02"] and resumed["pending_drops"] == [] and resumed["proceed"]
    )
    assert listing(data) == before  # nothing rewritten
    # The run finished (promotion.json is written last): a rerun changes nothing.
    (data / "runs" / first["run_key"] / "promotion.json").write_text("{}")
    before = listing(data)
    again = resolve("scheduled", day(2026, 1, 2))
    assert again["finished"] and not again["proceed"]
    assert listing(data) == before
    # Another run of the same date's drop (a different logical date, explicit drops) does not own it.
    other = resolve("manual", day(2026, 1, 5), {"drops": ["ham-2026-01-02"]})
    assert other["new_drops"] == [] and not other["proceed"]


def test_as_of_is_the_logical_date_else_the_day_the_run_started(roots):
    assert resolve("manual", day(2026, 1, 2, 18))["as_of"] == "2026-01-02"
    run = resolve(
        "manual", None, run_id="manual__2026-01-09T12:00:00+00:00_x1y2", run_after=day(2026, 1, 9, 12)
    )
    assert run["as_of"] == "2026-01-09" and run["train_config"]["as_of"] == "2026-01-09"
    assert run["run_key"].startswith("manual__2026-01-09T12_00_00_00_00_x1y2")


def test_drops_are_refused_when_they_would_rewrite_a_later_history(roots):
    """A backfill for 01-02 after 01-03 was processed would put 01-03's data in a manifest dated 01-02."""
    raw, data = roots
    commit(data, ["ham-2026-01-03"], "2026-01-03")
    with pytest.raises(
        HistoryOrderError, match=r"dated 2026-01-02 but the newest manifest .* for 2026-01-03"
    ):
        resolve("backfill", day(2026, 1, 2))
    assert not (data / "runs").exists()
    # Nothing new: no history is rewritten, the run just proceeds no further.
    assert resolve("backfill", day(2026, 1, 3))["proceed"] is False
    # In a run dated today the late drop can still be processed.
    assert resolve("manual", day(2026, 1, 9), {"drops": ["ham-2026-01-02"]})["new_drops"] == [
        "ham-2026-01-02"
    ]
    check_history_order({"logical_date": "2026-01-03"}, "2026-01-03", ["x"])  # same date: fine
    check_history_order({"logical_date": None}, "2026-01-01", ["x"])  # undated manifests: nothing to compare


def test_recheck_before_preprocess_sees_manifests_committed_after_plan(roots):
    raw, data = roots
    run = resolve("backfill", day(2026, 1, 2))
    airflow_ops.recheck_history_order(run)
    commit(data, ["ham-2026-01-03"], "2026-01-03")
    with pytest.raises(HistoryOrderError):
        airflow_ops.recheck_history_order(run)


def test_settings_come_from_airflow_variables_then_the_environment(monkeypatch, tmp_path):
    """``melanoma_<name>`` Variables (here through AIRFLOW_VAR_*, as a secrets backend would) beat MELANOMA_* env."""
    monkeypatch.setenv("MELANOMA_DATA_ROOT", str(tmp_path / "from-env"))
    monkeypatch.delenv("AIRFLOW_VAR_MELANOMA_DATA_ROOT", raising=False)
    assert airflow_ops.setting("data_root", "default") == str(tmp_path / "from-env")
    monkeypatch.setenv("AIRFLOW_VAR_MELANOMA_DATA_ROOT", "s3://bucket/data")
    assert airflow_ops.setting("data_root", "default") == "s3://bucket/data"
    monkeypatch.delenv("MELANOMA_RUNNER", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_MELANOMA_RUNNER", raising=False)
    assert airflow_ops.setting("runner", "local") == "local"


def test_spark_tasks_get_the_jobs_spark_settings_at_run_time(dag, monkeypatch):
    """preprocess/augment read the Spark settings when they run (env/Variables), not at parse time."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from melanoma.spark_settings import DRIVER_JAVA_OPTIONS

    seen = {}
    monkeypatch.setattr(SparkSubmitOperator, "execute", lambda self, context: seen.update(self.conf))
    monkeypatch.setenv("MELANOMA_SPARK_PYTHON", "/opt/py/bin/python3")
    task = dag.get_task("augment")
    assert not task.conf  # nothing resolved at parse time
    monkeypatch.setattr(task, "conf", task.conf)  # execute() sets it; restored after the test
    task.execute({})
    assert seen["spark.pyspark.python"] == seen["spark.pyspark.driver.python"] == "/opt/py/bin/python3"
    assert seen["spark.driver.extraJavaOptions"] == DRIVER_JAVA_OPTIONS
