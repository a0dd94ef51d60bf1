"""The "Melanoma report" extra link: loaded by Airflow's plugin manager, reading the report XCom."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("airflow")

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def load_plugin_module():
    spec = importlib.util.spec_from_file_location("melanoma_report_link", PLUGINS / "melanoma_report_link.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plugin = load_plugin_module()


@pytest.mark.parametrize(
    ("stored", "href"),
    [
        ('"/data/runs/manual__1/report.html"', "file:///data/runs/manual__1/report.html"),
        ('"file:///data/runs/run_1/report.html"', "file:///data/runs/run_1/report.html"),
        (
            "/data/runs/scheduled__20260301T000000Z/report.html",
            "file:///data/runs/scheduled__20260301T000000Z/report.html",
        ),
        # Issue #20 (6): no open redirect. Any http(s) URL used to pass through.
        ('"https://reports.example.org/run/1/report.html"', ""),
        ("http://minio:9000/runs/1/report.html", ""),
        # Only the report of a run under the data root: not another file, folder or root.
        ('"/data/runs/1/metrics.json"', ""),
        ('"/data/runs/1/sub/report.html"', ""),
        ('"/data/runs/../../etc/report.html"', ""),
        ('"/data/runs/./1/report.html"', ""),
        ('"/elsewhere/runs/1/report.html"', ""),
        ('"/data2/runs/1/report.html"', ""),
        ('"javascript:alert(document.cookie)"', ""),
        ('"JaVaScRiPt:alert(1)"', ""),
        ('"data:text/html,<script>alert(1)</script>"', ""),
        ('"s3://bucket/runs/1/report.html"', ""),  # a local data root: no S3 link at all
        ('"relative/report.html"', ""),
        ('{"report_uri": "/data/report.html"}', ""),
        ("", ""),
        (None, ""),
    ],
)
def test_report_href(stored, href):
    assert plugin.report_href(stored, "/data") == href


def test_report_href_reads_the_data_root_from_the_environment(monkeypatch):
    monkeypatch.setenv("MELANOMA_DATA_ROOT", "/srv/melanoma/")
    assert (
        plugin.report_href('"/srv/melanoma/runs/k/report.html"') == "file:///srv/melanoma/runs/k/report.html"
    )
    assert plugin.report_href('"/data/runs/k/report.html"') == ""


@pytest.mark.parametrize(
    "stored",
    [
        "s3://other-bucket/data/runs/k/report.html",  # another bucket
        "s3://lake/secrets/key.pem",  # any object of the bucket
        "s3://lake/data/runs/k/model/model.keras",  # another object of a run
        "s3://lake/data/runs/../secrets/report.html",
        "s3://lake/data//runs/k/report.html",
        "s3://lake/data-other/runs/k/report.html",
    ],
)
def test_no_presigning_outside_the_data_roots_run_reports(stored, monkeypatch):
    """Issue #20 (6): any s3://bucket/key used to be presigned with the API server's credentials."""
    signed = []
    monkeypatch.setattr(plugin, "presigned_s3_url", lambda uri: signed.append(uri) or "https://signed")
    assert plugin.report_href(json.dumps(stored), "s3://lake/data") == ""
    assert signed == []
    assert plugin.report_href('"s3://lake/data/runs/k/report.html"', "s3://lake/data/") == "https://signed"
    assert signed == ["s3://lake/data/runs/k/report.html"]


def test_get_link_reads_the_report_task_of_the_same_run(monkeypatch):
    from airflow.models.taskinstancekey import TaskInstanceKey

    calls = []

    def fake_read(dag_id, run_id):
        calls.append((dag_id, run_id))
        return json.dumps("/data/runs/7/report.html")

    monkeypatch.setenv("MELANOMA_DATA_ROOT", "/data")
    monkeypatch.setattr(plugin, "read_report_value", fake_read)
    link = plugin.MelanomaReportLink()
    key = TaskInstanceKey(dag_id="melanoma_pipeline", task_id="train", run_id="scheduled__7", try_number=2)
    assert link.name == "Melanoma report"
    assert link.get_link(None, ti_key=key) == "file:///data/runs/7/report.html"
    assert calls == [("melanoma_pipeline", "scheduled__7")]


def test_plugin_registers_a_global_link():
    from airflow.plugins_manager import is_valid_plugin

    assert is_valid_plugin(plugin.MelanomaReportPlugin)
    links = plugin.MelanomaReportPlugin.global_operator_extra_links
    assert [type(link).__name__ for link in links] == ["MelanomaReportLink"]


# Runs in a fresh interpreter with its own AIRFLOW_HOME and SQLite metadata DB: Airflow reads
# its configuration once at import, and the check that TensorFlow stays out needs a clean
# sys.modules.
_REAL_DB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from airflow import plugins_manager, settings
    from airflow._shared.timezones import timezone
    from airflow.models import import_all_models
    from airflow.models.base import Base
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import text

    import_all_models()
    Base.metadata.create_all(settings.engine)
    with create_session() as session:
        for day, (dag_id, run_id) in enumerate([("melanoma_pipeline", "manual__1"), ("melanoma_pipeline", "manual__2"),
                                                ("other_dag", "manual__1")]):
            when = timezone.datetime(2026, 1, 1 + day)
            session.add(DagRun(dag_id=dag_id, run_id=run_id, run_type="manual", run_after=when, logical_date=when))
    with create_session() as session:
        # The XCom row's foreign key targets a task_instance row, which would need a serialized
        # DAG version; this test is about the link's query, so that one constraint is lifted.
        session.execute(text("PRAGMA foreign_keys=OFF"))
        # Stored as the execution API stores a task's push: JSON text, not re-serialised.
        XComModel.set("report_url", json.dumps("/data/runs/1/report.html"), dag_id="melanoma_pipeline",
                      task_id="report", run_id="manual__1", serialize=False, session=session)
        XComModel.set("report_url", json.dumps("https://elsewhere.example/r.html"), dag_id="other_dag",
                      task_id="report", run_id="manual__1", serialize=False, session=session)

    links = plugins_manager.get_global_operator_extra_links()
    [link] = [l for l in links if l.name == "Melanoma report"]
    def href(dag_id, task_id, run_id):
        return link.get_link(None, ti_key=TaskInstanceKey(dag_id, task_id, run_id))
    print(json.dumps({
        "train_run1": href("melanoma_pipeline", "train", "manual__1"),
        "report_run1": href("melanoma_pipeline", "report", "manual__1"),
        "train_run2": href("melanoma_pipeline", "train", "manual__2"),
        "tensorflow_loaded": any(m in sys.modules for m in ("tensorflow", "keras")),
    }))
    """
)


def test_plugin_loaded_by_airflow_reads_real_xcom_rows(tmp_path):
    env = dict(
        os.environ,
        AIRFLOW_HOME=str(tmp_path),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'airflow.db'}",
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PLUGINS),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        MELANOMA_DATA_ROOT="/data",
    )
    done = subprocess.run(
        [sys.executable, "-c", _REAL_DB_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "train_run1": "file:///data/runs/1/report.html",
        "report_run1": "file:///data/runs/1/report.html",
        "train_run2": "",  # this run has no report (yet): a disabled button
        "tensorflow_loaded": False,
    }
