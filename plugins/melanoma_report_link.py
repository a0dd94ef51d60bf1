"""Airflow plugin: a "Melanoma report" button on every task of a run, opening that run's report.

The ``report`` task pushes XCom key ``report_url`` (an http(s) URL, a ``file://`` URI or a
local path). In Airflow 3 a *global* operator extra link is evaluated by the API server
when the UI asks for a task instance's links: ``get_link(operator, ti_key=...)`` runs there,
with database access but without a task's execution context, so the link reads the XCom
row with :class:`~airflow.models.xcom.XComModel`, the same way Airflow's own
``XComOperatorLink`` does.

The button points at the report of the task's own DAG run, so it works from any task of
the run (and stays disabled, an empty link, until the report exists or in other DAGs).
Only http, https and file URLs are handed to the browser: the value comes from a task, and
a ``javascript:`` URL would run in the Airflow UI's origin. An ``s3://`` URI is not
browsable, so it gives no link; push a presigned or gateway http(s) URL for object storage.

No TensorFlow or project code is imported: the API server loads this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)

REPORT_TASK_ID = "report"
REPORT_XCOM_KEY = "report_url"
_BROWSABLE_SCHEMES = ("http", "https", "file")


def read_report_value(dag_id: str, run_id: str) -> Any:
    """The raw ``report_url`` XCom value of ``report`` in one DAG run, or None (API-server side)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key=REPORT_XCOM_KEY,
                run_id=run_id,
                dag_ids=dag_id,
                task_ids=REPORT_TASK_ID,
                map_indexes=-1,
            ).with_only_columns(XComModel.value)
        ).first()
    return None if row is None else row.value


def report_href(value: Any) -> str:
    """A browser link for a stored ``report_url`` value; "" (a disabled button) if there is none.

    The value may still be JSON-encoded (values pushed by tasks are stored as JSON text).
    An absolute path becomes a ``file://`` URI; other schemes are refused.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a bare, not JSON-encoded string
    if not isinstance(value, str) or not value.strip():
        return ""
    text = value.strip()
    if text.startswith("/"):
        return PurePosixPath(text).as_uri()
    if urlparse(text).scheme.lower() in _BROWSABLE_SCHEMES:
        return text
    log.warning("report_url %r has no browsable scheme (http, https, file); no link shown", text[:200])
    return ""


class MelanomaReportLink(BaseOperatorLink):
    """Links any task instance to the HTML report of its DAG run."""

    name = "Melanoma report"

    def get_link(self, operator, *, ti_key) -> str:
        return report_href(read_report_value(ti_key.dag_id, ti_key.run_id))


class MelanomaReportPlugin(AirflowPlugin):
    name = "melanoma_report"
    # Global, not per-operator: the DAG's tasks are @task functions (one operator class shared
    # with every other DAG), and a global link is computed by the API server at view time,
    # so it appears on tasks that finished before the report existed.
    global_operator_extra_links = [MelanomaReportLink()]
