"""The model registry: every evaluated model a version, the ``champion`` alias moved only through a gate.

The ``promote`` step (after ``report``) registers the run's model as a version of
``melanoma-classifier`` with its threshold, strategy, pooling, manifest version and backbone as
tags, then decides (:func:`gate`), like TFX's Evaluator "blessing":

- an absolute floor: the challenger's validation AUROC must reach ``min_val_auroc``;
- the lesion-focus check of its Grad-CAM must pass (its melanoma maps sit on the lesions);
- when a champion exists, the champion is **re-scored on the challenger's validation split**
  (same manifest, same pooling rule as each model's own evaluation) and the challenger must reach
  the champion's AUROC plus ``margin``. Comparing against the champion's recorded AUROC would
  compare two different validation sets.

A rejected challenger stays registered, tagged with the reasons; nothing is deleted. The
decision goes to the step's result (XCom), ``promotion.json`` in the run folder (the report
shows it), the MLflow run's and the version's tags. :func:`force_promote` and :func:`rollback`
move the alias by hand; both are audited (a version tag and a registered-model tag).
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import logging

import numpy as np

from melanoma.manifest import load_split, require_manifest
from melanoma.storage import open_storage
from training import tracking
from training.predict import MODEL_KEY

__all__ = [
    "MODEL_NAME",
    "ALIAS",
    "gate",
    "promote_run",
    "force_promote",
    "rollback",
    "resolve_registered",
    "registry_versions",
]

log = logging.getLogger(__name__)
MODEL_NAME = "melanoma-classifier"
ALIAS = "champion"


def gate(challenger_auc: float, focus_on_lesion, *, min_val_auroc: float, margin: float, champion_auc=None):
    """``(promote?, reasons)``: the floor, the focus check and, with a champion, the comparison."""
    reasons = []
    if not challenger_auc >= min_val_auroc:
        reasons.append(f"val AUROC {challenger_auc:.4f} is below the floor {min_val_auroc:.4f}")
    if focus_on_lesion is not True:
        reasons.append(
            "lesion-focus check failed: melanoma Grad-CAMs do not sit on the lesions"
            if focus_on_lesion is False
            else "lesion-focus check not assessable: no melanoma with a lesion mask was scored"
        )
    if champion_auc is not None and not challenger_auc >= champion_auc + margin:
        reasons.append(
            f"val AUROC {challenger_auc:.4f} does not reach the champion's {champion_auc:.4f} "
            f"+ margin {margin:.4f} on the same validation split"
        )
    return not reasons, reasons


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _auroc(labels, scores) -> float:
    from training.metrics import ranking_metrics

    return float(ranking_metrics(np.asarray(labels), np.asarray(scores))["auroc"])


def _rescore_champion(version, processed_root: str, manifest: dict) -> float:
    """The champion's validation AUROC on this manifest's validation split, with its own pooling and views."""
    from training.evaluation import decision_scores
    from training.model_io import load_model
    from training.predict import predict_probabilities

    model_uri = _verified_model_uri(version)
    val = load_split(open_storage(processed_root), manifest, ["val"])
    probabilities = predict_probabilities(
        load_model(model_uri),
        val.images,
        what=f"promote: re-scoring champion v{version.version} on val",
        views=int(version.tags.get("views", "1")),  # versions registered before views: 1
    )
    ids = [r["image_id"] for r in val.records]
    scores = decision_scores(
        ids, probabilities.tolist(), [str(r["lesion_id"]) for r in val.records], version.tags["pooling"]
    )
    return _auroc([int(r["label"]) for r in val.records], [scores[i] for i in ids])


def _verified_model_uri(version) -> str:
    """The model file a version names, refused when its bytes are not the ones registered."""
    run = open_storage(version.tags["run_root"])
    if not run.exists(MODEL_KEY):
        raise FileNotFoundError(f"{MODEL_NAME} v{version.version}: {run.uri(MODEL_KEY)} is gone")
    if _sha256(run.read_bytes(MODEL_KEY)) != version.tags["model_sha256"]:
        raise ValueError(
            f"{MODEL_NAME} v{version.version}: {run.uri(MODEL_KEY)} is not the registered model (sha256 differs)"
        )
    return run.uri(MODEL_KEY)


def _register(client, run_id: str, run, payload: dict):
    """This run's version (the existing one on a retry), tagged with what scoring it needs.

    A run retrained in place (a cleared run) has another model file: it gets a version of its own.
    """
    from mlflow.exceptions import MlflowException

    sha256 = _sha256(run.read_bytes(MODEL_KEY))
    for version in client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'"):
        if version.tags.get("model_sha256") == sha256:
            return version
    try:
        client.create_registered_model(
            MODEL_NAME, description="Melanoma probability from a dermoscopic image"
        )
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    provenance = json.loads(run.read_bytes("model/provenance.json"))
    config = json.loads(run.read_bytes("model/config.json"))
    tags = {
        "run_root": run.root_uri,
        "model_sha256": sha256,
        "threshold": repr(float(payload["threshold"])),
        "strategy": payload["strategy"],
        "pooling": payload["pooling"],
        "views": str(payload.get("views", 1)),
        "manifest_version": str(provenance.get("manifest_version", config.get("manifest_version"))),
        "backbone": str(config.get("backbone")),
    }
    artifact = client.get_run(run_id).info.artifact_uri
    return client.create_model_version(MODEL_NAME, f"{artifact}/model", run_id=run_id, tags=tags)


def _version(client, *, number=None, alias: str | None = None):
    """One registered version, or a ValueError naming what is missing (not MLflow's stack trace)."""
    from mlflow.exceptions import MlflowException

    try:
        if alias:
            return client.get_model_version_by_alias(MODEL_NAME, alias)
        return client.get_model_version(MODEL_NAME, str(number))
    except MlflowException as error:
        what = f"@{alias}" if alias else f"version {number}"
        raise ValueError(f"{MODEL_NAME} {what}: not in the registry ({error.error_code})") from None


def _champion(client):
    try:
        return _version(client, alias=ALIAS)
    except ValueError:
        return None  # no alias yet: the first model


def promote_run(
    processed_root: str,
    run_root: str,
    payload: dict,
    *,
    min_val_auroc: float,
    margin: float,
    as_of: str | None = None,
    manifest_version: int | None = None,
) -> dict:
    """Register the run's model and move ``champion`` to it only if it passes :func:`gate`."""
    run = open_storage(run_root)
    client, run_id = tracking.tracking_run(run_root)
    version = _register(client, run_id, run, payload)
    champion = _champion(client)
    focus = json.loads(run.read_bytes("gradcam/gradcam_summary.json")).get("lesion_focus_check") or {}
    decision = {
        "model": MODEL_NAME,
        "version": int(version.version),
        # evaluate's validation AUROC, on the scores its threshold used (pooled as the run pools them)
        "challenger_val_auroc": json.loads(run.read_bytes("eval/metrics.json"))["threshold"]["val"]["auroc"],
        "focus_on_lesion": focus.get("on_lesion"),
        "min_val_auroc": min_val_auroc,
        "margin": margin,
        "champion_before": int(champion.version) if champion else None,
        "champion_val_auroc": None,
        "tracking_uri": tracking.tracking_uri(run_root),
        "mlflow_run_id": run_id,
    }
    if champion is not None and champion.version == version.version:  # a retry after the alias moved
        decision.update(promoted=True, reasons=["already the champion (this step ran before)"])
        return _publish(client, run, run_id, version, decision)
    if champion is not None:
        manifest = require_manifest(open_storage(processed_root), as_of=as_of, version=manifest_version)
        decision["champion_val_auroc"] = _rescore_champion(champion, processed_root, manifest)
    promoted, reasons = gate(
        decision["challenger_val_auroc"],
        decision["focus_on_lesion"],
        min_val_auroc=min_val_auroc,
        margin=margin,
        champion_auc=decision["champion_val_auroc"],
    )
    decision.update(
        promoted=promoted, reasons=reasons or ["passed the floor, the focus check and the champion"]
    )
    if promoted:
        client.set_registered_model_alias(MODEL_NAME, ALIAS, version.version)
    return _publish(client, run, run_id, version, decision)


def _publish(client, run, run_id: str, version, decision: dict) -> dict:
    """The decision on the version, on the MLflow run and in the run folder (``promotion.json``)."""
    verdict = "promoted" if decision["promoted"] else "rejected"
    reasons = "; ".join(decision["reasons"])
    client.set_model_version_tag(MODEL_NAME, version.version, "promotion", verdict)
    client.set_model_version_tag(MODEL_NAME, version.version, "promotion.reasons", reasons)
    client.set_tag(run_id, "promotion", f"{verdict}: v{version.version}")
    client.set_tag(run_id, "promotion.reasons", reasons)
    run.write_bytes("promotion.json", json.dumps(decision, indent=2, sort_keys=True).encode())
    log.info("promote: %s v%s: %s", verdict, version.version, reasons)
    return decision


def _audit(client, version: str, action: str, reason: str, before) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    entry = {
        "action": action,
        "version": int(version),
        "champion_before": int(before.version) if before else None,
        "by": getpass.getuser(),
        "at": now.isoformat(timespec="seconds"),
        "reason": reason,
    }
    client.set_registered_model_alias(MODEL_NAME, ALIAS, version)
    key = f"audit.{now:%Y%m%dT%H%M%S.%fZ}"  # tag names allow no '+'
    client.set_model_version_tag(MODEL_NAME, version, key, json.dumps(entry))
    client.set_registered_model_tag(MODEL_NAME, f"{key}.{action}", json.dumps(entry))
    log.info("registry: %s", entry)
    return entry


def force_promote(uri: str, version: int, reason: str) -> dict:
    """Make ``version`` the champion whatever the gate said (audited; a reason is required)."""
    if not reason.strip():
        raise ValueError("force-promote needs a --reason (it is kept in the registry)")
    client = tracking.tracking_client(uri)
    target = _version(client, number=version)
    _verified_model_uri(target)  # never promote a model whose file is gone or changed
    return _audit(client, target.version, "force-promote", reason, _champion(client))


def rollback(uri: str, version: int, reason: str) -> dict:
    """Move ``champion`` back to ``version``, which must have been champion before (audited)."""
    client = tracking.tracking_client(uri)
    target = _version(client, number=version)
    was_champion = target.tags.get("promotion") == "promoted" or any(
        key.startswith("audit.") for key in target.tags
    )
    if not was_champion:
        raise ValueError(f"{MODEL_NAME} v{version} was never champion: use force-promote to make it one")
    _verified_model_uri(target)
    return _audit(client, target.version, "rollback", reason or "rollback", _champion(client))


def registry_versions(uri: str) -> list[dict]:
    """Every version, newest first, with its decision and whether it is the champion."""
    client = tracking.tracking_client(uri)
    champion = _champion(client)
    versions = sorted(
        client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version), reverse=True
    )
    return [
        {
            "version": int(v.version),
            "champion": bool(champion and champion.version == v.version),
            "promotion": v.tags.get("promotion"),
            "reasons": v.tags.get("promotion.reasons"),
            "threshold": v.tags.get("threshold"),
            "run_root": v.tags.get("run_root"),
        }
        for v in versions
    ]


def resolve_registered(spec: str, uri: str) -> tuple[str, str]:
    """``champion``, ``models:/melanoma-classifier@<alias>`` or ``models:/melanoma-classifier/<n>`` ->
    ``(model file URI in its run folder, "models:/melanoma-classifier/<n>")``."""
    client = tracking.tracking_client(uri)
    name, alias, number = MODEL_NAME, ALIAS, None
    if spec.startswith("models:/"):
        name, _, rest = spec[len("models:/") :].partition("@")
        if not rest:
            name, _, number = name.partition("/")
        alias = rest or None
    if name != MODEL_NAME or not (alias or number):
        raise ValueError(f"--model {spec!r}: expected champion or models:/{MODEL_NAME}@<alias> or /<version>")
    version = _version(client, number=number, alias=alias)
    return _verified_model_uri(version), f"models:/{MODEL_NAME}/{version.version}"
