"""The training DAG's plan: which manifest a run trains on, and whether the retraining policy says train.

``melanoma_train`` runs when the manifest asset is updated (or by hand). Its ``plan`` task calls
:func:`resolve_training`, which

- picks the manifest: the ``manifest_version`` Param, else the newest version the triggering asset
  events name, else (a manual run) the newest manifest as of the run's date; and pins it in
  ``runs/<run_key>/plan.json`` the first time the run trains, so a rerun of an old run trains on
  the data it was triggered with, never on the newest ("as of" semantics);
- finds the last model: the newest ``runs/*/model/provenance.json`` trained on a manifest no newer
  than that one (any run but this one; old ``melanoma_pipeline`` runs count too);
- applies the policy (:data:`POLICIES`): ``every`` new manifest, ``min_new`` (at least N new images
  or M new melanoma images since the last model's manifest), or ``always``.

Policy settings, lowest precedence first: defaults (``every``, 0, 0: declared in
:data:`melanoma.settings.TRAIN_SETTINGS`), the Variables
``melanoma_retrain_policy``, ``melanoma_retrain_min_new_images``, ``melanoma_retrain_min_new_melanomas``
(or env ``MELANOMA_RETRAIN_POLICY``...), then the run's Params of the same names. Asset-triggered
runs carry no conf, so Variables/env are how a deployment sets the policy for them.

Imported at DAG parse time: no TensorFlow, no PySpark.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from melanoma.settings import POLICIES, TRAIN_SETTINGS
from pipeline.airflow_ops import (
    PARAM_DEFAULTS,
    PLAN_RECORD,
    RUN_DONE,
    checked_params,
    read_record,
    run_date,
    run_key,
    run_root,
    setting,
    storage_roots,
    training_settings,
    write_record,
)

log = logging.getLogger(__name__)

#: The training DAG's Params beyond the pipeline's (which it shares, ``drops`` aside).
TRAIN_PARAM_DEFAULTS: dict[str, Any] = {name: s.param_default for name, s in TRAIN_SETTINGS.items()}
TRAIN_DEFAULTS = {**{k: v for k, v in PARAM_DEFAULTS.items() if k != "drops"}, **TRAIN_PARAM_DEFAULTS}
#: Prefix of the training DAG's run folders (``runs/train-<run key>``): never the same folder as
#: an ingest run's or an old ``melanoma_pipeline`` run's of the same date.
KEY_PREFIX = "train-"
_MODEL_RECORD = "/model/provenance.json"


def image_counts(manifest: dict) -> tuple[int, int]:
    """(images, melanoma images) of a manifest's original images, every split (augmented copies not counted)."""
    counts = manifest.get("counts") or {}
    images = sum(int(n) for split in counts.values() for n in split.values())
    melanomas = sum(int(split.get("1", 0)) for split in counts.values())
    return images, melanomas


def resolve_policy(values: dict) -> dict:
    """The policy and its thresholds: the run's Params where given, else Variables/env, else ``every``."""

    def number(name: str) -> int:
        given = values.get(name)
        raw = given if given is not None else setting(name, str(TRAIN_SETTINGS[name].default))
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise ValueError(
                f"{name}={raw!r} is not a whole number (Param, Variable melanoma_{name} or env MELANOMA_{name.upper()})"
            ) from None
        if number < 0:
            raise ValueError(f"{name}={number} must be 0 or more")
        return number

    policy = values.get("retrain_policy") or setting(
        "retrain_policy", TRAIN_SETTINGS["retrain_policy"].default
    )
    if policy not in POLICIES:
        raise ValueError(f"retrain_policy={policy!r}: use one of {POLICIES}")
    result = {
        "policy": policy,
        "min_new_images": number("retrain_min_new_images"),
        "min_new_melanomas": number("retrain_min_new_melanomas"),
    }
    if policy == "min_new" and not (result["min_new_images"] or result["min_new_melanomas"]):
        raise ValueError(
            "retrain_policy=min_new needs retrain_min_new_images or retrain_min_new_melanomas above 0"
        )
    return result


def last_model(processed, *, up_to: int, exclude: str) -> dict | None:
    """The newest model trained on a manifest version ``<= up_to``, by any run but ``exclude``: ``{run_key, manifest_version}``."""
    best = None
    for key in processed.list_keys("runs"):
        parts = key.split("/")
        # runs/<run_key>/model/provenance.json only (not an ensemble member's own model).
        if len(parts) != 4 or not key.endswith(_MODEL_RECORD) or parts[1] == exclude:
            continue
        version = json.loads(processed.read_bytes(key)).get("manifest_version")
        if (
            isinstance(version, int)
            and version <= up_to
            and (best is None or version > best["manifest_version"])
        ):
            best = {"run_key": parts[1], "manifest_version": version}
    return best


def decide(
    policy: dict, manifest: dict, baseline: dict | None, baseline_manifest: dict | None
) -> tuple[bool, str]:
    """(train?, why): the retraining policy applied to ``manifest`` against the last model's manifest."""
    version = manifest["version"]
    if policy["policy"] == "always":
        return True, f"policy always: train on manifest v{version}"
    if baseline is None or baseline_manifest is None:
        return True, f"no model trained on manifest v{version} or an earlier one yet: train the first"
    since = f"since manifest v{baseline['manifest_version']} (the data of runs/{baseline['run_key']})"
    if baseline["manifest_version"] >= version:
        return (
            False,
            f"runs/{baseline['run_key']} already trained on manifest v{version}: nothing new to train on",
        )
    images, melanomas = (a - b for a, b in zip(image_counts(manifest), image_counts(baseline_manifest)))
    news = f"{images} new images ({melanomas} melanoma) {since}"
    if policy["policy"] == "every":
        return True, f"policy every: {news}"
    wanted = [f"{n} images" for n in [policy["min_new_images"]] if n] + [
        f"{n} melanomas" for n in [policy["min_new_melanomas"]] if n
    ]
    enough = (policy["min_new_images"] and images >= policy["min_new_images"]) or (
        policy["min_new_melanomas"] and melanomas >= policy["min_new_melanomas"]
    )
    verdict = "reached" if enough else "not reached"
    return bool(enough), f"policy min_new (at least {' or '.join(wanted)}): {news}; {verdict}"


def _choose_version(
    processed, requested: int, event_versions: list[int], as_of: str | None
) -> tuple[int, str]:
    """(manifest version, where it came from) for a run that has not pinned one yet."""
    from melanoma.manifest import ManifestError, latest_manifest

    if requested:
        return requested, "the manifest_version Param"
    if event_versions:
        return max(event_versions), f"the triggering asset event(s) (versions {sorted(event_versions)})"
    latest = latest_manifest(processed, as_of=as_of)
    if latest is None:
        raise ManifestError(
            f"no manifest as of {as_of} under {processed.uri('processed')}: run melanoma_ingest first"
        )
    return latest["version"], f"the newest manifest as of {as_of}"


def _manifest_version(
    processed, key: str, pinned: dict | None, requested, event_versions: list[int], as_of: str | None
) -> tuple[int, str]:
    """(manifest version, where it came from): the one ``pinned`` in the run's record, else chosen now."""
    if pinned:  # a rerun: the data this run was triggered with, not the newest
        return int(pinned["manifest_version"]), f"pinned in runs/{key}/{PLAN_RECORD} at its first attempt"
    return _choose_version(processed, int(requested), event_versions, as_of)


def _training_decision(
    processed, key: str, policy: dict, manifest: dict, baseline: dict | None
) -> tuple[bool, str, bool]:
    """(train?, why, finished?): the policy against the last model's manifest; a finished run never trains."""
    from melanoma.manifest import load_manifest
    from melanoma.storage import join_key

    baseline_manifest = load_manifest(processed, baseline["manifest_version"]) if baseline else None
    train, reason = decide(policy, manifest, baseline, baseline_manifest)
    finished = processed.exists(join_key("runs", key, RUN_DONE))
    if finished:
        train, reason = False, f"runs/{key}/{RUN_DONE} exists: this run has finished"
    return train, reason, finished


def resolve_training(
    params: dict,
    *,
    run_id: str,
    logical_date: dt.datetime | None,
    run_after: dt.datetime | None,
    event_versions: list[int],
) -> dict:
    """Everything the training DAG's tasks need, as small JSON (the ``plan`` task's XCom); see the module doc."""
    from melanoma.manifest import require_manifest
    from melanoma.storage import join_key, open_storage

    values = checked_params(params, TRAIN_DEFAULTS)
    data_root, raw_root = storage_roots()
    processed = open_storage(data_root)
    key = KEY_PREFIX + run_key(run_id, logical_date)
    record_key = join_key("runs", key, PLAN_RECORD)
    pinned = read_record(processed, record_key)
    version, source = _manifest_version(
        processed,
        key,
        pinned,
        values["manifest_version"],
        event_versions,
        run_date(logical_date, run_after),
    )
    manifest = require_manifest(processed, version=version)
    policy = resolve_policy(values)
    baseline = last_model(processed, up_to=version, exclude=key)
    train, reason, finished = _training_decision(processed, key, policy, manifest, baseline)
    as_of = manifest.get("logical_date")
    if train and not pinned:  # pin the data set before any output exists (a skipped run writes nothing)
        record = {
            "run_key": key,
            "run_id": run_id,
            "manifest_version": version,
            "drops": manifest.get("drops", []),
            "as_of": as_of,
            "policy": policy,
            "reason": reason,
        }
        write_record(processed, record_key, record)
    images, melanomas = image_counts(manifest)
    return {
        "run_key": key,
        "raw_root": raw_root,
        "data_root": data_root,
        "run_root": run_root(data_root, key),
        "manifest_version": version,
        "manifest_source": source,
        "drops": manifest.get("drops", []),
        "images": images,
        "melanomas": melanomas,
        "as_of": as_of,
        "policy": policy,
        "last_model": baseline,
        "proceed": train,
        "reason": reason,
        "finished": finished,
        **training_settings(values, as_of, manifest_version=version),
    }
