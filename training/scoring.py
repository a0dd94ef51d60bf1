"""Scoring new, unlabelled images with the approved model: the ``melanoma_score`` DAG's step.

Each folder under the inbox root (a *drop* of new images: bare, or in either drop layout) is
scored by the registry's champion (or the model given) with that model's own validated threshold
and pooling, through :func:`training.predict.predict_folder`: the Spark job's preprocessing, the
score-shift test against validation, a Grad-CAM overlay per image. Under
``<scores root>/<drop>/``: ``predictions.csv`` (model version and threshold in every row),
``overlays/``, ``quarantine.jsonl`` (unreadable files, in ingestion's format: drop_id, item,
reason, detail; never skipped silently), ``shift.json`` when the scores shifted, and ``index.html``,
one self-contained page (inline images, every value escaped, no script allowed).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging

from melanoma.drops import is_valid_drop_id
from melanoma.storage import open_storage
from training.predict import predict_folder
from training.report import CSP, data_uri

__all__ = ["score_drops"]

log = logging.getLogger(__name__)


def _csv_rows(out, key: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(out.read_bytes(key).decode())))


def _quarantine(drop_id: str, out) -> list[dict]:
    """``rejected.csv`` of predict as ingestion's quarantine entries (``quarantine.jsonl``)."""
    entries = [
        {"drop_id": drop_id, "item": r["key"], "reason": r["reason"], "detail": r["detail"]}
        for r in _csv_rows(out, "rejected.csv")
    ]
    out.write_bytes("quarantine.jsonl", "".join(json.dumps(q) + "\n" for q in entries).encode())
    for entry in entries:
        log.warning("score: quarantined %s", entry)
    return entries


def _page(drop_id: str, result: dict, rows: list[dict], quarantined: list[dict], out) -> str:
    """``index.html``: each image's score, decision and overlay; the quarantined files with their reason."""
    e = lambda value: html.escape(str(value), quote=True)  # noqa: E731 - every value goes through it
    table = []
    for row in rows:
        overlay = f"overlays/{row['image_id']}.png"
        uri = data_uri(out.read_bytes(overlay)) if out.exists(overlay) else None
        image = f'<img alt="{e(row["image_id"])}" src="{uri}">' if uri else ""
        verdict = "melanoma suspected" if row["label"] == "1" else "below threshold"
        table.append(
            f"<tr><td>{e(row['image_id'])}</td><td>{float(row['probability']):.3f}</td>"
            f"<td>{e(verdict)}</td><td>{image}</td></tr>"
        )
    refused = "".join(f"<li>{e(q['item'])}: {e(q['reason'])} ({e(q['detail'])})</li>" for q in quarantined)
    shift = result.get("score_shift") or {}
    warning = f'<p class="warning">{e(shift["message"])}</p>' if shift.get("shifted") else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>Scores: {e(drop_id)}</title>'
        "<style>body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:70rem}"
        "td,th{border:1px solid #d6dbe4;padding:.3rem .6rem}table{border-collapse:collapse}"
        "img{width:20rem}.warning{background:#fff4e5;border-left:4px solid #e08a00;padding:.6rem}</style>"
        f"</head><body><h1>Scores of {e(drop_id)}</h1><p>Model {e(result['model'])}, threshold "
        f"{result['threshold']:.4f} ({e(result['threshold_source'])}); {result['scored']} scored, "
        f"{len(quarantined)} quarantined. A decision aid for a clinician, not a diagnosis.</p>{warning}"
        "<table><thead><tr><th>image</th><th>probability</th><th>decision</th><th>Grad-CAM</th></tr></thead>"
        f"<tbody>{''.join(table)}</tbody></table><h2>Quarantined</h2><ul>{refused or '<li>none</li>'}</ul>"
        "</body></html>\n"
    )


def score_drops(inbox_root: str, scores_root: str, drops: list[str], model_uri: str, model_name: str) -> dict:
    """Score each drop of the inbox into ``<scores root>/<drop>/``; returns a summary per drop."""
    summary = {}
    for drop_id in drops:
        if not is_valid_drop_id(drop_id):
            raise ValueError(f"{drop_id!r} is not a valid inbox folder name (letters, digits, _ . -)")
        out_uri = open_storage(scores_root).uri(drop_id)
        result = predict_folder(
            model_uri,
            open_storage(inbox_root).uri(drop_id),
            out_uri,
            overlays=True,
            model_name=model_name,
        )
        out = open_storage(out_uri)
        rows, quarantined = _csv_rows(out, "predictions.csv"), _quarantine(drop_id, out)
        out.write_bytes("index.html", _page(drop_id, result, rows, quarantined, out).encode())
        summary[drop_id] = {
            "scored": result["scored"],
            "quarantined": len(quarantined),
            "flagged": sum(row["label"] == "1" for row in rows),
            "threshold": result["threshold"],
            "page_uri": out.uri("index.html"),
            "score_shift": bool((result["score_shift"] or {}).get("shifted")),
        }
        log.info("score: %s: %s", drop_id, summary[drop_id])
    return {"model": model_name, "scores_root": scores_root, "drops": summary}
