"""End to end over several DAG runs: drops by date, reruns, short-circuits, "as of" training, backfill.

Real ``airflow dags test`` runs (SQLite, Spark ``local[2]``, the local training runner, the
real EfficientNet-Lite0 weights) on two small SYNTHETIC drops dated 2026-01-01 and
2026-01-02, with Params that keep a run short. One sequential history (run 1 on 01-01, run 2
on 01-02) is shared by the tests; each other run gets its own Airflow home or adds a run to
that history. The last test runs a real scheduler (``airflow standalone``) and
``airflow backfill create`` over both dates.

``airflow dags test`` always creates a *manual* run (and replaces an existing run of the
same logical date), so the sequential history names each run's drop explicitly or lets the
manual rule ("every drop not processed yet") pick it; the data-interval rule of scheduled
and backfill runs is exercised by the backfill test (and unit-tested in tests/test_dag.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melanoma.synthetic import write_drop
from pipeline.demo import airflow_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "melanoma_pipeline"
D1, D2 = "syn-2026-01-01", "syn-2026-01-02"
SHORT = {"recipe": "quick", "epochs": 2, "n_boot": 100, "max_train_images": 200}
AFTER_GATE = ["preprocess", "augment", "train", "evaluate", "gradcam", "report"]
RUN_TIMEOUT_S = float(os.environ.get("MELANOMA_RUN_TIMEOUT", "900"))
BACKFILL_TIMEOUT_S = float(os.environ.get("MELANOMA_BACKFILL_TIMEOUT", "900"))


def airflow_binary() -> str:
    for candidate in (Path(sys.executable).parent / "airflow", ROOT / ".venv" / "bin" / "airflow"):
        if candidate.exists():
            return str(candidate)
    pytest.fail("no airflow executable beside this Python: run 'make venv'")


def snapshot(root: Path) -> dict[str, str]:
    """Every object under ``root`` (as the storage layer lists them: no dot files) -> sha256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def manifests(data: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((data / "processed").glob("manifest-*.json"))]


class Home:
    """One embedded Airflow (its own SQLite DB) and one data root, over a shared raw root."""

    def __init__(self, root: Path, raw: Path, extra: dict[str, str] | None = None) -> None:
        self.root, self.airflow_home, self.data = root, root / "airflow", root / "data"
        self.env = airflow_env(self.airflow_home, str(self.data), str(raw), extra)
        self.log = root / "airflow.log"
        self._migrated = False

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [airflow_binary(), *args],
            env=self.env,
            cwd=ROOT,
            text=True,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with open(self.log, "a") as log:
            log.write(f"\n===== airflow {' '.join(args)} -> {result.returncode}\n{result.stdout}")
        return result

    def dags_test(self, logical_date: str, conf: dict) -> dict:
        if not self._migrated:
            migrate = self.airflow("db", "migrate")
            assert migrate.returncode == 0, migrate.stdout[-3000:]
            self._migrated = True
        started = time.monotonic()
        result = self.airflow(
            "dags", "test", DAG_ID, logical_date, "-c", json.dumps(conf), timeout=RUN_TIMEOUT_S
        )
        run = self.last_run()
        print(
            f"dags test {logical_date} {conf}: exit {result.returncode} in {time.monotonic() - started:.0f} s; {run['states']}"
        )
        assert result.returncode == 0, f"see {self.log}\n{result.stdout[-6000:]}"
        return run

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.airflow_home / "airflow.db")

    def run_info(self, run_id: str) -> dict:
        with self.db() as db:
            states = dict(
                db.execute(
                    "select task_id, state from task_instance where dag_id=? and run_id=?", (DAG_ID, run_id)
                )
            )
            xcom = dict(
                db.execute(
                    "select task_id, value from xcom where dag_id=? and run_id=? and key='return_value'",
                    (DAG_ID, run_id),
                )
            )
            run_type, state = db.execute(
                "select run_type, state from dag_run where dag_id=? and run_id=?", (DAG_ID, run_id)
            ).fetchone()
        plan = json.loads(xcom["plan"]) if "plan" in xcom else None
        return {"run_id": run_id, "run_type": run_type, "state": state, "states": states, "plan": plan}

    def last_run(self) -> dict:
        with self.db() as db:
            (run_id,) = db.execute(
                "select run_id from dag_run where dag_id=? order by id desc limit 1", (DAG_ID,)
            ).fetchone()
        return self.run_info(run_id)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    """Two drops, dated by their ids, with image ids of their own."""
    raw = tmp_path_factory.mktemp("raw")
    write_drop(raw, n_images=60, seed=1, drop_id=D1, id_prefix="SYNA")
    write_drop(raw, n_images=60, seed=2, drop_id=D2, id_prefix="SYNB")
    return raw


@pytest.fixture(scope="module")
def history(tmp_path_factory, raw_root) -> dict:
    """Run 1 (2026-01-01) takes drop 1, named; run 2 (2026-01-02) takes what is new, i.e. drop 2."""
    home = Home(tmp_path_factory.mktemp("sequential"), raw_root)
    run1 = home.dags_test("2026-01-01T00:00:00+00:00", {**SHORT, "drops": [D1]})
    after_run1 = manifests(home.data)
    run2 = home.dags_test("2026-01-02T00:00:00+00:00", SHORT)
    return {"home": home, "run1": run1, "run2": run2, "after_run1": after_run1}


def test_each_run_processes_its_drop_and_trains_on_the_data_as_of_its_date(history):
    home, run1, run2 = history["home"], history["run1"], history["run2"]
    for run in (run1, run2):
        assert run["state"] == "success" and set(run["states"].values()) == {"success"}, run["states"]
    assert run1["plan"]["new_drops"] == [D1] and run1["plan"]["as_of"] == "2026-01-01"
    # The manual rule: every drop is selected, only the one not processed yet is new.
    assert (
        run2["plan"]["drops"] == [D1, D2]
        and run2["plan"]["new_drops"] == [D2]
        and run2["plan"]["as_of"] == "2026-01-02"
    )
    assert (
        run1["plan"]["run_key"] == "manual__20260101T000000Z"
        and run2["plan"]["run_key"] == "manual__20260102T000000Z"
    )

    # preprocess then augment per run, each manifest stamped with its run's date, in date order.
    history_ = manifests(home.data)
    assert [(m["version"], m["logical_date"], m["drops"]) for m in history_] == [
        (1, "2026-01-01", [D1]),
        (2, "2026-01-01", [D1]),
        (3, "2026-01-02", [D1, D2]),
        (4, "2026-01-02", [D1, D2]),
    ]
    assert history_[:2] == history["after_run1"], "run 2 rewrote run 1's manifests"
    assert (
        history_[1]["augmented_counts"]["train"]["1"] > 0
        and history_[3]["augmented_counts"]["train"]["1"] > history_[1]["augmented_counts"]["train"]["1"]
    )

    # Each run's model and metrics come from the manifest as of its logical date.
    for run, version in ((run1, 2), (run2, 4)):
        run_root = home.data / "runs" / run["plan"]["run_key"]
        assert json.loads((run_root / "model" / "provenance.json").read_text())["manifest_version"] == version
        assert json.loads((run_root / "eval" / "metrics.json").read_text())["manifest_version"] == version
        assert json.loads((run_root / "plan.json").read_text())["new_drops"] == run["plan"]["new_drops"]
        assert (run_root / "report.html").stat().st_size > 1000


def test_a_rerun_of_a_finished_run_changes_no_output(history):
    home = history["home"]
    before = snapshot(home.data)
    rerun = home.dags_test("2026-01-02T00:00:00+00:00", SHORT)
    assert rerun["run_id"] != history["run2"]["run_id"]  # dags test replaced the run of that date
    assert rerun["plan"]["run_key"] == history["run2"]["plan"]["run_key"]
    assert rerun["plan"]["finished"] and not rerun["plan"]["proceed"]
    assert rerun["states"]["plan"] == "success" and rerun["states"]["has_new_drops"] == "success"
    assert {t: rerun["states"][t] for t in AFTER_GATE} == {t: "skipped" for t in AFTER_GATE}
    assert snapshot(home.data) == before  # same objects, same bytes, no new manifest


def test_a_run_without_a_new_drop_skips_spark(history):
    home = history["home"]
    before = snapshot(home.data)
    run = home.dags_test("2026-01-03T00:00:00+00:00", SHORT)
    assert run["plan"]["drops"] == [D1, D2] and run["plan"]["new_drops"] == [] and not run["plan"]["proceed"]
    assert {t: run["states"][t] for t in AFTER_GATE} == {t: "skipped" for t in AFTER_GATE}
    assert snapshot(home.data) == before  # not even a runs/ folder for it
    assert not (home.data / "runs" / run["plan"]["run_key"]).exists()


def test_an_earlier_run_rerun_after_later_data_trains_on_the_data_as_of_its_date(history):
    """Run 1 is rerun as if its training had failed, after run 2 added drop 2: it must not see drop 2.

    Its drop stays pinned to it (runs/<key>/plan.json), so the rerun goes past the
    short-circuit although drop 1 is no longer new; preprocess and augment find nothing to
    do; train, evaluate and gradcam read manifest v2 (dated 2026-01-01), not v4.
    """
    home, run1 = history["home"], history["run1"]
    run_root = home.data / "runs" / run1["plan"]["run_key"]
    first_provenance = json.loads((run_root / "model" / "provenance.json").read_text())
    first_decision = json.loads((run_root / "promotion.json").read_text())
    for name in ("report.html", "promotion.json", "model", "eval", "gradcam"):
        target = run_root / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    processed_before = snapshot(home.data / "processed")
    rerun = home.dags_test("2026-01-01T00:00:00+00:00", {**SHORT, "drops": [D1]})
    assert (
        rerun["plan"]["new_drops"] == [D1]
        and rerun["plan"]["pending_drops"] == []
        and rerun["plan"]["proceed"]
    )
    assert set(rerun["states"].values()) == {"success"}, rerun["states"]
    assert snapshot(home.data / "processed") == processed_before, "the rerun changed processed data"
    provenance = json.loads((run_root / "model" / "provenance.json").read_text())
    assert provenance["manifest_version"] == 2, provenance
    assert provenance["train_images"] == first_provenance["train_images"]
    assert json.loads((run_root / "eval" / "metrics.json").read_text())["manifest_version"] == 2
    predictions = (run_root / "eval" / "predictions.csv").read_text()
    assert "SYNA_" in predictions and "SYNB_" not in predictions, "the rerun scored drop 2's images"
    # Retrained in place: another model file, so a registry version of its own (same MLflow run).
    decision = json.loads((run_root / "promotion.json").read_text())
    assert decision["version"] > first_decision["version"]
    assert decision["mlflow_run_id"] == first_decision["mlflow_run_id"]


# --- backfill under a real scheduler ----------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group the scheduler started in, then SIGKILL whatever is left of it."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give the rest of its group the same grace, then move on to SIGKILL.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def task_log_tails(airflow_home: Path, failed: list[tuple], chars: int = 3000) -> str:
    """The end of each failed task's newest log file (Airflow's default log layout)."""
    tails = []
    for run_id, task_id, *_ in failed:
        logs = sorted(
            (airflow_home / "logs").glob(f"dag_id={DAG_ID}/run_id={run_id}/task_id={task_id}/**/*.log"),
            key=lambda p: p.stat().st_mtime,
        )
        tails.append(
            f"--- {run_id} {task_id}: "
            + (logs[-1].read_text(errors="replace")[-chars:] if logs else "no log file")
        )
    return "\n".join(tails)


# The backfill under a real scheduler is tested on the DAG that now owns ingestion,
# melanoma_ingest (tests/test_data_aware.py: 5 drops in date order, byte-identical to sequential
# runs, one training); the helpers above are shared with it.
