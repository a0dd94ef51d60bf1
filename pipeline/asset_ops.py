"""The ingest DAG's side of data-aware scheduling: drops named by asset events, and announcing manifests.

``melanoma_ingest`` ends with ``publish``, the one task that updates the manifest asset. It runs
after ``augment`` (or after the short-circuit, when the run brought nothing) and emits one asset
event, whose extra names the newest manifest (:func:`manifest_summary`), when

- the newest manifest is newer than the one the last event announced (a rerun, or a day without
  a drop, announces nothing twice), and
- no later ingest run is still to come (queued or running, its ``publish`` not done): during a
  backfill only the last run announces, so 30 backfilled days make one training, not 30. Each
  ``publish`` waits for the previous run's (``depends_on_past``), so "another unfinished
  ``publish``" can only mean a later run, and the last of them always sees the others done.

Otherwise it skips itself with the reason in its log (a skipped task emits no event). Imported at
DAG parse time: no TensorFlow, no PySpark.
"""

from __future__ import annotations

import json
import logging

from pipeline.retrain import image_counts

log = logging.getLogger(__name__)

#: Written by ``publish`` under the ingest run's folder once its drops are in the data set: a
#: rerun of that run then short-circuits (``resolve_run(done_marker=...)``).
INGEST_DONE = "ingested.json"
#: Task states after which a ``publish`` will not run again by itself.
_FINISHED = {"success", "skipped", "failed", "upstream_failed", "removed"}


def drops_from_events(events) -> list[str]:
    """The drop ids the triggering asset events' extras name (``drop_id`` or ``drops``), in event order."""
    named: list[str] = []
    for event in events:
        extra = dict(getattr(event, "extra", None) or {})
        values = extra.get("drops") or ([extra["drop_id"]] if extra.get("drop_id") else [])
        if isinstance(values, str):
            values = [values]
        named += [str(v) for v in values]
    return list(dict.fromkeys(named))


def event_manifest_versions(events) -> list[int]:
    """The manifest versions the triggering asset events' extras name (events without one are ignored)."""
    versions = []
    for event in events:
        version = dict(getattr(event, "extra", None) or {}).get("manifest_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > 0:
            versions.append(version)
    return versions


def manifest_summary(manifest: dict) -> dict:
    """The manifest asset event's extra: which data set, in a few numbers."""
    images, melanomas = image_counts(manifest)
    augmented = sum(
        int(n) for split in (manifest.get("augmented_counts") or {}).values() for n in split.values()
    )
    return {
        "manifest_version": manifest["version"],
        "manifest_key": f"processed/manifest-{manifest['version']:06d}.json",
        "logical_date": manifest.get("logical_date"),
        "drops": list(manifest.get("drops", [])),
        "images": images,
        "melanomas": melanomas,
        "augmented_images": augmented,
        "counts": manifest.get("counts", {}),
    }


def publish_decision(latest: dict | None, announced: int | None, later_runs: list[str]) -> tuple[bool, str]:
    """(emit an event?, why) for the newest manifest, the version the last event named, the later ingest runs."""
    if latest is None:
        return False, "no manifest yet: nothing to announce"
    version = latest["version"]
    if announced is not None and version <= announced:
        return False, f"manifest v{version} was announced already (last event: v{announced})"
    if later_runs:
        return False, (
            f"manifest v{version} not announced yet: later ingest runs {later_runs} are still to come; "
            "the last of them announces the data set they leave"
        )
    return True, f"announcing manifest v{version}" + (
        f" (last event: v{announced})" if announced else " (first event)"
    )


def later_ingest_runs(ti, dag_id: str, run_id: str, task_id: str) -> list[str]:
    """Other runs of this DAG whose ``task_id`` has not finished and that are still queued or running."""
    states = ti.get_task_states(dag_id=dag_id, task_ids=[task_id])
    unfinished = [
        rid for rid, tasks in states.items() if rid != run_id and tasks.get(task_id) not in _FINISHED
    ]
    return sorted(
        rid for rid in unfinished if ti.get_dagrun_state(dag_id=dag_id, run_id=rid) in ("queued", "running")
    )


def last_announced_version(inlet_events) -> int | None:
    """The manifest version the asset's newest event named (None: no event, or one without a version)."""
    events = inlet_events.ascending(False).limit(1)
    if not len(events):
        return None
    version = dict(events[0].extra or {}).get("manifest_version")
    return version if isinstance(version, int) else None


def publish(context, asset) -> dict:
    """The ``publish`` task: mark the run ingested, then emit the manifest asset's event or skip with the reason."""
    from airflow.sdk.exceptions import AirflowSkipException

    from melanoma.manifest import latest_manifest
    from melanoma.storage import join_key, open_storage

    ti, run = context["ti"], context["ti"].xcom_pull(task_ids="plan")
    processed = open_storage(run["data_root"])
    latest = latest_manifest(processed)
    if run["proceed"] and latest and set(run["new_drops"]) <= set(latest.get("drops", [])):
        record = {
            "run_key": run["run_key"],
            "new_drops": run["new_drops"],
            "manifest_version": latest["version"],
        }
        processed.write_bytes(
            join_key("runs", run["run_key"], INGEST_DONE),
            (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
        )
    announced = last_announced_version(context["inlet_events"][asset])
    later = later_ingest_runs(ti, ti.dag_id, ti.run_id, ti.task_id)
    emit, reason = publish_decision(latest, announced, later)
    log.info("publish: %s", reason)
    if not emit:
        raise AirflowSkipException(reason)
    extra = manifest_summary(latest)
    context["outlet_events"][asset].extra = extra
    return extra
