"""Builds a HAM10000-layout drop holding every kind of bad and convertible input, for tests.

:func:`build_bad_drop` writes the drop and returns what each image_id must turn into: a
quarantine reason (scan time or decode time), a conversion note that decoding must report,
or ``"ok"``. Scan-time and decode-time reasons are listed in :data:`SCAN_REASONS` and
:data:`DECODE_REASONS` so tests can tell which stage owes the verdict.

Everything is generated with numpy, OpenCV and Pillow in well under a second; real
HAM10000 images are copied in when given.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", "/work/shared/data"))
SCAN_REASONS = {
    "image-id-path",
    "duplicate-image-id",
    "missing-image",
    "missing-metadata",
    "unknown-dx",
    "bad-metadata",
}
DECODE_REASONS = {
    "empty-file",
    "truncated",
    "not-an-image",
    "decompression-bomb",
    "undecodable",
    "bad-dimensions",
}
#: The notes the bad corpus's convertible images are written with (one image each, at least).
CONVERSION_NOTES = {
    "png-content",
    "alpha-dropped",
    "grayscale->rgb",
    "cmyk->rgb",
    "16bit->8bit",
    "exif-rotated",
}
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def require_shared_data(*parts: str) -> Path:
    """``SHARED_DATA/<parts>``; skip the test when absent, but fail under ``CI=true``."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"{path} is absent (the shared HAM10000 / ISIC sample data set)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must provide it")
        pytest.skip(f"{message}; set MELANOMA_SHARED_DATA to run this test")
    return path


def synthetic_lesion(width: int, height: int, seed: int) -> np.ndarray:
    """A dark ellipse on a skin tone with noise: uint8 (height, width, 3) RGB."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (224, 172, 150)
    centre = (int(width * rng.uniform(0.35, 0.65)), int(height * rng.uniform(0.35, 0.65)))
    axes = (max(2, int(width * rng.uniform(0.15, 0.3))), max(2, int(height * rng.uniform(0.15, 0.3))))
    cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, (110, 70, 50), -1)
    # Uniform noise in [-8, 7] from random bytes: far cheaper than Gaussian at 12 MP.
    noise = (rng.integers(0, 256, image.shape, dtype=np.uint8) >> 4).astype(np.int16) - 8
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def lesion_mask(rgb: np.ndarray) -> np.ndarray:
    """The dark ellipse of :func:`synthetic_lesion` as a (H, W) uint8 0/255 mask."""
    return np.where(rgb.mean(axis=2) < 140, np.uint8(255), np.uint8(0))


def jpeg_bytes(rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    assert ok
    return encoded.tobytes()


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an OpenCV-ordered array: (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA, 8 or 16 bit."""
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_bomb(side: int = 30_000) -> bytes:
    """A genuine PNG bomb: 1-bit gray, ``side`` x ``side`` pixels, ~110 KB for 30000.

    Any decoder expanding it to 8-bit RGB would allocate side*side*3 bytes (2.7 GB).
    """
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed zero bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def corrupt_png(rgb: np.ndarray) -> bytes:
    """A structurally complete PNG (IHDR, IDAT, IEND) whose IDAT is not zlib data."""
    height, width = rgb.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    garbage = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", garbage)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_with_declared_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a JPEG's SOF dimensions: a tiny file declaring a huge frame (a JPEG bomb)."""
    pos = 2
    while pos < len(data):
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]
        pos += 2 + length
    raise ValueError("no SOF0/1/2 marker in this JPEG")


def exif_rotated_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    """JPEG storing ``rgb`` as is, with an EXIF orientation tag telling viewers to turn it."""
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = orientation
    return pil_bytes(image, "JPEG", quality=92, exif=exif.tobytes())


def _row(image_id: str, dx: str = "nv", lesion_id: str | None = None, age: str = "50.0") -> list[str]:
    return [lesion_id or f"HAM_{image_id}", image_id, dx, "histo", age, "female", "back"]


def build_bad_drop(root: Path, drop_id: str, good_images: list[Path] | None = None) -> dict[str, str]:
    """Write ``root/drop_id`` in HAM10000 layout; return {image_id: expected reason, note or "ok"}.

    ``good_images``: real JPEGs to copy in (their masks too when a sibling ``masks/`` folder
    has them); otherwise three synthetic ones are generated, with masks.
    """
    drop = Path(root) / drop_id
    part1, part2, masks = drop / "HAM10000_images_part_1", drop / "HAM10000_images_part_2", drop / "masks"
    for folder in (part1, part2, masks):
        folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    rows: list[list[str]] = []
    base = synthetic_lesion(200, 150, seed=0)

    def add(
        image_id: str,
        data: bytes | None,
        expect: str,
        *,
        folder: Path = part1,
        ext: str = ".jpg",
        dx: str = "nv",
        row: bool = True,
    ) -> None:
        if data is not None:
            (folder / f"{image_id}{ext}").write_bytes(data)
        if row:
            rows.append(_row(image_id, dx))
        expected[image_id] = expect

    # Good images, alternating nv / mel.
    if good_images:
        for index, path in enumerate(good_images):
            add(path.stem, path.read_bytes(), "ok", dx="mel" if index % 2 else "nv")
            mask = path.parent.parent / "masks" / f"{path.stem}_segmentation.png"
            if mask.exists():
                shutil.copyfile(mask, masks / mask.name)
    else:
        for index in range(3):
            rgb = synthetic_lesion(200, 150, seed=10 + index)
            add(
                f"good_{index}",
                jpeg_bytes(rgb),
                "ok",
                folder=part2 if index % 2 else part1,
                dx="mel" if index % 2 else "nv",
            )
            (masks / f"good_{index}_segmentation.png").write_bytes(png_bytes(lesion_mask(rgb)))

    # Refused at decode time.
    full = jpeg_bytes(base)
    full_png = png_bytes(cv2.cvtColor(base, cv2.COLOR_RGB2BGR))
    add("bad_empty", b"", "empty-file")
    add("bad_truncated", full[: len(full) // 2], "truncated")
    add("bad_truncated_header", full[:300], "truncated")
    add("bad_truncated_png", full_png[: len(full_png) // 2], "truncated", ext=".png")
    add("bad_text", b"<html><body>403 Forbidden</body></html>\n", "not-an-image")
    add("bad_bomb_png", png_bomb(), "decompression-bomb", ext=".png")
    add("bad_bomb_jpeg", jpeg_with_declared_size(full, 30_000, 30_000), "decompression-bomb")
    add("bad_corrupt_png", corrupt_png(base), "undecodable", ext=".png")
    add("bad_tiny", jpeg_bytes(synthetic_lesion(16, 12, seed=2)), "bad-dimensions")
    add("bad_elongated", jpeg_bytes(synthetic_lesion(1000, 100, seed=3)), "bad-dimensions")

    # Refused at scan time.
    rows.append(_row("../x"))
    expected["../x"] = "image-id-path"
    add("bad id", full, "image-id-path")  # a space: not a safe file name
    add("dup_row", full, "duplicate-image-id")
    rows.append(_row("dup_row"))  # identical second row: first kept, second quarantined
    add("dup_file", full, "duplicate-image-id")
    (part2 / "dup_file.jpg").write_bytes(full)  # the same image in both parts
    add("dup_conflict", full, "duplicate-image-id")
    rows.append(_row("dup_conflict", dx="mel"))  # disagrees: every row quarantined
    add("no_image", None, "missing-image")
    add("no_row", full, "missing-metadata", row=False)
    add("unknown_dx", full, "unknown-dx", dx="melanocytic?")
    add("bad_age", full, "bad-metadata", row=False)
    rows.append(_row("bad_age", age="fifty"))
    add("bad_columns", full, "bad-metadata", row=False)
    rows.append(_row("bad_columns") + ["extra"])

    # Converted, each with its note.
    add("conv_png_as_jpg", full_png, "png-content")
    rgba = cv2.cvtColor(cv2.cvtColor(base, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2BGRA)
    rgba[:20, :20, 3] = 0
    add("conv_rgba", png_bytes(rgba), "alpha-dropped", ext=".png")
    add("conv_gray", pil_bytes(Image.fromarray(base).convert("L"), "JPEG", quality=92), "grayscale->rgb")
    add("conv_cmyk", pil_bytes(Image.fromarray(base).convert("CMYK"), "JPEG", quality=92), "cmyk->rgb")
    add(
        "conv_16bit",
        png_bytes(cv2.cvtColor(base, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257),
        "16bit->8bit",
        ext=".png",
    )
    add("conv_exif", exif_rotated_jpeg(base, 6), "exif-rotated")
    add("conv_large", jpeg_bytes(synthetic_lesion(4000, 3000, seed=4), quality=85), "ok", folder=part2)

    with open(drop / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return expected
