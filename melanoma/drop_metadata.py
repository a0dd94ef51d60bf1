"""A drop's metadata records: each HAM10000 CSV row or ISIC JSON file parsed into one record.

Each record becomes a :class:`Row` (diagnosis mapped to :data:`DX_CODES`, "not recorded"
spellings as None, the age checked) or, when it cannot be parsed, a :class:`BadRow` carrying
the quarantine detail. Finding the metadata files and matching records with image files is
:mod:`melanoma.drop_scan`.
"""

from __future__ import annotations

import json
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from melanoma.storage import ObjectRefused, Storage

__all__ = ["DX_CODES", "ISIC_DIAGNOSIS_TO_DX", "BadRow", "Row", "ham_rows", "isic_row", "read_all"]

#: HAM10000 diagnosis codes; ``mel`` is the positive class.
DX_CODES = ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
#: ISIC archive ``meta.clinical.diagnosis`` -> HAM10000 code.
ISIC_DIAGNOSIS_TO_DX = {
    "melanoma": "mel",
    "nevus": "nv",
    "seborrheic keratosis": "bkl",
    "solar lentigo": "bkl",
    "lichenoid keratosis": "bkl",
    "pigmented benign keratosis": "bkl",
    "basal cell carcinoma": "bcc",
    "actinic keratosis": "akiec",
    "dermatofibroma": "df",
    "vascular lesion": "vasc",
}
# Values meaning "not recorded" in HAM10000 and ISIC metadata.
_MISSING = {"", "unknown", "nan", "na", "n/a", "none", "null"}


# ---------------------------------------------------------------------------------------
# Metadata parsing: each returns a Row or raises BadRow with a reason


@dataclass(frozen=True)
class Row:
    """One metadata record, before it is matched with its image file."""

    image_id: str
    lesion_id: str | None
    dx: str | None  # already mapped to DX_CODES vocabulary when recognised
    raw_dx: str | None
    age: float | None
    sex: str | None
    localization: str | None
    where: str  # "row 12 of x.csv" / "x.json", for quarantine details


class BadRow(ValueError):
    """An unparsable row. ``image_id`` may be "" (none readable); ``item`` names it in quarantine."""

    def __init__(self, image_id: str, detail: str, where: str = "") -> None:
        super().__init__(detail)
        self.image_id = image_id
        self.item = image_id or where
        self.detail = detail


def _text(value) -> str | None:
    """Metadata text, with every spelling of "not recorded" as None."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in _MISSING else text


def _age(value, where: str, image_id: str) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        age = float(text)
    except ValueError:
        raise BadRow(image_id, f"{where}: age {text!r} is not a number", where) from None
    if not math.isfinite(age) or not 0 <= age <= 130:
        raise BadRow(image_id, f"{where}: age {text!r} is out of range", where)
    return age


def ham_rows(key: str, header: list[str], rows: list[list[str]]) -> list[Row | BadRow]:
    """CSV rows -> records; a malformed row becomes a BadRow (line numbers count the header)."""
    out: list[Row | BadRow] = []
    for number, cells in enumerate(rows, start=2):
        where = f"row {number} of {key}"
        values = dict(zip(header, (c.strip() for c in cells)))
        image_id = values.get("image_id", "")
        if len(cells) != len(header):
            out.append(BadRow(image_id, f"{where}: {len(cells)} fields for {len(header)} columns", where))
            continue
        if not image_id:
            out.append(BadRow("", f"{where}: no image_id", where))
            continue
        try:
            dx = _text(values.get("dx"))
            out.append(
                Row(
                    image_id=image_id,
                    lesion_id=_text(values.get("lesion_id")),
                    dx=dx.lower() if dx else None,
                    raw_dx=dx,
                    age=_age(values.get("age"), where, image_id),
                    sex=_lower(values.get("sex")),
                    localization=_lower(values.get("localization")),
                    where=where,
                )
            )
        except BadRow as bad:
            out.append(bad)
    return out


def _lower(value) -> str | None:
    text = _text(value)
    return text.lower() if text else None


def isic_row(key: str, data: bytes | Exception) -> Row | BadRow:
    """One ISIC JSON -> a record; the image_id is the file's stem."""
    image_id = posixpath.basename(key)[: -len(".json")]
    if isinstance(data, Exception):
        return BadRow(image_id, f"{key}: unreadable ({data})")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return BadRow(image_id, f"{key}: not valid JSON ({error})")
    if not isinstance(doc, dict) or not isinstance(doc.get("meta", {}), dict):
        return BadRow(image_id, f"{key}: not an ISIC metadata object")
    name = doc.get("name")
    if name is not None and name != image_id:
        return BadRow(image_id, f"{key}: names image {name!r}, not {image_id!r}")
    clinical = doc.get("meta", {}).get("clinical") or {}
    if not isinstance(clinical, dict):
        return BadRow(image_id, f"{key}: meta.clinical is not an object")
    diagnosis = _lower(clinical.get("diagnosis"))
    try:
        age = _age(clinical.get("age_approx"), key, image_id)
    except BadRow as bad:
        return bad
    return Row(
        image_id=image_id,
        lesion_id=_text(clinical.get("lesion_id")),
        dx=ISIC_DIAGNOSIS_TO_DX.get(diagnosis) if diagnosis else None,
        raw_dx=diagnosis,
        age=age,
        sex=_lower(clinical.get("sex")),
        localization=_lower(clinical.get("anatom_site_general")),
        where=key,
    )


def read_all(raw: Storage, keys: list[str]) -> list[bytes | Exception]:
    """Read metadata objects concurrently (one GET each on S3), in ``keys`` order."""

    def read(key: str) -> bytes | Exception:
        try:
            return raw.read_bytes(key)
        except (FileNotFoundError, ObjectRefused) as error:  # gone or refused for good: that row's problem
            return error
        # Anything else (the store not answering, permissions) fails the scan: a retry redoes it.

    if len(keys) <= 1:
        return [read(k) for k in keys]
    pool = ThreadPoolExecutor(max_workers=min(16, len(keys)))
    try:
        return list(pool.map(read, keys))
    finally:
        # After a failure the queued reads would each meet the same dead store: drop them.
        pool.shutdown(wait=False, cancel_futures=True)
