"""The shard format: preprocessed images with their labels and metadata, in one object.

A shard is an uncompressed zip holding

- ``images.npy``: uint8 array of shape (N, 224, 224, 3), RGB;
- ``masks.npy``: uint8 array of shape (N, 224, 224), 255 inside the lesion, 0 outside;
  rows of images without a mask are all zero and their record says ``has_mask: false``;
- ``records.json``: a list of N dicts, one per image, in the same order.

Why this format: writing it costs no image re-encoding (the Spark job's hot path), any
process reads it with numpy alone (``allow_pickle=False``: nothing is unpickled), and zip
members get a fixed timestamp so the same inputs give byte-identical shards, which makes
reruns verifiable by checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 224
#: Fields every record carries (metadata fields may be ``None`` when a drop lacks them).
RECORD_FIELDS = (
    "image_id",
    "lesion_id",
    "label",  # 1 = melanoma, 0 = not melanoma
    "dx",
    "split",  # train / val / test
    "source_drop",
    "kind",  # original / augmented
    "augment_of",  # image_id of the original for augmented copies, else None
    "age",
    "sex",
    "localization",
    "has_mask",
    "conversions",  # list of notes such as "grayscale->rgb", "exif-rotated"
)
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class Shard:
    """Decoded shard contents.

    images: uint8 (N, 224, 224, 3); masks: uint8 (N, 224, 224); records: N dicts.
    """

    images: np.ndarray
    masks: np.ndarray
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)


def _npy_header(array: np.ndarray) -> bytes:
    """The .npy header numpy's ``np.save`` would write for ``array`` (format 1.0)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
    return buffer.getvalue()


def encode_shard(images: np.ndarray, masks: np.ndarray, records: list[dict]) -> bytes:
    """Serialise one shard; identical inputs give identical bytes.

    images: uint8 (N, 224, 224, 3); masks: uint8 (N, 224, 224); records: N dicts.
    The arrays stream into the zip member by member (header, then the array's own buffer):
    the same bytes ``np.save`` + ``ZipFile.writestr`` give, without copying each array
    twice more on the Spark job's hot path.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"images must be uint8 (N,{IMAGE_SIZE},{IMAGE_SIZE},3), got {images.dtype} {images.shape}"
        )
    if masks.dtype != np.uint8 or masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be uint8 {images.shape[:3]}, got {masks.dtype} {masks.shape}")
    if len(records) != len(images):
        raise ValueError(f"{len(records)} records for {len(images)} images")
    images, masks = np.ascontiguousarray(images), np.ascontiguousarray(masks)
    members = {
        "images.npy": (_npy_header(images), memoryview(images).cast("B")),
        "masks.npy": (_npy_header(masks), memoryview(masks).cast("B")),
        "records.json": (json.dumps(records, sort_keys=True, separators=(",", ":")).encode(),),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, parts in members.items():
            info = zipfile.ZipInfo(name, date_time=_FIXED_ZIP_TIME)
            info.external_attr = 0o644 << 16
            # Known size up front, as writestr sets it: same header, no zip64 or data descriptor.
            info.file_size = sum(len(part) for part in parts)
            with archive.open(info, mode="w") as member:
                for part in parts:
                    member.write(part)
    return buffer.getvalue()


def decode_shard(data: bytes) -> Shard:
    """Read a shard written by :func:`encode_shard` (no pickle is ever loaded)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        images = np.load(io.BytesIO(archive.read("images.npy")), allow_pickle=False)
        masks = np.load(io.BytesIO(archive.read("masks.npy")), allow_pickle=False)
        records = json.loads(archive.read("records.json"))
    if len(records) != len(images) or masks.shape != images.shape[:3]:
        raise ValueError("corrupt shard: images, masks and records disagree in length")
    return Shard(images=images, masks=masks, records=records)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
