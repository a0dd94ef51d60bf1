"""Scanning one data drop, ``<raw_root>/<drop_id>/``: its layout, its inputs, its quarantine.

Two layouts are understood (:func:`detect_layout`):

- ``ham10000``: a ``*metadata*.csv`` with at least ``image_id`` and ``dx`` columns (several
  such CSVs are read as one table), images in any subfolders (``HAM10000_images_part_1/``,
  ``images/``...), named ``<image_id>.<ext>``; optional masks anywhere, named
  ``<image_id>_segmentation.png``.
- ``isic``: one ``ISIC_*.json`` per image (the ISIC archive's ``meta.clinical`` record), the
  image ``ISIC_*.<ext>`` beside it (any folder of the drop is searched).

Accounting (the rule the manifest's ``inputs == written + quarantined`` rests on):

- Every metadata row (CSV row or JSON file) and every image file is an input, identified by
  its image_id (the file name without extension for files). A row and its image file are
  ONE input; so for one image_id with ``r`` rows and ``f`` files there are ``r + f - 1``
  inputs when both are present, else ``r`` or ``f``. Masks are not inputs: they ride along
  with their image.
- Each input ends up in exactly one place: ``DropScan.inputs`` (ready to decode) or
  ``DropScan.quarantined`` (with a reason), so ``n_inputs == len(inputs) + len(quarantined)``
  holds exactly; :func:`scan_drop` counts ``n_inputs`` independently and checks it.
- Later, a Spark decode failure moves an input from ``inputs`` to the quarantine (with the
  :class:`melanoma.image_header.RejectedImage` reason), which keeps the equation true.

Quarantine reasons at scan time:

- ``image-id-path``: the image_id holds ``/``, ``\\``, ``..`` or other characters outside
  ``[A-Za-z0-9._-]``; such an id is never used to build a key.
- ``duplicate-image-id``: second and later rows of an image_id, and second and later files
  of one (the same image in ``part_1`` and ``part_2``). The first row and first file (in key
  order) stay an input, unless the duplicate rows disagree, in which case all of them are
  quarantined: picking one label would be a guess.
- ``missing-image``: a row without an image file.
- ``missing-metadata``: an image file without a row (or JSON).
- ``unknown-dx``: a diagnosis outside :data:`melanoma.drop_metadata.DX_CODES` (ISIC diagnoses are mapped first).
- ``bad-metadata``: a row or JSON that cannot be parsed (wrong column count, unreadable
  JSON, no image_id, a non-numeric age...).
- ``bad-key``: an object whose name cannot be addressed safely (``//``, ``/./``, ``/../``,
  ``\\`` in a local folder name); every such object is one input, whatever it holds.
- ``refused-object``: an object the store refuses to read for good (a symlink leaving a local
  root); a refused metadata file is one input, and its rows' images become ``missing-metadata``.

Scanning costs one listing and reads of the metadata files only, never image bytes.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from dataclasses import asdict, dataclass, field

from melanoma.drop_metadata import DX_CODES, BadRow, Row, ham_rows, isic_row, read_all
from melanoma.storage import ObjectRefused, Storage, is_valid_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "MASK_SUFFIX",
    "DropError",
    "DropScan",
    "InputItem",
    "QuarantineEntry",
    "detect_layout",
    "is_safe_image_id",
    "scan_drop",
]

LAYOUTS = ("ham10000", "isic")
#: Extensions of files treated as images (compared lowercased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
MASK_SUFFIX = "_segmentation.png"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ISIC_JSON = re.compile(r"^ISIC_[^/]*\.json$")
_METADATA_CSV = re.compile(r"^[^/]*metadata[^/]*\.csv$", re.IGNORECASE)


class DropError(ValueError):
    """A drop cannot be scanned at all (unknown layout, unreadable metadata table)."""


@dataclass
class InputItem:
    """One image ready to decode. Keys are relative to the raw storage root."""

    image_id: str
    image_key: str
    mask_key: str | None
    lesion_id: str
    dx: str
    label: int  # 1 = melanoma, 0 = not
    age: float | None
    sex: str | None
    localization: str | None
    source_drop: str
    layout: str


@dataclass
class QuarantineEntry:
    """An input that will not be written, and why. ``item`` is the image_id or object key."""

    drop_id: str
    item: str
    reason: str
    detail: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DropScan:
    """Outcome of :func:`scan_drop`; ``n_inputs == len(inputs) + len(quarantined)``."""

    drop_id: str
    layout: str
    inputs: list[InputItem] = field(default_factory=list)
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    n_inputs: int = 0
    #: key -> size of every object of the drop when it was scanned (late files are found against it).
    listing: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# A drop's listing and layout


def _drop_listing(raw: Storage, drop_id: str) -> dict[str, int]:
    """key -> size of every object of the drop (odd keys included: the scan quarantines them)."""
    if not drop_id or "/" in drop_id or drop_id in (".", ".."):
        raise DropError(f"invalid drop id {drop_id!r}")
    listing = raw.list_objects(drop_id)
    if not listing:
        raise DropError(f"drop {drop_id!r} is empty or does not exist under {raw.root_uri}")
    return listing


def _drop_keys(raw: Storage, drop_id: str) -> list[str]:
    return sorted(k for k in _drop_listing(raw, drop_id) if is_valid_key(k))


def _metadata_tables(
    raw: Storage, keys: list[str], refused: list[str] | None = None
) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every ``*metadata*.csv`` holding ``image_id`` and ``dx`` columns: key -> (header, rows).

    A metadata file the store refuses for good is appended to ``refused`` (when given) instead.
    """
    tables = {}
    for key in keys:
        if not _METADATA_CSV.match(posixpath.basename(key)):
            continue
        try:
            text = raw.read_bytes(key).decode("utf-8-sig")
        except ObjectRefused:
            if refused is None:
                raise
            refused.append(key)
            continue
        except UnicodeDecodeError as error:
            raise DropError(f"{key} is not UTF-8 text: {error}") from None
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows:
            continue
        header = [name.strip() for name in rows[0]]
        if "image_id" in header and "dx" in header:
            tables[key] = (header, [row for row in rows[1:] if any(cell.strip() for cell in row)])
    return tables


def _layout_from(keys: list[str], tables: dict) -> str:
    has_json = any(_ISIC_JSON.match(posixpath.basename(k)) for k in keys)
    if tables and has_json:
        raise DropError(f"ambiguous drop: both a metadata CSV ({', '.join(tables)}) and ISIC_*.json files")
    if tables:
        return "ham10000"
    if has_json:
        return "isic"
    raise DropError(
        "unknown drop layout: expected a *metadata*.csv with image_id and dx columns (ham10000) "
        f"or ISIC_*.json files (isic); found {len(keys)} files such as {', '.join(keys[:3])}"
    )


def detect_layout(raw: Storage, drop_id: str) -> str:
    """``"ham10000"`` or ``"isic"`` from the files of the drop; :class:`DropError` otherwise."""
    keys = _drop_keys(raw, drop_id)
    return _layout_from(keys, _metadata_tables(raw, keys))


# ---------------------------------------------------------------------------------------
# Matching rows with files


def _is_mask(key: str) -> bool:
    return posixpath.basename(key).lower().endswith(MASK_SUFFIX)


def _image_files(keys: list[str]) -> dict[str, list[str]]:
    """image_id (file stem) -> image keys, in key order; masks excluded."""
    files: dict[str, list[str]] = {}
    for key in keys:
        name = posixpath.basename(key)
        stem, ext = posixpath.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and not _is_mask(key):
            files.setdefault(stem, []).append(key)
    return files


def _mask_files(keys: list[str]) -> dict[str, str]:
    """image_id -> mask key; with several masks for one id, the first in key order is used."""
    masks: dict[str, str] = {}
    for key in keys:
        if _is_mask(key):
            masks.setdefault(posixpath.basename(key)[: -len(MASK_SUFFIX)], key)
    return masks


def is_safe_image_id(image_id: str) -> bool:
    """True for ids usable in keys and file names: ``[A-Za-z0-9][A-Za-z0-9._-]*`` without ``..``."""
    return bool(_SAFE_ID.match(image_id)) and ".." not in image_id


def _row_fields(row: Row) -> tuple:
    return (row.lesion_id, row.dx, row.raw_dx, row.age, row.sex, row.localization)


class _Collector:
    """Accumulates a scan's outcome; one call per input."""

    def __init__(self, drop_id: str, layout: str) -> None:
        self.drop_id, self.layout = drop_id, layout
        self.inputs: list[InputItem] = []
        self.quarantined: list[QuarantineEntry] = []

    def quarantine(self, item: str, reason: str, detail: str) -> None:
        self.quarantined.append(QuarantineEntry(self.drop_id, item, reason, detail))

    def accept(self, row: Row, image_key: str, mask_key: str | None) -> None:
        if row.dx not in DX_CODES:
            shown = row.raw_dx if row.raw_dx is not None else "no diagnosis"
            self.quarantine(
                row.image_id,
                "unknown-dx",
                f"{row.where}: diagnosis {shown!r} is not one of {', '.join(DX_CODES)}",
            )
            return
        self.inputs.append(
            InputItem(
                image_id=row.image_id,
                image_key=image_key,
                mask_key=mask_key,
                # Without a lesion id, one lesion per image: nothing in the drop links this
                # image to another, so no grouping can be justified.
                lesion_id=row.lesion_id or row.image_id,
                dx=row.dx,
                label=1 if row.dx == "mel" else 0,
                age=row.age,
                sex=row.sex,
                localization=row.localization,
                source_drop=self.drop_id,
                layout=self.layout,
            )
        )


def _settle_id(
    out: _Collector, image_id: str, rows: list[Row], files: list[str], mask_key: str | None
) -> None:
    """Put every input of one image_id (its rows and files) in inputs or quarantine."""
    if not is_safe_image_id(image_id):
        # One entry per input: the first row and first file together, then each extra.
        places = [r.where for r in rows] + files
        if rows and files:
            places = [f"{rows[0].where} and {files[0]}"] + places[1 : len(rows)] + files[1:]
        for where in places:
            out.quarantine(
                image_id, "image-id-path", f"{where}: image_id {image_id!r} is not a safe file name"
            )
        return
    if not files:
        out.quarantine(
            image_id, "missing-image", f"{rows[0].where}: no image file named {image_id}.<ext> in the drop"
        )
        for row in rows[1:]:
            out.quarantine(image_id, "duplicate-image-id", f"{row.where}: repeats image_id {image_id!r}")
        return
    if not rows:
        for key in files:
            out.quarantine(key, "missing-metadata", f"{key}: no metadata for image_id {image_id!r}")
        return
    first, extra_rows = rows[0], rows[1:]
    conflicting = any(_row_fields(row) != _row_fields(first) for row in extra_rows)
    if conflicting:
        places = ", ".join(row.where for row in rows)
        out.quarantine(
            image_id,
            "duplicate-image-id",
            f"{first.where}: image_id {image_id!r} has conflicting rows ({places})",
        )
    else:
        out.accept(first, files[0], mask_key)
    for row in extra_rows:
        out.quarantine(
            image_id, "duplicate-image-id", f"{row.where}: repeats image_id {image_id!r} of {first.where}"
        )
    for key in files[1:]:
        out.quarantine(
            key, "duplicate-image-id", f"{key}: second file for image_id {image_id!r} (using {files[0]})"
        )


def _count_inputs(parsed: list, files: dict[str, list[str]]) -> int:
    """The accounting rule counted on its own: rows + files - (ids having both)."""
    row_ids = {row.image_id for row in parsed}
    paired = sum(1 for image_id in files if image_id in row_ids)
    return len(parsed) + sum(len(keys) for keys in files.values()) - paired


def scan_drop(raw: Storage, drop_id: str, layout: str = "auto") -> DropScan:
    """Everything in ``<raw root>/<drop_id>/`` as inputs or quarantine entries.

    ``layout`` is ``"auto"`` (see :func:`detect_layout`), ``"ham10000"`` or ``"isic"``.
    Inputs are sorted by image_id and quarantine entries by (item, reason, detail), so the
    result (and any partitioning built on it) is deterministic. Reads the listing once and
    the metadata files only. Raises :class:`DropError` when the drop cannot be scanned at all.
    """
    if layout not in ("auto",) + LAYOUTS:
        raise DropError(f"unknown layout {layout!r} (expected auto, {', '.join(LAYOUTS)})")
    listing = _drop_listing(raw, drop_id)
    bad_keys = sorted(k for k in listing if not is_valid_key(k))
    keys = sorted(k for k in listing if is_valid_key(k))
    refused: list[str] = []
    tables = _metadata_tables(raw, keys, refused) if layout in ("auto", "ham10000") else {}
    if layout == "auto":
        # A refused metadata CSV still makes a HAM10000 drop (its images then lack metadata).
        has_json = any(_ISIC_JSON.match(posixpath.basename(k)) for k in keys)
        layout = "ham10000" if refused and not tables and not has_json else _layout_from(keys, tables)

    if layout == "ham10000":
        if not tables and not refused:
            raise DropError(f"drop {drop_id!r} has no *metadata*.csv with image_id and dx columns")
        parsed = [r for key, (header, rows) in sorted(tables.items()) for r in ham_rows(key, header, rows)]
    else:
        json_keys = [k for k in keys if _ISIC_JSON.match(posixpath.basename(k))]
        parsed = [isic_row(key, data) for key, data in zip(json_keys, read_all(raw, json_keys))]

    out = _Collector(drop_id, layout)
    for key in bad_keys:  # never read nor written: the key cannot be addressed safely
        out.quarantine(
            key, "bad-key", f"object name {key!r} has an empty, '.' or '..' segment or a backslash"
        )
    for key in refused:
        out.quarantine(
            key,
            "refused-object",
            f"{key}: the store refuses to read it (a symlink leaving the root?); its rows are unknown",
        )
    keys = [k for k in keys if k not in refused]
    rows_by_id: dict[str, list[Row]] = {}
    bad_ids: set[str] = set()
    for row in parsed:
        if isinstance(row, BadRow):
            out.quarantine(row.item, "bad-metadata", row.detail)
            bad_ids.add(row.image_id)
        else:
            rows_by_id.setdefault(row.image_id, []).append(row)
    files = _image_files(keys)
    masks = _mask_files(keys)
    for image_id in sorted(bad_ids - set(rows_by_id)):
        # The file of an unparsable row is part of that bad-metadata input (a row and its
        # file are one input); only its extra copies are inputs of their own.
        extra = files.pop(image_id, [])[1:]
        for key in extra:
            out.quarantine(key, "duplicate-image-id", f"{key}: another file for image_id {image_id!r}")
    for image_id in sorted(set(rows_by_id) | set(files)):
        _settle_id(out, image_id, rows_by_id.get(image_id, []), files.get(image_id, []), masks.get(image_id))

    scan = DropScan(
        drop_id=drop_id,
        layout=layout,
        inputs=sorted(out.inputs, key=lambda item: item.image_id),
        quarantined=sorted(out.quarantined, key=lambda e: (e.item, e.reason, e.detail)),
        n_inputs=_count_inputs(parsed, _image_files(keys)) + len(bad_keys) + len(refused),
        listing=listing,
    )
    if scan.n_inputs != len(scan.inputs) + len(scan.quarantined):
        raise AssertionError(
            f"drop {drop_id}: accounting broken, {scan.n_inputs} inputs but "
            f"{len(scan.inputs)} accepted + {len(scan.quarantined)} quarantined"
        )
    return scan
