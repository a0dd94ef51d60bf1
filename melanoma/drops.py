"""Drops under the raw root, ``<raw_root>/<drop_id>/``: which folders are drops, their dates,
and the files that arrive after a drop was ingested.

A drop is sealed when it is ingested: objects that arrive, change or go afterwards are never
read into the data set, and :func:`report_late_files` reports them on every later run.
Scanning the content of one drop is :mod:`melanoma.drop_scan`. Imported when Airflow parses
the DAG (:data:`DROP_ID_PATTERN`): standard library and :mod:`melanoma.storage` only.
"""

from __future__ import annotations

import datetime
import json
import logging
import re

from melanoma.storage import Storage

__all__ = [
    "DROP_ID_PATTERN",
    "drop_date",
    "is_valid_drop_id",
    "late_files",
    "late_report_key",
    "list_drops",
    "listing_key",
    "report_late_files",
]

log = logging.getLogger(__name__)

#: A drop id: a folder name, never a path nor a list (no "/", ",", "..", no leading dot or "_").
#: The DAG's Param schema uses the same pattern.
DROP_ID_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"
_DROP_ID = re.compile(DROP_ID_PATTERN)


# ---------------------------------------------------------------------------------------
# Drops under the raw root


def is_valid_drop_id(drop_id: str) -> bool:
    return bool(_DROP_ID.match(drop_id))


def list_drops(raw: Storage) -> list[str]:
    """First-level folders under the raw root whose name is a valid drop id, sorted.

    Folders starting with ``.`` or ``_`` are skipped quietly: that is where uploads in
    progress are staged (``_tmp``, ``.staging``) before being renamed into a drop. Any other
    folder whose name is not a drop id (a ``,``, a space...) is skipped with a warning: it
    could not be named in a run's ``drops`` nor passed to Spark safely.
    """
    drops = {key.split("/", 1)[0] for key in raw.list_keys("") if "/" in key}
    staged = {d for d in drops if d.startswith((".", "_"))}
    refused = sorted(d for d in drops - staged if not is_valid_drop_id(d))
    if refused:
        log.warning(
            "folders under %s that are not valid drop ids (%s) are not drops, rename them: %s",
            raw.root_uri,
            DROP_ID_PATTERN,
            refused,
        )
    return sorted(d for d in drops - staged if is_valid_drop_id(d))


def unscored_drops(inbox: Storage, scores: Storage) -> list[str]:
    """Drops of new images under an inbox root (as :func:`list_drops`) without ``<drop>/predictions.csv``
    under the scores root: what the scoring DAG has still to score."""
    return [d for d in list_drops(inbox) if not scores.exists(f"{d}/predictions.csv")]


# ---------------------------------------------------------------------------------------
# Late files: a drop is sealed when it is ingested


def listing_key(drop_id: str) -> str:
    """The drop's objects (key -> size) as scanned at ingestion: what later files are compared with."""
    return f"processed/listing/{drop_id}.json"


def late_report_key(drop_id: str) -> str:
    return f"processed/late-{drop_id}.json"


def late_files(
    raw: Storage, out: Storage, manifest: dict | None, drop_ids: list[str] | None = None
) -> dict[str, dict[str, list[str]]]:
    """Ingested drops whose objects differ from their listing at ingestion: drop -> {added, changed, removed}.

    The contract: a drop is ingested once, as it is when its run scans it. Objects that
    arrive (or change, or go) afterwards are never read into the data set; they are found
    here, on every later run, so they cannot be missed. One listing of the raw root.
    """
    done = set((manifest or {}).get("drops", []))
    wanted = sorted(done if not drop_ids else done & set(drop_ids))
    if not wanted:
        return {}
    now: dict[str, dict[str, int]] = {}
    for key, size in raw.list_objects("").items():
        now.setdefault(key.split("/", 1)[0], {})[key] = size
    found = {}
    for drop_id in wanted:
        if not out.exists(listing_key(drop_id)):
            continue  # ingested before listings were kept: nothing to compare with
        before, current = json.loads(out.read_bytes(listing_key(drop_id))), now.get(drop_id, {})
        diff = {
            "added": sorted(set(current) - set(before)),
            "changed": sorted(k for k in set(current) & set(before) if current[k] != before[k]),
            "removed": sorted(set(before) - set(current)),
        }
        if any(diff.values()):
            found[drop_id] = diff
    return found


def report_late_files(
    raw: Storage, out: Storage, manifest: dict | None, drop_ids: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """:func:`late_files`, logged as a warning and written to ``processed/late-<drop>.json``; returns counts per drop."""
    found = late_files(raw, out, manifest, drop_ids)
    for drop_id, diff in found.items():
        counts = {k: len(v) for k, v in diff.items()}
        log.warning(
            "drop %s changed after it was ingested (%s): these objects are NOT in the data set; "
            "put new files in a new drop (e.g. %s-2) and never change an ingested drop. Listed in %s",
            drop_id,
            ", ".join(f"{n} {k}" for k, n in counts.items() if n),
            drop_id,
            out.uri(late_report_key(drop_id)),
        )
        report = {
            "drop_id": drop_id,
            "manifest_version": (manifest or {}).get("version"),
            **diff,
            "what_to_do": "ingested drops are sealed: bring late files as a new drop",
        }
        out.write_bytes(
            late_report_key(drop_id), (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
        )
    return {d: {k: len(v) for k, v in diff.items()} for d, diff in found.items()}


_DATE_PATTERNS = (
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"),
)


def drop_date(drop_id: str) -> datetime.date | None:
    """The first valid ``YYYY-MM-DD`` or ``YYYYMMDD`` date anywhere in ``drop_id``, else None."""
    found = []
    for pattern in _DATE_PATTERNS:
        for match in pattern.finditer(drop_id):
            try:
                found.append((match.start(), datetime.date(*map(int, match.groups()))))
            except ValueError:
                continue  # 20241399 is digits, not a date
    return min(found)[1] if found else None
