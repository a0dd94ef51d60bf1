"""The shard format: byte-for-byte what np.save + ZipFile.writestr give, and it round-trips."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from melanoma.records import decode_shard, encode_shard, sha256_hex


def reference_shard(images: np.ndarray, masks: np.ndarray, records: list[dict]) -> bytes:
    """The format written the obvious way: np.save each array, writestr each member."""

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in (
            ("images.npy", npy(images)),
            ("masks.npy", npy(masks)),
            ("records.json", json.dumps(records, sort_keys=True, separators=(",", ":")).encode()),
        ):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


@pytest.mark.parametrize("n", [1, 3, 37])
def test_encode_shard_matches_the_plain_numpy_and_zipfile_bytes(n: int) -> None:
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    masks = (rng.integers(0, 2, (n, 224, 224), dtype=np.uint8) * 255).astype(np.uint8)
    records = [{"image_id": f"ISIC_{i:07d}", "label": i % 2, "note": "é<>"} for i in range(n)]

    data = encode_shard(images, masks, records)

    assert data == reference_shard(images, masks, records)
    assert sha256_hex(data) == sha256_hex(encode_shard(images.copy(), masks.copy(), records))
    shard = decode_shard(data)
    np.testing.assert_array_equal(shard.images, images)
    np.testing.assert_array_equal(shard.masks, masks)
    assert shard.records == records


def test_encode_shard_accepts_non_contiguous_arrays() -> None:
    images = np.arange(2 * 224 * 448 * 3, dtype=np.uint64).astype(np.uint8).reshape(2, 224, 448, 3)[:, :, ::2]
    masks = np.zeros((2, 224, 224), np.uint8)
    assert not images.flags["C_CONTIGUOUS"]
    data = encode_shard(images, masks, [{}, {}])
    assert data == reference_shard(np.ascontiguousarray(images), masks, [{}, {}])


def test_encode_shard_refuses_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="images must be uint8"):
        encode_shard(np.zeros((1, 10, 10, 3), np.uint8), np.zeros((1, 10, 10), np.uint8), [{}])
    with pytest.raises(ValueError, match="1 records for 2 images"):
        encode_shard(np.zeros((2, 224, 224, 3), np.uint8), np.zeros((2, 224, 224), np.uint8), [{}])
