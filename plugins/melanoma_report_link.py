"""Airflow plugin: a "Melanoma report" button on every task of a run, opening that run's report.

The ``report`` task pushes XCom key ``report_url`` (an http(s) URL, a ``file://`` URI or a
local path). In Airflow 3 a *global* operator extra link is evaluated by the API server
when the UI asks for a task instance's links: ``get_link(operator, ti_key=...)`` runs there,
with database access but without a task's execution context, so the link reads the XCom
row with :class:`~airflow.models.xcom.XComModel`, the same way Airflow's own
``XComOperatorLink`` does.

The button points at the report of the task's own DAG run, so it works from any task of
the run (and stays disabled, an empty link, until the report exists or in other DAGs).
The value comes from a task, so it is trusted only as far as it names a report where this
pipeline writes them: ``<data root>/runs/<run key>/report.html``, the data root being the
one the tasks use (Variable ``melanoma_data_root``, else env ``MELANOMA_DATA_ROOT``, else
the project's ``output/data``). Anything else (any http(s) URL, another bucket or key, a
path elsewhere, ``javascript:``) gives no link: the button must be neither an open redirect
nor a way to have the API server presign arbitrary objects.

A run whose outputs live in object storage pushes an ``s3://`` URI, which no browser opens.
The link then becomes a presigned HTTP(S) GET of that object, signed here when the button is
rendered, so it is fresh each time (a URL signed by the task would expire days later):

- endpoint: ``MELANOMA_S3_PUBLIC_ENDPOINT_URL``, the address *the browser* reaches the store
  at (for the compose stack ``http://127.0.0.1:9000``; inside it MinIO is ``http://minio:9000``,
  a name only the containers resolve, and a SigV4 signature covers the host, so a signed URL
  cannot be rewritten afterwards); else ``MELANOMA_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``
  as the storage uses them. Only an http(s) endpoint is used; with none set there is no link
  (for AWS itself set ``https://s3.<region>.amazonaws.com``).
- credentials and region: boto3's own chain (``AWS_ACCESS_KEY_ID``, ... in the API server's
  environment); without credentials there is no link, and a warning in the API server's log.
- lifetime: ``MELANOMA_REPORT_LINK_EXPIRES_S`` (default 3600 s, at most SigV4's 7 days). The
  object is served as ``text/html`` whatever content type it was stored with.

No TensorFlow or project code is imported: the API server loads this module (and boto3 only
when an ``s3://`` value is met).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)

REPORT_TASK_ID = "report"
REPORT_XCOM_KEY = "report_url"
DATA_ROOT_VARIABLE, DATA_ROOT_ENV = "melanoma_data_root", "MELANOMA_DATA_ROOT"
DEFAULT_DATA_ROOT = str(Path(__file__).resolve().parents[1] / "output" / "data")  # as pipeline.airflow_ops
REPORT_NAME = "report.html"
_RUN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
PUBLIC_ENDPOINT_ENV = "MELANOMA_S3_PUBLIC_ENDPOINT_URL"
_STORAGE_ENDPOINT_ENV = ("MELANOMA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")  # what melanoma.storage reads
EXPIRES_ENV = "MELANOMA_REPORT_LINK_EXPIRES_S"
DEFAULT_EXPIRES_S = 3600
MAX_EXPIRES_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live


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


def data_root() -> str:
    """The data root the tasks write to: Variable, else environment, else the embedded default."""
    try:
        from airflow.models.variable import Variable

        value = Variable.get(DATA_ROOT_VARIABLE, default_var=None)
    except Exception:  # noqa: BLE001 - no metadata DB reachable (tests, CLI): the environment decides
        value = None
    return str(value or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def _run_report_key(relative: str) -> bool:
    """True for exactly ``runs/<run key>/report.html`` (no other object, no ``..``)."""
    parts = relative.split("/")
    return (
        len(parts) == 3 and parts[0] == "runs" and bool(_RUN_KEY.match(parts[1])) and parts[2] == REPORT_NAME
    )


def report_href(value: Any, root: str | None = None) -> str:
    """A browser link for a stored ``report_url`` value; "" (a disabled button) if there is none.

    The value may still be JSON-encoded (values pushed by tasks are stored as JSON text). Only
    a run's report under ``root`` (default: :func:`data_root`) gives a link: a local one as a
    ``file://`` URI, one in S3 as a presigned URL. Everything else is refused and logged.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a bare, not JSON-encoded string
    if not isinstance(value, str) or not value.strip():
        return ""
    text, root = value.strip(), root or data_root()
    root = root.rstrip("/") if root.startswith("s3://") else posixpath.normpath(os.path.abspath(root))
    relative = _under(text, root)
    if relative is None or not _run_report_key(relative):
        log.warning(
            "report_url %r is not a run report under the data root %r; no link shown", text[:200], root[:200]
        )
        return ""
    if root.startswith("s3://"):
        return presigned_s3_url(text)
    return PurePosixPath(text.removeprefix("file://")).as_uri()


def _under(text: str, root: str) -> str | None:
    """``text`` relative to ``root`` when it lies under it, else None (s3 URIs or absolute local paths)."""
    if root.startswith("s3://"):
        if not text.startswith(root + "/") or any(
            part in ("", ".", "..") for part in text[len(root) + 1 :].split("/")
        ):
            return None
        return text[len(root) + 1 :]
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if not text.startswith("/") or not root.startswith("/") or posixpath.normpath(text) != text:
        return None  # relative, another scheme, or a path with "..", "." or "//" in it
    base = root if root.endswith("/") else root + "/"
    return text[len(base) :] if text.startswith(base) else None


def _endpoint() -> str | None:
    """The http(s) endpoint to sign for (see the module docstring), or None."""
    for name in (PUBLIC_ENDPOINT_ENV, *_STORAGE_ENDPOINT_ENV):
        endpoint = os.environ.get(name, "").strip()
        if endpoint:
            if urlparse(endpoint).scheme.lower() in ("http", "https"):
                return endpoint
            log.warning("%s=%r is not an http(s) URL; no link for reports on S3", name, endpoint[:200])
            return None
    return None


def _expires_s() -> int:
    try:
        seconds = int(os.environ.get(EXPIRES_ENV, DEFAULT_EXPIRES_S))
    except ValueError:
        return DEFAULT_EXPIRES_S
    return max(1, min(seconds, MAX_EXPIRES_S))


def presigned_s3_url(uri: str) -> str:
    """A presigned http(s) GET URL for ``s3://bucket/key``, or "" when none can be made."""
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    endpoint = _endpoint()
    if not bucket or not key or endpoint is None:
        log.info("report_url %r: no bucket/key or no http(s) endpoint configured; no link shown", uri[:200])
        return ""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        log.warning("boto3 is not installed where the API server runs; no link for %r", uri[:200])
        return ""
    try:
        session = boto3.session.Session()
        if session.get_credentials() is None:  # presigning would "succeed" with an unsigned URL
            log.warning("no S3 credentials in the API server's environment; no link for %r", uri[:200])
            return ""
        client = session.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
        return client.generate_presigned_url(
            "get_object",
            Params={"Bucket": bucket, "Key": key, "ResponseContentType": "text/html; charset=utf-8"},
            ExpiresIn=_expires_s(),
        )
    except (BotoCoreError, ClientError, ValueError) as error:
        log.warning("could not presign %r: %s", uri[:200], error)
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
