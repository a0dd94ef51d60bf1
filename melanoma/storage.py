"""One object-storage interface for a local folder and S3 (MinIO, AWS, moto).

Every runtime (Airflow tasks, Spark executors, the training CLI) reaches data through
:func:`open_storage`, so the same code runs against the embedded local default and a real
bucket. Keys are always ``/``-separated and relative to the storage root.

S3 settings come from the environment (or an Airflow connection turned into environment
variables by the DAG), never from code:

- ``MELANOMA_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``): e.g. ``http://minio:9000``;
  unset means AWS itself.
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION``: the usual boto3 chain.
- ``MELANOMA_S3_CONNECT_TIMEOUT_S`` (5), ``MELANOMA_S3_READ_TIMEOUT_S`` (20),
  ``MELANOMA_S3_MAX_ATTEMPTS`` (3, first try included): a store that stops answering fails a
  call after at most ``attempts x (connect + read)`` seconds plus backoff (about 80 s by
  default, not botocore's 5 x 60 s), with :class:`StorageUnavailable`.

Errors: :class:`ObjectRefused` is about one object and is permanent (a key that cannot be
addressed, a symlink leaving a local root): callers quarantine that input.
:class:`StorageUnavailable` is about the store (no answer, timeouts): callers let it fail the
task, whose retry redoes the work. A local root never reads or writes outside itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report as-is."""


class ObjectRefused(StorageError):
    """This one object cannot be used, whatever the retry: a property of its name or link, not of the store."""


class StorageUnavailable(StorageError):
    """The store did not answer (timeouts, refused connections): transient, the task must fail and retry."""


def is_valid_key(key: str) -> bool:
    """True for keys that address an object inside the root: no ``..``/``.``/empty segment, no ``\\``, not absolute."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return False
    parts = key.split("/")
    return not (any(part in ("", ".", "..") for part in parts[:-1]) or parts[-1] in ("", ".", ".."))


def _check_key(key: str) -> str:
    """Refuse keys that could escape the storage root (``..``, absolute paths)."""
    if not is_valid_key(key):
        raise ObjectRefused(f"invalid storage key {key!r}")
    return key


def join_key(*parts: str) -> str:
    """Join key fragments with ``/``, dropping empty ones: ``join_key("a/", "b")`` -> ``"a/b"``."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage(Protocol):
    """What every backend offers. Writes are atomic per object."""

    root_uri: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...
    def size(self, key: str) -> int: ...
    def list_objects(self, prefix: str = "") -> dict[str, int]: ...


@dataclass
class LocalStorage:
    """A folder on disk. Writes go to a temporary file that is renamed into place."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    @property
    def root_uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        """The file for ``key``, refused when it (or a folder on its way) links outside the root."""
        path = self.root / _check_key(key)
        # resolve() follows every symlink on the way, existing or not: what a read or write would reach.
        if not path.resolve().is_relative_to(self.root):
            raise ObjectRefused(f"{key!r} is a symlink leaving the storage root {self.root}")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {key!r} under {self.root}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key under the folder ``prefix`` (recursive), sorted."""
        return sorted(self.list_objects(prefix))

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        """key -> size of every file under the folder ``prefix`` (recursive; dot files skipped).

        Symlinked folders are not descended (they may lead anywhere); a symlinked file is
        listed with the link's own size, so a read of it meets :meth:`_path`'s check.
        """
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.is_dir() or not base.resolve().is_relative_to(self.root):
            return {}
        objects = {}
        for folder, _, names in os.walk(base, followlinks=False):
            for name in names:
                path = Path(folder, name)
                if name.startswith(".") or not (path.is_file() or path.is_symlink()):
                    continue
                objects[path.relative_to(self.root).as_posix()] = path.lstat().st_size
        return objects

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def local_path(self, key: str) -> Path:
        """The file behind ``key`` (local storage only: lets OpenCV or Keras read in place)."""
        return self._path(key)


@dataclass
class S3Storage:
    """``s3://bucket/prefix`` through boto3; each put is atomic on S3, MinIO and moto."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        self.prefix = self.prefix.strip("/")
        self._client = None

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def client(self):
        # Created lazily so a Storage can be pickled to Spark executors and each process
        # builds its own boto3 client (clients are not fork/pickle safe).
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, config=Config(**s3_client_settings())
            )
        return self._client

    @contextlib.contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """Turn "the store did not answer" (after botocore's bounded retries) into StorageUnavailable."""
        # Lazy, like the client: local-folder callers never load botocore.
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        unanswered = (
            ConnectTimeoutError,
            ReadTimeoutError,
            EndpointConnectionError,
            ConnectionClosedError,
            IncompleteReadError,
            ResponseStreamingError,
        )
        try:
            yield
        except unanswered as error:
            raise StorageUnavailable(
                f"object store {self.endpoint_url or 'AWS S3'} did not answer {what} in {self.root_uri} "
                f"({type(error).__name__}: {error}); failing so that the task's retry resumes"
            ) from error

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def _full(self, key: str) -> str:
        return join_key(self.prefix, _check_key(key))

    def read_bytes(self, key: str) -> bytes:
        full = self._full(key)
        try:
            with self._answering(f"GET {key!r}"):
                return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no object {key!r} in {self.root_uri}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with self._answering(f"PUT {key!r}"):
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError  # lazy: see client

        full = self._full(key)
        try:
            with self._answering(f"HEAD {key!r}"):
                self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, key: str) -> int:
        full = self._full(key)
        with self._answering(f"HEAD {key!r}"):
            return int(self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def list_keys(self, prefix: str = "") -> list[str]:
        return sorted(self.list_objects(prefix))

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        """key -> size under the folder ``prefix``. Keys come back as the store holds them, odd ones included."""
        # ``prefix`` names a folder on both backends: "raw/d1" must not match "raw/d10/...".
        folder = join_key(self.prefix, prefix)
        full_prefix = folder + "/" if folder else ""
        objects: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        with self._answering(f"LIST {prefix!r}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    objects[key[len(self.prefix) + 1 :] if self.prefix else key] = int(item.get("Size", 0))
        return objects

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._answering(f"DELETE {key!r}"):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"


def _env_number(name: str, default: float) -> float:
    """A positive number from the environment; a bad value is an error, not a silent default."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise StorageError(f"{name}={text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise StorageError(f"{name}={text!r} must be a positive number")
    return value


def s3_client_settings() -> dict:
    """botocore ``Config`` arguments: bounded timeouts and attempts (see the module docstring)."""
    return {
        "connect_timeout": _env_number("MELANOMA_S3_CONNECT_TIMEOUT_S", 5),
        "read_timeout": _env_number("MELANOMA_S3_READ_TIMEOUT_S", 20),
        "retries": {
            "total_max_attempts": int(_env_number("MELANOMA_S3_MAX_ATTEMPTS", 3)),
            "mode": "standard",
        },
    }


def s3_endpoint_from_env() -> str | None:
    return os.environ.get("MELANOMA_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def open_storage(uri: str | os.PathLike) -> LocalStorage | S3Storage:
    """Open ``s3://bucket/prefix``, ``file:///path`` or a plain folder path."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URI without a bucket: {text!r}")
        return S3Storage(parsed.netloc, parsed.path.lstrip("/"), s3_endpoint_from_env())
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(
            f"unsupported storage URI scheme {parsed.scheme!r} in {text!r} (use s3:// or a folder)"
        )
    return LocalStorage(Path(text))


def split_uri(uri: str) -> tuple[LocalStorage | S3Storage, str]:
    """Split an object URI into (storage of its parent folder, object name).

    ``s3://b/runs/x/model.keras`` -> (storage at ``s3://b/runs/x``, ``"model.keras"``).
    """
    text = str(uri).rstrip("/")
    head, _, name = text.rpartition("/")
    if not name:
        raise StorageError(f"URI names no object: {uri!r}")
    return open_storage(head or "."), name


def iter_chunks(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
