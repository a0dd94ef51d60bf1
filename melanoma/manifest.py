"""Manifests: the only entry point readers trust into ``processed/``.

A manifest is written last, after every shard it lists, so a crash mid-run leaves the
previous manifest as the truth and at worst some unreferenced shard objects. Manifests are
numbered (``processed/manifest-000001.json``, ...); each one is cumulative: it lists every
shard of every drop processed so far, so the newest manifest alone describes the data set.

Schema (keys of the JSON object):

- ``version``: int, the number in the object name.
- ``logical_date``: ISO date of the Airflow run that committed it (or ``None``).
- ``drops``: sorted list of drop ids covered.
- ``preprocessing``: size, interpolation, decode path, and the code version of the step.
- ``split``: how lesions are assigned to train/val/test.
- ``shards``: list of ``{key, drop, split, kind, count, sha256, labels: {"0": n, "1": m}}``.
- ``counts``: ``{split: {"0": n, "1": m}}`` over original images; ``augmented_counts`` likewise.
- ``accounting``: ``{drop_id: {inputs, written, quarantined, quarantine_key}}`` with
  ``inputs == written + quarantined`` for every drop.
- ``augmentation``: ``None`` or the parameters and per-drop status of the augment job.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator

import numpy as np

from melanoma.records import Shard, decode_shard, sha256_hex
from melanoma.storage import Storage

PROCESSED_PREFIX = "processed"
_MANIFEST_RE = re.compile(r"^processed/manifest-(\d{6})\.json$")


class ManifestError(RuntimeError):
    pass


def manifest_key(version: int) -> str:
    return f"{PROCESSED_PREFIX}/manifest-{version:06d}.json"


def manifest_versions(storage: Storage) -> list[int]:
    versions = []
    for key in storage.list_keys(PROCESSED_PREFIX):
        match = _MANIFEST_RE.match(key)
        if match:
            versions.append(int(match.group(1)))
    return sorted(versions)


def load_manifest(storage: Storage, version: int) -> dict:
    return json.loads(storage.read_bytes(manifest_key(version)))


def latest_manifest(storage: Storage, *, as_of: str | None = None) -> dict | None:
    """The newest manifest, or the newest committed by a run dated ``<= as_of`` (ISO date).

    ``as_of`` lets a backfilled run train on exactly the data that existed at its logical
    date, even when later drops have been processed since.
    """
    for version in reversed(manifest_versions(storage)):
        manifest = load_manifest(storage, version)
        if as_of is None or (manifest.get("logical_date") or "") <= as_of:
            return manifest
    return None


def require_manifest(storage: Storage, *, as_of: str | None = None, version: int | None = None) -> dict:
    """The manifest a step reads: exactly ``version`` when given (a run pinned to one data set), else as of ``as_of``."""
    if version is not None:
        if not storage.exists(manifest_key(version)):
            raise ManifestError(f"manifest version {version} not found under {storage.uri(PROCESSED_PREFIX)}")
        return load_manifest(storage, version)
    manifest = latest_manifest(storage, as_of=as_of)
    if manifest is None:
        where = storage.uri(PROCESSED_PREFIX)
        raise ManifestError(f"no manifest under {where}: run the preprocess step first")
    return manifest


def encode_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def commit_manifest(storage: Storage, manifest: dict) -> str:
    """Write ``manifest`` as the next version; returns its key. Call only after its shards exist."""
    versions = manifest_versions(storage)
    manifest = dict(manifest, version=(versions[-1] + 1) if versions else 1)
    key = manifest_key(manifest["version"])
    storage.write_bytes(key, encode_manifest(manifest))
    return key


def content_without_version(manifest: dict) -> dict:
    """The parts of a manifest that describe data (for comparing two histories)."""
    return {k: v for k, v in manifest.items() if k not in ("version", "logical_date")}


def select_shards(manifest: dict, splits: Iterable[str], kinds: Iterable[str] = ("original",)) -> list[dict]:
    splits, kinds = set(splits), set(kinds)
    return [s for s in manifest["shards"] if s["split"] in splits and s["kind"] in kinds]


def read_verified_shard(storage: Storage, shard_entry: dict) -> Shard:
    """Read a shard and check it against the manifest's checksum and count."""
    data = storage.read_bytes(shard_entry["key"])
    if sha256_hex(data) != shard_entry["sha256"]:
        raise ManifestError(
            f"checksum mismatch for {shard_entry['key']}: the shard changed after its manifest"
        )
    shard = decode_shard(data)
    if len(shard) != shard_entry["count"]:
        raise ManifestError(
            f"{shard_entry['key']} holds {len(shard)} records, manifest says {shard_entry['count']}"
        )
    return shard


def iter_shards(
    storage: Storage, manifest: dict, splits: Iterable[str], kinds: Iterable[str] = ("original",)
) -> Iterator[Shard]:
    for entry in select_shards(manifest, splits, kinds):
        yield read_verified_shard(storage, entry)


def load_split(
    storage: Storage, manifest: dict, splits: Iterable[str], kinds: Iterable[str] = ("original",)
) -> Shard:
    """All records of the given splits in one :class:`Shard` (images (N,224,224,3) in memory)."""
    shards = list(iter_shards(storage, manifest, splits, kinds))
    if not shards:
        return Shard(np.zeros((0, 224, 224, 3), np.uint8), np.zeros((0, 224, 224), np.uint8), [])
    return Shard(
        images=np.concatenate([s.images for s in shards]),
        masks=np.concatenate([s.masks for s in shards]),
        records=[r for s in shards for r in s.records],
    )
