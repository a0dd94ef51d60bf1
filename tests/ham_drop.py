"""A real HAM10000 drop for the end-to-end tests: whole lesions, images with their masks, uploaded to S3."""

from __future__ import annotations

import csv
import io
from pathlib import Path


def metadata_rows(ham10000_dir: Path) -> list[dict]:
    with open(ham10000_dir / "HAM10000_metadata.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def pick_images(
    rows: list[dict], n_melanoma: int = 60, n_other: int = 140, skip_lesions: set[str] = frozenset()
) -> list[dict]:
    """Whole lesions, deterministically: melanoma lesions up to ``n_melanoma`` images, others up to ``n_other``."""
    by_lesion: dict[str, list[dict]] = {}
    for row in rows:
        if row["lesion_id"] not in skip_lesions:
            by_lesion.setdefault(row["lesion_id"], []).append(row)
    chosen, counts = [], {True: 0, False: 0}
    limits = {True: n_melanoma, False: n_other}
    for lesion_id in sorted(by_lesion):
        lesion_rows = by_lesion[lesion_id]
        melanoma = lesion_rows[0]["dx"] == "mel"
        if counts[melanoma] + len(lesion_rows) <= limits[melanoma]:
            chosen += lesion_rows
            counts[melanoma] += len(lesion_rows)
    return chosen


def metadata_csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def upload_images(s3, bucket: str, prefix: str, ham10000_dir: Path, chosen: list[dict]) -> None:
    """Each image under ``HAM10000_images_part_1/`` and its mask under ``masks/`` (the metadata is the caller's)."""
    for row in chosen:
        image_id = row["image_id"]
        s3.upload_file(
            str(ham10000_dir / "images" / f"{image_id}.jpg"),
            bucket,
            f"{prefix}/HAM10000_images_part_1/{image_id}.jpg",
        )
        s3.upload_file(
            str(ham10000_dir / "masks" / f"{image_id}_segmentation.png"),
            bucket,
            f"{prefix}/masks/{image_id}_segmentation.png",
        )
