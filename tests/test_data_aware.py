"""Data-aware scheduling under a real scheduler: ingest per drop, one training per batch of new data.

One ``airflow standalone`` (SQLite, LocalExecutor, real Spark ``local[2]``, the local training
runner, the real EfficientNet-Lite0 weights) on 127.0.0.1 serves both scenarios, in order:

1. ``airflow backfill create`` of ``melanoma_ingest`` over five days with one small SYNTHETIC drop
   each: five ingest runs in date order, processed data byte for byte what five sequential
   ingestions of the same drops produce, and one training run (the issue allows two): only the last
   ingest run of the batch announces the manifest, and the training runs on the manifest holding
   all five drops.
2. An uploader's asset event (REST ``POST /api/v2/assets/events`` on the ``melanoma_drops`` asset)
   for a small finished drop: an ingest run takes that drop and announces the new manifest, which
   starts a training run; under the policy "at least 50 new images" (env, as a deployment would
   set it) that run *starts and skips* training (``should_train`` short-circuits) with the reason
   in its plan. It starts because the asset event is the truth about the data set (other consumers
   may want it) and the policy is the training DAG's business, decided where the last model is known.

The sequential reference runs the ingestion code in this process (``melanoma.ingest`` with its
in-process engine, which tests/test_spark_jobs.py shows writes the same bytes as Spark): five
Airflow runs more would double this test's time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_runs import airflow_binary, free_port, manifests, snapshot, stop_process_group

from melanoma.synthetic import write_drop
from pipeline.demo import airflow_env

from airflow_server import api_server_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
INGEST, TRAIN = "melanoma_ingest", "melanoma_train"
DAYS = [f"2026-01-0{d}" for d in range(1, 6)]
DROPS = [f"syn-{day}" for day in DAYS]
UPLOADED = "upload-syn-small"
MIN_NEW_IMAGES = 50
TIMEOUT_S = float(os.environ.get("MELANOMA_ASSETS_TIMEOUT", "900"))
TERMINAL = ("success", "failed")


class Standalone:
    """``airflow standalone`` in its own home; SQLite read directly, the REST API over 127.0.0.1."""

    def __init__(self, root: Path, raw: Path) -> None:
        self.root, self.raw, self.home, self.data = root, raw, root / "airflow", root / "data"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = airflow_env(
            self.home,
            str(self.data),
            str(raw),
            {
                **api_server_env("127.0.0.1", self.port),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                # The schedule stays on (asset-triggered runs are created by the same loop), so unpausing
                # the ingest DAG also makes today's scheduled run (2026-12-01's interval here: no drop).
                # An execution-API hiccup gets one retry, soon: tasks of the backfill's runs created before
                # standalone starts can be sent before its API server listens ("connection refused").
                "MELANOMA_TASK_RETRIES": "1",
                "MELANOMA_TASK_RETRY_DELAY_S": "5",
                # The retraining policy as a deployment sets it (asset-triggered runs carry no conf).
                "MELANOMA_RETRAIN_POLICY": "min_new",
                "MELANOMA_RETRAIN_MIN_NEW_IMAGES": str(MIN_NEW_IMAGES),
                # The recipe too: the scheduling is under test, not the model (quick: the head only).
                "MELANOMA_RECIPE": "quick",
            },
        )
        self.cli_log, self.log_path = root / "airflow-cli.log", root / "standalone.log"
        self.process: subprocess.Popen | None = None
        self.token: str | None = None

    def airflow(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [airflow_binary(), *args],
            env=self.env,
            cwd=ROOT,
            text=True,
            timeout=300,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with open(self.cli_log, "a") as log:
            log.write(f"\n===== airflow {' '.join(args)} -> {result.returncode}\n{result.stdout}")
        assert result.returncode == 0, result.stdout[-3000:]
        return result

    def backfill(self, dag_id: str) -> subprocess.CompletedProcess:
        """``airflow backfill create`` of ``dag_id`` over DAYS; ``failed``: the reprocess behaviour a DAG
        with depends_on_past needs."""
        return self.airflow(
            "backfill",
            "create",
            "--dag-id",
            dag_id,
            "--from-date",
            DAYS[0],
            "--to-date",
            DAYS[-1],
            "--reprocess-behavior",
            "failed",
        )

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [airflow_binary(), "standalone"],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def rows(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.home / "airflow.db", timeout=60) as db:
            return db.execute(sql, args).fetchall()

    def runs(self, dag_id: str) -> list[dict]:
        """Runs in creation order, each with its task states and plan XCom."""
        runs = []
        for run_id, run_type, state in self.rows(
            "select run_id, run_type, state from dag_run where dag_id=? order by id", dag_id
        ):
            states = dict(
                self.rows(
                    "select task_id, state from task_instance where dag_id=? and run_id=?", dag_id, run_id
                )
            )
            xcom = dict(
                self.rows(
                    "select task_id, value from xcom where dag_id=? and run_id=? and key='return_value'",
                    dag_id,
                    run_id,
                )
            )
            runs.append(
                {
                    "run_id": run_id,
                    "run_type": run_type,
                    "state": state,
                    "states": states,
                    **{f"{task}_xcom": json.loads(value) for task, value in xcom.items()},
                }
            )
        return runs

    def fail_fast(self) -> None:
        """A failed task (or a dead standalone) fails the test at once, with the task's log tail."""
        assert self.process is not None and self.process.poll() is None, (
            f"airflow standalone exited:\n{self.log_path.read_text(errors='replace')[-4000:]}"
        )
        failed = self.rows(
            "select dag_id, run_id, task_id from task_instance where state in ('failed', 'upstream_failed')"
        )
        if failed:
            tails = []
            for dag_id, run_id, task_id in failed:
                logs = sorted(
                    self.home.glob(f"logs/dag_id={dag_id}/run_id={run_id}/task_id={task_id}/**/*.log"),
                    key=lambda p: p.stat().st_mtime,
                )
                tails.append(
                    f"--- {dag_id} {run_id} {task_id}: "
                    + (logs[-1].read_text(errors="replace")[-3000:] if logs else "no log")
                )
            pytest.fail(f"task(s) failed: {failed}\n" + "\n".join(tails) + f"\nsee {self.log_path}")

    def wait_for(self, predicate, what: str, timeout: float = TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.fail_fast()
            value = predicate()
            if value:
                return value
            time.sleep(3)
        pytest.fail(
            f"timed out after {timeout:.0f} s waiting for {what}; ingest runs {self.runs(INGEST)}; "
            f"train runs {self.runs(TRAIN)}; see {self.log_path}"
        )

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def login(self) -> None:
        """The admin password standalone generated, exchanged for a token (what an uploader's service account does)."""

        def api_up():
            try:
                return self.request("GET", "/api/v2/version")[0] == 200
            except OSError:
                return False

        self.wait_for(api_up, f"the API on {self.base}", timeout=300)
        password_file = self.home / "simple_auth_manager_passwords.json.generated"
        passwords = self.wait_for(
            lambda: password_file.exists() and json.loads(password_file.read_text()), str(password_file), 60
        )
        status, body = self.request(
            "POST", "/auth/token", {"username": "admin", "password": passwords["admin"]}
        )
        assert status == 201, (status, body)
        self.token = body["access_token"]


def idle(runs: list[dict]) -> bool:
    return all(r["state"] in TERMINAL for r in runs)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """Five dated drops, both DAGs unpaused, the ingest backfill created; standalone started (stopped at the end)."""
    root = tmp_path_factory.mktemp("assets")
    raw = root / "raw"
    for index, drop in enumerate(DROPS):
        write_drop(raw, n_images=30, seed=10 + index, drop_id=drop, id_prefix=f"SYN{chr(65 + index)}")
    server = Standalone(root, raw)
    server.home.mkdir(parents=True)
    # Created before standalone starts: the CLI's INSERT racing the scheduler on SQLite can hit a
    # lock-upgrade deadlock ("database is locked" at once; see tests/test_runs.py).
    for step in (
        ("db", "migrate"),
        ("dags", "reserialize"),
        ("dags", "unpause", INGEST),
        ("dags", "unpause", TRAIN),
    ):
        server.airflow(*step)
    server.backfill(INGEST)
    server.start()
    try:
        yield server
    finally:
        stop_process_group(server.process)


@pytest.fixture(scope="module")
def backfilled(standalone):
    """The backfill's five ingest runs and the training run(s) they started, once all are done."""
    started = time.monotonic()

    def done():
        ingest, train = standalone.runs(INGEST), standalone.runs(TRAIN)
        queued = standalone.rows("select count(*) from asset_dag_run_queue where target_dag_id=?", TRAIN)[0][
            0
        ]
        backfill = [r for r in ingest if r["run_type"] == "backfill"]
        # Done when every ingest run finished and the training they announced has run.
        return (
            (ingest, train)
            if len(backfill) == 5 and idle(ingest) and train and idle(train) and not queued
            else None
        )

    ingest, train = standalone.wait_for(done, "the five ingest runs and the training they start")
    seconds = time.monotonic() - started
    print(
        f"backfill of 5 drops: {seconds:.0f} s from standalone start to the last training's end; "
        f"ingest runs {[r['run_type'] for r in ingest]}, {len(train)} training run(s)"
    )
    return {
        "ingest": ingest,
        "train": train,
        "seconds": seconds,
        "processed": snapshot(standalone.data / "processed"),
        "manifests": manifests(standalone.data),
    }


def sequential_reference(raw: Path, out: Path) -> dict[str, str]:
    """The five drops ingested one after another (preprocess then augment per day), in this process."""
    from melanoma import ingest

    for day, drop in zip(DAYS, DROPS):
        ingest.run_preprocess(str(raw), str(out), ingest.local_engine, drops=[drop], logical_date=day)
        ingest.run_augment(str(out), ingest.local_engine)
    return snapshot(out / "processed")


def test_a_backfill_ingests_each_drop_in_order_and_trains_once_on_all_of_them(
    standalone, backfilled, tmp_path
):
    everything, train = backfilled["ingest"], backfilled["train"]
    ingest = [r for r in everything if r["run_type"] == "backfill"]
    # Besides the backfill, at most the scheduled run of the latest interval, which has no drop.
    others = [r for r in everything if r["run_type"] != "backfill"]
    assert [r["run_type"] for r in others] in ([], ["scheduled"]) and all(
        not r["plan_xcom"]["new_drops"] for r in others
    )
    assert [r["state"] for r in everything] == ["success"] * len(everything), [
        r["states"] for r in everything
    ]
    # Each run took the drop dated in its data interval, and they ran in date order.
    assert [r["plan_xcom"]["new_drops"] for r in ingest] == [[d] for d in DROPS]
    assert [r["plan_xcom"]["run_key"] for r in ingest] == [
        f"ingest-backfill__{d.replace('-', '')}T000000Z" for d in DAYS
    ]
    times = {
        (run_id, task): (start, end)
        for run_id, task, start, end in standalone.rows(
            "select run_id, task_id, start_date, end_date from task_instance where dag_id=?", INGEST
        )
    }
    for before, after in zip(ingest, ingest[1:]):
        assert times[(after["run_id"], "preprocess")][0] >= times[(before["run_id"], "augment")][1]
    assert [(m["logical_date"], m["drops"]) for m in backfilled["manifests"]] == [
        (day, DROPS[: i + 1]) for i, day in enumerate(DAYS) for _ in range(2)
    ]

    # One announcement, by the last ingest run (the backfill's last, or the scheduled run dated after
    # it: each publish waits for the previous run's), naming version 10 and all five drops.
    assert [r["states"]["publish"] for r in ingest[:4]] == ["skipped"] * 4
    assert sorted(r["states"]["publish"] for r in ingest[4:] + others) == ["skipped"] * len(others) + [
        "success"
    ]
    events = standalone.rows(
        "select e.extra from asset_event e join asset a on a.id = e.asset_id where a.name='melanoma_manifest'"
    )
    assert len(events) == 1, events
    extra = json.loads(events[0][0])
    assert extra["manifest_version"] == 10 and extra["drops"] == DROPS and extra["images"] > 0

    # At most two trainings (here one), the last on the manifest holding all five drops.
    assert 1 <= len(train) <= 2 and [r["run_type"] for r in train] == ["asset_triggered"] * len(train)
    last = train[-1]
    assert last["state"] == "success" and set(last["states"].values()) == {"success"}, last["states"]
    assert last["plan_xcom"]["manifest_version"] == 10 and last["plan_xcom"]["drops"] == DROPS
    run_root = standalone.data / "runs" / last["plan_xcom"]["run_key"]
    assert json.loads((run_root / "model" / "provenance.json").read_text())["manifest_version"] == 10
    assert json.loads((run_root / "eval" / "metrics.json").read_text())["manifest_version"] == 10
    assert json.loads((run_root / "plan.json").read_text())["manifest_version"] == 10

    # Byte for byte what five sequential ingestions of the same drops leave (manifests included).
    assert backfilled["processed"] == sequential_reference(standalone.raw, tmp_path / "sequential")


def test_an_uploaders_asset_event_starts_ingestion_then_a_training_run_the_policy_skips(
    standalone, backfilled
):
    standalone.login()
    write_drop(
        standalone.raw, n_images=12, seed=99, drop_id=UPLOADED, id_prefix="UPL"
    )  # the upload, complete
    status, assets = standalone.request("GET", "/api/v2/assets?name_pattern=melanoma_drops")
    assert status == 200 and assets["total_entries"] == 1, assets
    status, event = standalone.request(
        "POST",
        "/api/v2/assets/events",
        {"asset_id": assets["assets"][0]["id"], "extra": {"drop_id": UPLOADED}},
    )
    assert status == 200, (status, event)
    trained_before = len(backfilled["train"])

    def ingested_and_trained():
        ingest, train = standalone.runs(INGEST), standalone.runs(TRAIN)
        news = [r for r in ingest if r["run_type"] == "asset_triggered"]
        return (
            (news, train[trained_before:])
            if news and idle(news) and len(train) > trained_before and idle(train)
            else None
        )

    ingest, train = standalone.wait_for(
        ingested_and_trained, "the uploaded drop's ingest run and the training run it starts"
    )
    assert len(ingest) == 1 and ingest[0]["state"] == "success", ingest
    plan = ingest[0]["plan_xcom"]
    assert plan["drops"] == [UPLOADED] and plan["new_drops"] == [UPLOADED], plan
    assert ingest[0]["states"]["publish"] == "success"

    assert len(train) == 1 and train[0]["run_type"] == "asset_triggered" and train[0]["state"] == "success", (
        train
    )
    decision = train[0]["plan_xcom"]
    newest = manifests(standalone.data)[-1]
    assert (
        decision["manifest_version"] == newest["version"] > 10
        and UPLOADED in newest["drops"] == decision["drops"]
    )
    assert decision["policy"] == {
        "policy": "min_new",
        "min_new_images": MIN_NEW_IMAGES,
        "min_new_melanomas": 0,
    }
    assert decision["last_model"]["manifest_version"] == 10 and not decision["proceed"]
    assert "12 new images" in decision["reason"] and "not reached" in decision["reason"], decision["reason"]
    assert train[0]["states"]["should_train"] == "success"
    assert {train[0]["states"][t] for t in ("train", "evaluate", "gradcam", "report")} == {"skipped"}
    assert not (standalone.data / "runs" / decision["run_key"]).exists()  # a skipped training writes nothing
