"""Header-checked decoding of image bytes to display-oriented uint8 pixels.

:func:`decode_rgb` checks the header (:func:`melanoma.image_header.checked_header`), decodes,
and converts whatever it finds (grayscale, CMYK, alpha, 16-bit, EXIF orientation, PNG content
under a ``.jpg`` name) into uint8 RGB, returning a note per conversion (:data:`NOTES`). JPEGs
at least twice the target size are decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling,
which is both faster and a proper low-pass before the final resize. :func:`decode_mask` does
the same for segmentation masks, down to a binary (size, size) mask.

EXIF orientation is applied by this module, not by OpenCV: every decode passes
``IMREAD_IGNORE_ORIENTATION`` and the orientation read from the header is applied with
numpy. OpenCV applies orientation in some read modes but not others (``IMREAD_UNCHANGED``
ignores it), so doing it ourselves gives one behaviour for every format and read mode, and
the ``exif-rotated`` note is always true to what was done.

numpy and OpenCV only: runs inside Spark executors, never imports TensorFlow or PySpark.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from melanoma.image_header import MAX_PIXELS, ImageHeader, RejectedImage, checked_header
from melanoma.records import IMAGE_SIZE

__all__ = ["NOTES", "decode_mask", "decode_rgb", "jpeg_scale_factor"]

#: Conversion notes :func:`decode_rgb` can return (records keep them as ``conversions``).
NOTES = (
    "png-content",  # the content is PNG (named .jpg or not); generally "<format>-content"
    "grayscale->rgb",  # one gray channel replicated to three
    "cmyk->rgb",  # 4-component (Adobe CMYK / YCCK) JPEG converted by libjpeg + OpenCV
    "palette->rgb",  # indexed colours expanded
    "alpha-dropped",  # alpha channel discarded (see _drop_alpha for why not composited)
    "16bit->8bit",  # 16-bit samples scaled to 8 bits (round(v / 257))
    "exif-rotated",  # EXIF orientation 2..8 applied
)


def jpeg_scale_factor(width: int, height: int, target_size: int) -> int:
    """Largest DCT reduction (8, 4, 2 or 1) keeping the short side >= ``target_size``.

    libjpeg rounds scaled sizes up (``ceil(side / factor)``), hence the ceil here.
    """
    short = min(width, height)
    for factor in (8, 4, 2):
        if math.ceil(short / factor) >= target_size:
            return factor
    return 1


_REDUCED_FLAGS = {1: 0, 2: 16, 4: 32, 8: 64}  # the IMREAD_REDUCED_* bits without the colour bit


# ---------------------------------------------------------------------------------------
# Pixel conversions, one job each (their notes come from the header: see _format_notes)


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored (H, W, ...) array into its display orientation (EXIF values 1..8)."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return np.rot90(array, k=-1)[::-1, :]
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint16 (H, W[, C]) -> uint8 by round(v / 257), which maps 0..65535 onto 0..255 exactly."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return cv2.convertScaleAbs(array, alpha=1 / 257)
    raise RejectedImage("undecodable", f"unsupported sample type {array.dtype} (only 8- and 16-bit images)")


def _drop_alpha(bgra: np.ndarray) -> np.ndarray:
    """(H, W, 4) BGRA -> (H, W, 3) BGR, keeping colours as stored.

    Dropped rather than composited on white: dermoscopy fields are framed by a black
    vignette, and pixels an exporter made transparent are that frame; compositing would
    paint them white, a border no training image has.
    """
    return np.ascontiguousarray(bgra[:, :, :3])


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """OpenCV's (H, W), (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA -> (H, W, 3) RGB."""
    if array.ndim == 2 or array.shape[2] == 1:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.shape[2] == 4:
        array = _drop_alpha(array)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _reduce_like_dct(array: np.ndarray, target_size: int) -> np.ndarray:
    """Shrink a fully decoded non-JPEG by the factor a JPEG would get, so large images of any
    format reach the final bilinear resize at a similar scale (INTER_AREA is the box filter
    that DCT scaling approximates)."""
    height, width = array.shape[:2]
    factor = jpeg_scale_factor(width, height, target_size)
    if factor == 1:
        return array
    size = (math.ceil(width / factor), math.ceil(height / factor))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


def _imdecode(data: bytes, flags: int, header: ImageHeader) -> np.ndarray:
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:
        if error.code == cv2.Error.StsNoMem:
            # The machine's state, not the file's: a retry with more memory decodes it.
            raise MemoryError(
                f"OpenCV ran out of memory decoding a {header.width}x{header.height} {header.format}"
            ) from error
        raise RejectedImage(
            "undecodable", f"OpenCV cannot decode this {header.format}: {error}".strip()
        ) from None
    if array is None:
        # Cut-short files were caught by checked_header before decoding; what is left is
        # data libjpeg/libpng refuse outright.
        raise RejectedImage(
            "undecodable",
            f"OpenCV cannot decode this {header.format} ({header.width}x{header.height}, {len(data)} bytes)",
        )
    return array


def _expect_shape(array: np.ndarray, width: int, height: int, header: ImageHeader) -> None:
    if array.shape[:2] != (height, width):
        raise RejectedImage(
            "undecodable",
            f"decoded {array.shape[1]}x{array.shape[0]} but the {header.format} header declares {header.width}x{header.height}",
        )


def _format_notes(header: ImageHeader) -> list[str]:
    """Notes implied by the header alone, in a fixed order."""
    notes = []
    if header.format != "jpeg":
        notes.append(f"{header.format}-content")
    if header.color == "gray":
        notes.append("grayscale->rgb")
    elif header.color in ("cmyk", "ycck"):
        notes.append("cmyk->rgb")
    elif header.color == "palette":
        notes.append("palette->rgb")
    if header.has_alpha:
        notes.append("alpha-dropped")
    if header.bit_depth == 16:
        notes.append("16bit->8bit")
    return notes


def decode_rgb(
    data: bytes, *, target_size: int = IMAGE_SIZE, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, list[str]]:
    """Decode image bytes to display-oriented RGB, converting rather than refusing.

    Returns ``(rgb, notes)``: rgb is uint8 (H, W, 3), C-contiguous. JPEGs whose short side
    is at least 2x/4x/8x ``target_size`` come back at 1/2, 1/4 or 1/8 of their size (short
    side still >= ``target_size``); other formats are shrunk by the same factor after a full
    decode. ``notes`` lists each conversion made (see :data:`NOTES`).

    Raises :class:`RejectedImage` with a reason from :data:`melanoma.image_header.REASONS`.
    """
    header = checked_header(data, max_pixels)
    notes = _format_notes(header)
    if header.format == "jpeg":
        factor = jpeg_scale_factor(header.width, header.height, target_size)
        flags = _REDUCED_FLAGS[factor] | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
        rgb = _imdecode(data, flags, header)
        _expect_shape(rgb, math.ceil(header.width / factor), math.ceil(header.height / factor), header)
        if rgb.dtype != np.uint8:
            # 12-bit JPEGs hold 0..4095: scaling them like 16-bit data would darken them.
            raise RejectedImage(
                "undecodable", f"{header.bit_depth}-bit JPEG decoded as {rgb.dtype}: unsupported"
            )
    else:
        # UNCHANGED keeps 16-bit samples and alpha so they are converted (and noted) here,
        # the same way for every format.
        raw = _imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION, header)
        _expect_shape(raw, header.width, header.height, header)
        if raw.dtype != np.uint8 and "16bit->8bit" not in notes:
            notes.append("16bit->8bit")
        if raw.ndim == 3 and raw.shape[2] == 4 and header.channels is None and "alpha-dropped" not in notes:
            # Only when the header could not say: a CMYK TIFF also decodes to 4 channels,
            # converted by libtiff, with an opaque fourth one.
            notes.append("alpha-dropped")
        rgb = _reduce_like_dct(_to_rgb(_to_uint8(raw)), target_size)
    if header.orientation != 1:
        rgb = _apply_orientation(rgb, header.orientation)
        notes.append("exif-rotated")
    return np.ascontiguousarray(rgb), notes


# Share of pixels allowed to sit between clear background and clear lesion: JPEG-compressed
# or anti-aliased masks have grey edges, a photograph passed as a mask is grey everywhere.
_MASK_MAX_GREY_FRACTION = 0.05


def _channel_max(raw: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8/uint16 -> (H, W) uint8, the max over colour channels (alpha ignored)."""
    array = _to_uint8(raw)
    if array.ndim == 2:
        return array
    channels = cv2.split(array)[:3]
    gray = channels[0]
    for channel in channels[1:]:
        gray = cv2.max(gray, channel)  # numpy's max(axis=2) is ~50x slower here
    return gray


def _mask_gray(data: bytes, header: ImageHeader) -> np.ndarray:
    """Mask bytes -> (H, W) uint8 as stored (before orientation), 255 = lesion.

    Fast path: the decoder's own gray conversion. A lesion drawn in a dark colour (pure red
    is luminance 76) would then fall below the threshold, so colour masks whose brightest
    value is under 128 are decoded again in colour and take the max over channels; 16-bit
    masks always are (gray decoding keeps only the high byte, which erases a 0/1 map).
    0/1 label maps are scaled to 0/255.
    """
    flags = cv2.IMREAD_IGNORE_ORIENTATION
    if header.bit_depth is not None and header.bit_depth > 8:
        raw = _imdecode(data, cv2.IMREAD_UNCHANGED | flags, header)
        if raw.max() == 1:
            raw = raw * np.uint16(65535)  # a 0/1 map would round to all zero in 8 bits
        gray = _channel_max(raw)
    else:
        gray = _imdecode(data, cv2.IMREAD_GRAYSCALE | flags, header)
        if header.color != "gray" and 1 < gray.max() < 128:
            gray = _channel_max(_imdecode(data, cv2.IMREAD_UNCHANGED | flags, header))
    if gray.max() == 1:
        gray = gray * np.uint8(255)
    return gray


def decode_mask(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """Segmentation mask bytes -> (size, size) uint8 in {0, 255}.

    Squashed like the image so it stays aligned. Shrinking uses INTER_AREA (each output
    pixel averages its whole footprint) then a threshold at 128: a pixel is lesion when at
    least half of what it covers is lesion. Like a large image, a large mask is first
    reduced by the power of two its JPEG twin would be decoded at (600x450 -> 300x225, an
    exact 2x2 average: OpenCV's fast path), then area-resized to ``size``: half the cost of
    one fractional INTER_AREA, and the same mask to within 0.03% of its pixels (measured on
    the HAM10000 masks). Enlarging uses INTER_LINEAR and the same threshold. Raises :class:`RejectedImage` like :func:`decode_rgb`, and ``bad-mask`` when
    more than 5% of the pixels are neither near 0 nor near 255.
    """
    header = checked_header(data, MAX_PIXELS)
    gray = _mask_gray(data, header)
    _expect_shape(gray, header.width, header.height, header)
    gray = _apply_orientation(gray, header.orientation)
    grey_fraction = float(np.count_nonzero((gray > 32) & (gray < 223))) / gray.size
    if grey_fraction > _MASK_MAX_GREY_FRACTION:
        raise RejectedImage("bad-mask", f"{grey_fraction:.0%} of the pixels are grey: not a binary mask")
    gray = np.ascontiguousarray(gray)
    shrinking = gray.shape[0] >= size and gray.shape[1] >= size
    if shrinking:
        resized = cv2.resize(_reduce_like_dct(gray, size), (size, size), interpolation=cv2.INTER_AREA)
    else:
        resized = cv2.resize(gray, (size, size), interpolation=cv2.INTER_LINEAR)
    # >= 128 -> 255, else 0 (cv2.threshold's "> 127": the same test, 5x faster than np.where).
    return cv2.threshold(resized, 127, 255, cv2.THRESH_BINARY)[1]
