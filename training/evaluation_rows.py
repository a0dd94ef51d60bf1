"""The prediction rows evaluation reads: their columns, parsing from CSV, per-set checks and counts.

A row (one per image, e.g. from :func:`read_predictions_csv`) carries ``image_id``,
``lesion_id``, ``split`` (train / val / test / external), ``label`` (1 melanoma, 0 other),
``dx``, ``probability``, ``age`` (float or None), ``sex``, ``localization`` and ``source``.
Rows with split ``external`` are grouped by ``source`` into external sets.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "COLUMNS",
    "INTERNAL_SPLITS",
    "EXTERNAL_SPLIT",
    "read_predictions_csv",
    "set_arrays",
    "row_counts",
    "partition_rows",
]

COLUMNS = (
    "image_id",
    "lesion_id",
    "split",
    "label",
    "dx",
    "probability",
    "age",
    "sex",
    "localization",
    "source",
)
INTERNAL_SPLITS = ("train", "val", "test")
EXTERNAL_SPLIT = "external"


def _optional_text(value: str) -> str | None:
    value = value.strip()
    return value or None


def read_predictions_csv(source: str | os.PathLike | bytes) -> list[dict]:
    """Parse a predictions CSV (a path, or its bytes) into typed rows.

    Returns one dict per row with the :data:`COLUMNS`: ``label`` int in {0, 1},
    ``probability`` float (NaN is kept; evaluation refuses it with the image ids), ``age``
    float or None, ``sex``/``localization``/``dx``/``source`` str or None when empty, the
    ids and ``split`` as str. Missing columns or unparsable values raise ``ValueError``
    with the line number.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"predictions CSV lacks column(s) {', '.join(missing)}")
    rows = []
    for raw in reader:
        line = reader.line_num
        try:
            label = int(raw["label"])
            probability = float(raw["probability"])
            age = float(raw["age"]) if raw["age"].strip() else None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"predictions CSV line {line}: {exc}") from None
        if label not in (0, 1):
            raise ValueError(f"predictions CSV line {line}: label must be 0 or 1, got {label}")
        rows.append(
            {
                "image_id": raw["image_id"],
                "lesion_id": raw["lesion_id"],
                "split": raw["split"].strip(),
                "label": label,
                "dx": _optional_text(raw["dx"]),
                "probability": probability,
                "age": age,
                "sex": _optional_text(raw["sex"]),
                "localization": _optional_text(raw["localization"]),
                "source": _optional_text(raw["source"]),
            }
        )
    return rows


def set_arrays(rows: Sequence[dict], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (n,), probabilities (n,), lesion ids (n,) of one set, checked."""
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        seen, dupes = set(), []
        for i in ids:
            if i in seen:
                dupes.append(i)
            seen.add(i)
        raise ValueError(f"{name}: image_id repeated: {', '.join(map(str, dupes[:5]))}")
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    scores = np.array([float(r["probability"]) for r in rows], dtype=np.float64)
    bad = [r["image_id"] for r, p in zip(rows, scores) if not math.isfinite(p)]
    if bad:
        raise ValueError(
            f"{name}: {len(bad)} row(s) have a non-finite probability, e.g. {', '.join(map(str, bad[:5]))}"
        )
    missing = [r["image_id"] for r in rows if r.get("lesion_id") in (None, "")]
    if missing:
        # Lumping them into one pseudo-lesion would distort the lesion bootstrap.
        raise ValueError(
            f"{name}: {len(missing)} row(s) lack a lesion_id, e.g. {', '.join(map(str, missing[:5]))}"
        )
    lesions = np.array([str(r["lesion_id"]) for r in rows], dtype=object)
    return labels, scores, lesions


def row_counts(rows: Sequence[dict]) -> dict:
    """``{"images", "lesions", "melanoma"}`` of one set."""
    return {
        "images": len(rows),
        "lesions": len({r["lesion_id"] for r in rows}),
        "melanoma": sum(int(r["label"]) for r in rows),
    }


def partition_rows(
    rows: Iterable[dict], external: Mapping[str, Sequence[dict]] | None
) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(``{train|val|test: rows}``, ``{external set name: rows}``): rows of split ``external``
    grouped by ``source``, next to the sets passed in ``external``."""
    internal: dict[str, list[dict]] = {split: [] for split in INTERNAL_SPLITS}
    from_rows: dict[str, list[dict]] = defaultdict(list)
    unknown = set()
    for row in rows:
        split = row["split"]
        if split in internal:
            internal[split].append(row)
        elif split == EXTERNAL_SPLIT:
            from_rows[row.get("source") or EXTERNAL_SPLIT].append(row)
        else:
            unknown.add(split)
    if unknown:
        raise ValueError(
            f"unknown split value(s) {sorted(map(str, unknown))}; expected {INTERNAL_SPLITS + (EXTERNAL_SPLIT,)}"
        )
    externals = dict(from_rows)
    for name, set_rows in (external or {}).items():
        if name in externals:
            raise ValueError(f"external set {name!r} given both in rows (split 'external') and in external=")
        externals[name] = list(set_rows)
    return internal, externals
