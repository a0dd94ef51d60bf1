"""Shared fixtures: the real data folder (with CI's no-skip rule) and a real S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
HAM10000 = SHARED_DATA / "ham10000"
ISIC_SAMPLE = SHARED_DATA / "isic_uda1_sample"
PH2 = SHARED_DATA / "ph2"


def require_data(path: Path) -> Path:
    """Skip when the real data is absent, except under CI=true, where its absence is a failure."""
    if path.exists():
        return path
    message = f"real data not found at {path} (expected ../shared/data beside the project, see README)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def ham10000_dir() -> Path:
    return require_data(HAM10000)


@pytest.fixture(scope="session")
def isic_sample_dir() -> Path:
    return require_data(ISIC_SAMPLE)


@pytest.fixture(scope="session")
def ph2_dir() -> Path:
    return require_data(PH2)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint); yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (in this process and in subprocesses) at the moto server; returns the env."""
    env = {
        "MELANOMA_S3_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_bucket(s3_env, request):
    """A fresh bucket named after the test."""
    import boto3

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3", endpoint_url=s3_env["MELANOMA_S3_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name
