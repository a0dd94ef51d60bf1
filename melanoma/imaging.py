"""The one definition of image preprocessing: bytes in, a (224, 224, 3) uint8 RGB array out.

The Spark preprocessing job and prediction both call :func:`preprocess_image_bytes`, so a
model never sees pixels prepared differently from the ones it was trained on. This module
uses numpy and OpenCV only (Pillow just to read the header of rare formats): it runs inside
Spark executors and must never import TensorFlow or PySpark.

Steps, in order:

1. :func:`read_image_header` parses the container header (JPEG SOF / PNG IHDR, Pillow for
   other formats) without decoding pixels, so a decompression bomb is refused before a
   single pixel buffer is allocated.
2. :func:`decode_rgb` checks the header (size, aspect, completeness), decodes, and converts
   whatever it finds (grayscale, CMYK, alpha, 16-bit, EXIF orientation, PNG content under a
   ``.jpg`` name) into uint8 RGB, returning a note per conversion. JPEGs at least twice the
   target size are decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling, which is both
   faster and a proper low-pass before the final resize.
3. :func:`resize_for_model` squashes the whole image to a square, bilinear.
4. :func:`shades_of_gray` (colour constancy) divides out each image's estimated illuminant,
   so that another clinic's device (a different light and colour response) gives the model
   the colours it learnt on; ``colour_constancy="none"`` skips it (models trained before it).

Anything that cannot be turned into an image raises :class:`RejectedImage`, whose
``reason`` is one of :data:`REASONS`; callers put it in quarantine with that reason.

EXIF orientation is applied by this module, not by OpenCV: every decode passes
``IMREAD_IGNORE_ORIENTATION`` and the orientation read from the header is applied with
numpy. OpenCV applies orientation in some read modes but not others (``IMREAD_UNCHANGED``
ignores it), so doing it ourselves gives one behaviour for every format and read mode, and
the ``exif-rotated`` note is always true to what was done.
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from melanoma.records import IMAGE_SIZE

#: Largest declared pixel count we agree to decode. The biggest dermoscopic images in the
#: ISIC archive are about 30 megapixels (6688x4439); 60 M leaves 2x headroom while bounding a
#: full decode (non-JPEG formats cannot be decoded at reduced scale) to 180 MB of RGB, which
#: several concurrent Spark tasks can afford. Beyond that, the file is a decompression bomb
#: or not a dermoscopic image.
MAX_PIXELS = 60_000_000
#: Shortest side accepted: below this, upsampling to 224 invents most of the detail.
MIN_SIDE = 32
#: Longest/shortest side ratio accepted: beyond this, squashing to a square distorts the
#: lesion's shape more than any dermoscope framing would justify.
MAX_ASPECT = 4.0

#: Why an image was refused (``RejectedImage.reason``).
REASONS = (
    "empty-file",  # zero bytes
    "truncated",  # the file ends before its image data does
    "not-an-image",  # no known image signature (text, HTML error page, random bytes)
    "decompression-bomb",  # the header declares more than MAX_PIXELS pixels
    "undecodable",  # an image header, but the decoder fails or disagrees with the header
    "bad-dimensions",  # zero, tiny (< MIN_SIDE) or too elongated (> MAX_ASPECT) images
    "bad-mask",  # (masks only) not a binary mask
)

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

#: Description of this module's preprocessing, for the manifest's ``preprocessing`` field.
PREPROCESSING = {
    "size": IMAGE_SIZE,
    "color": "RGB uint8",
    "geometry": "whole image squashed to a square (no crop)",
    "interpolation": "bilinear (cv2.INTER_LINEAR)",
    "decode": (
        "JPEG: libjpeg DCT scaling at the largest of 1/2, 1/4, 1/8 keeping the short side >= size; "
        "other formats: full decode, then INTER_AREA by the same power of two"
    ),
    "orientation": "EXIF orientation applied",
    "alpha": "dropped",
    "mask": (
        "gray (max over channels for dark colour masks), INTER_AREA by the image's power of two then INTER_AREA (shrink) "
        "/ INTER_LINEAR (enlarge), >= 128 -> 255"
    ),
    "max_pixels": MAX_PIXELS,
    "min_side": MIN_SIDE,
    "max_aspect": MAX_ASPECT,
    "colour_constancy": "shades_of_gray",
}

#: Colour-constancy methods :func:`preprocess_image_bytes` knows; the first is the default.
COLOUR_CONSTANCY = ("shades_of_gray", "none")

#: Minkowski norm of Shades of Gray. p=6 is the value Finlayson & Trezzi found best and the
#: one the ISIC challenge entries that used it kept (Barata et al. 2015; Gessert et al. 2020).
SHADES_OF_GRAY_P = 6


class RejectedImage(ValueError):
    """Bytes that cannot become a model input; ``reason`` is a short code from :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r} (known: {', '.join(REASONS)})")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Spark ships exceptions between processes; the default pickling would call
        # __init__ with the formatted string only.
        return (RejectedImage, (self.reason, self.message))


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header declares, read without decoding pixels.

    format: ``"jpeg"``, ``"png"`` or Pillow's format name lowercased (``"webp"``, ``"tiff"``...).
    width, height: stored size in pixels, before EXIF orientation.
    channels: stored components (1 gray, 2 gray+alpha, 3, 4 RGBA or CMYK), ``None`` if unknown.
    bit_depth: bits per sample (8, 16, 12 for 12-bit JPEG...), ``None`` if unknown.
    color: ``"gray"``, ``"rgb"``, ``"ycbcr"``, ``"cmyk"``, ``"ycck"``, ``"palette"`` or ``None``.
    has_alpha: an alpha channel or a transparency chunk is present.
    orientation: EXIF orientation 1..8 (1 = as stored).
    data_offset: JPEG: offset of the first SOS marker; PNG: of the first IDAT chunk.
    """

    format: str
    width: int
    height: int
    channels: int | None = None
    bit_depth: int | None = None
    color: str | None = None
    has_alpha: bool = False
    orientation: int = 1
    data_offset: int | None = None

    @property
    def pixels(self) -> int:
        return self.width * self.height


# ---------------------------------------------------------------------------------------
# Header parsing


def _exif_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF blob; 1 if absent or malformed.

    A malformed EXIF block is ignored rather than rejected: the pixels are fine, and showing
    them as stored is what every viewer does in that case.
    """
    if tiff.startswith(b"Exif\x00\x00"):
        tiff = tiff[6:]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    endian = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack(endian + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack(endian + "H", tiff[ifd : ifd + 2])[0]
    for index in range(count):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return 1
        tag, kind = struct.unpack(endian + "HH", tiff[entry : entry + 4])
        if tag == 0x0112:
            # SHORT (3) is the standard type; LONG (4) shows up from some writers.
            if kind == 3:
                value = struct.unpack(endian + "H", tiff[entry + 8 : entry + 10])[0]
            elif kind == 4:
                value = struct.unpack(endian + "I", tiff[entry + 8 : entry + 12])[0]
            else:
                return 1
            return value if 1 <= value <= 8 else 1
    return 1


# SOFn markers carrying frame dimensions (C4 = DHT, C8 = JPG extension, CC = DAC are not frames).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> ImageHeader:
    """Walk JPEG marker segments from SOI up to the first SOS (no entropy data is read)."""
    pos = 2
    frame = None
    orientation = 1
    adobe_transform = None
    while True:
        # Like libjpeg, skip stray bytes and fill bytes (0xFF runs) before a marker.
        while pos < len(data) and data[pos] != 0xFF:
            pos += 1
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            raise RejectedImage("truncated", f"JPEG ends inside its header after {len(data)} bytes")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            raise RejectedImage("undecodable", "JPEG reaches its end marker before any image data")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # standalone markers carry no length
        if pos + 2 > len(data):
            raise RejectedImage("truncated", f"JPEG ends inside its header after {len(data)} bytes")
        length = struct.unpack(">H", data[pos : pos + 2])[0]
        if length < 2:
            raise RejectedImage("undecodable", f"JPEG segment 0x{marker:02X} has invalid length {length}")
        segment = data[pos + 2 : pos + length]
        if len(segment) < length - 2:
            raise RejectedImage("truncated", f"JPEG ends inside segment 0x{marker:02X}")
        if marker == 0xDA:
            if frame is None:
                raise RejectedImage("undecodable", "JPEG scan starts before any frame header (SOF)")
            precision, height, width, components = frame
            color = {1: "gray", 3: "ycbcr", 4: "cmyk"}.get(components)
            if components == 4 and adobe_transform == 2:
                color = "ycck"
            return ImageHeader(
                format="jpeg",
                width=width,
                height=height,
                channels=components,
                bit_depth=precision,
                color=color,
                orientation=orientation,
                data_offset=pos - 2,
            )
        if marker in _JPEG_SOF and frame is None:
            if len(segment) < 6:
                raise RejectedImage("undecodable", "JPEG frame header (SOF) is too short")
            frame = struct.unpack(">BHHB", segment[:6])
        elif marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and orientation == 1:
            orientation = _exif_orientation(segment)
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        pos += length


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour type -> (channels, colour, has alpha)
_PNG_COLOR_TYPES = {
    0: (1, "gray", False),
    2: (3, "rgb", False),
    3: (1, "palette", False),
    4: (2, "gray", True),
    6: (4, "rgb", True),
}


def _png_header(data: bytes) -> ImageHeader:
    """Read IHDR and the ancillary chunks before the first IDAT (tRNS, eXIf)."""
    pos = len(_PNG_SIGNATURE)
    ihdr = None
    has_transparency = False
    orientation = 1
    while True:
        if pos + 8 > len(data):
            raise RejectedImage("truncated", f"PNG ends inside its header after {len(data)} bytes")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if ihdr is None:
            if kind != b"IHDR" or length != 13:
                raise RejectedImage("undecodable", "PNG does not start with a valid IHDR chunk")
            if len(body) < 13:
                raise RejectedImage("truncated", "PNG ends inside its IHDR chunk")
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            break
        elif kind == b"IEND":
            raise RejectedImage("undecodable", "PNG has no image data (IEND before any IDAT)")
        elif len(body) < length:
            raise RejectedImage("truncated", f"PNG ends inside its {kind!r} chunk")
        elif kind == b"tRNS":
            has_transparency = True
        elif kind == b"eXIf":
            orientation = _exif_orientation(body)
        pos += 12 + length
    width, height, bit_depth, color_type = ihdr[:4]
    if color_type not in _PNG_COLOR_TYPES:
        raise RejectedImage("undecodable", f"PNG colour type {color_type} does not exist")
    channels, color, has_alpha = _PNG_COLOR_TYPES[color_type]
    return ImageHeader(
        format="png",
        width=width,
        height=height,
        channels=channels,
        bit_depth=bit_depth,
        color=color,
        has_alpha=has_alpha or has_transparency,
        orientation=orientation,
        data_offset=pos,
    )


# Pillow mode -> (channels, colour, has alpha, bit depth)
_PIL_MODES = {
    "1": (1, "gray", False, 1),
    "L": (1, "gray", False, 8),
    "LA": (2, "gray", True, 8),
    "P": (1, "palette", False, 8),
    "PA": (2, "palette", True, 8),
    "RGB": (3, "rgb", False, 8),
    "RGBA": (4, "rgb", True, 8),
    "CMYK": (4, "cmyk", False, 8),
    "I;16": (1, "gray", False, 16),
    "I;16B": (1, "gray", False, 16),
    "I;16L": (1, "gray", False, 16),
}


def _pil_header(data: bytes) -> ImageHeader:
    """Header of any other format Pillow knows (GIF, BMP, TIFF, WebP...), lazily opened."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit and raises above twice that; we apply
            # MAX_PIXELS ourselves, from the size it reports.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                mode = image.mode
                fmt = (image.format or "unknown").lower()
                orientation = image.getexif().get(0x0112, 1)
                has_transparency = "transparency" in image.info
    except Image.DecompressionBombError as error:
        raise RejectedImage("decompression-bomb", str(error)) from None
    except UnidentifiedImageError:
        raise RejectedImage(
            "not-an-image", f"no known image signature (starts with {signature(data)})"
        ) from None
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        raise RejectedImage("undecodable", f"unreadable image header: {error}") from None
    channels, color, has_alpha, bit_depth = _PIL_MODES.get(mode, (None, None, False, None))
    return ImageHeader(
        format=fmt,
        width=width,
        height=height,
        channels=channels,
        bit_depth=bit_depth,
        color=color,
        has_alpha=has_alpha or has_transparency,
        orientation=orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1,
    )


def signature(data: bytes) -> str:
    """The first 4 bytes in hex: enough to tell a format apart, too little to leak a file's content."""
    return f"0x{data[:4].hex()}" if data else "nothing"


def read_image_header(data: bytes) -> ImageHeader:
    """Parse an image's header from its bytes without decoding any pixel.

    JPEG and PNG (the formats of every known drop) are parsed here; others go through
    Pillow's lazy ``Image.open``, which reads the header only. Raises :class:`RejectedImage`
    (``empty-file``, ``not-an-image``, ``truncated``, ``undecodable``).
    """
    if len(data) == 0:
        raise RejectedImage("empty-file", "the file is empty (0 bytes)")
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_header(data)
    if data.startswith(_PNG_SIGNATURE):
        return _png_header(data)
    return _pil_header(data)


# ---------------------------------------------------------------------------------------
# Checks on the header, before decoding


def _check_dimensions(header: ImageHeader, max_pixels: int) -> None:
    """Refuse bombs and unusable sizes from the declared size alone."""
    width, height = header.width, header.height
    if width <= 0 or height <= 0:
        raise RejectedImage("bad-dimensions", f"declared size {width}x{height} has no pixels")
    if header.pixels > max_pixels:
        raise RejectedImage(
            "decompression-bomb",
            f"{header.format} declares {width}x{height} = {header.pixels:,} pixels, above the limit of {max_pixels:,}",
        )
    if min(width, height) < MIN_SIDE:
        raise RejectedImage("bad-dimensions", f"{width}x{height} is smaller than {MIN_SIDE} pixels on a side")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise RejectedImage("bad-dimensions", f"{width}x{height} is more elongated than {MAX_ASPECT}:1")


def _check_complete(data: bytes, header: ImageHeader) -> None:
    """Refuse files that stop before their image data does.

    JPEG: an EOI marker must follow the first SOS. Entropy-coded data escapes every 0xFF
    byte, so ``FF D9`` after SOS can only be the real end marker (an EXIF thumbnail's EOI
    sits before SOS and does not count), and trailing bytes after EOI are tolerated as
    libjpeg does. PNG: an IEND chunk must follow the first IDAT.

    Both look for the LAST occurrence (``rfind``): "some EOI at or after SOS" is the same test
    as "the last EOI is at or after SOS", and searching from the end finds a complete file's
    EOI at once, where a forward search crawls through the scan's many 0xFF bytes (0.3-0.4 ms
    for a 250 KB JPEG, about 10% of its whole preprocessing).
    """
    if header.format == "jpeg" and data.rfind(b"\xff\xd9") < (header.data_offset or 0):
        raise RejectedImage(
            "truncated", f"JPEG has no end-of-image marker after its scan data ({len(data)} bytes)"
        )
    if header.format == "png" and data.rfind(b"IEND") < (header.data_offset or 0):
        raise RejectedImage("truncated", f"PNG has no IEND chunk after its image data ({len(data)} bytes)")


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
        # Cut-short files were caught by _check_complete before decoding; what is left is
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


def _checked_header(data: bytes, max_pixels: int) -> ImageHeader:
    header = read_image_header(data)
    _check_dimensions(header, max_pixels)
    _check_complete(data, header)
    return header


def decode_rgb(
    data: bytes, *, target_size: int = IMAGE_SIZE, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, list[str]]:
    """Decode image bytes to display-oriented RGB, converting rather than refusing.

    Returns ``(rgb, notes)``: rgb is uint8 (H, W, 3), C-contiguous. JPEGs whose short side
    is at least 2x/4x/8x ``target_size`` come back at 1/2, 1/4 or 1/8 of their size (short
    side still >= ``target_size``); other formats are shrunk by the same factor after a full
    decode. ``notes`` lists each conversion made (see :data:`NOTES`).

    Raises :class:`RejectedImage` with a reason from :data:`REASONS`.
    """
    header = _checked_header(data, max_pixels)
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


def resize_for_model(rgb: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear, the whole image squashed.

    No centre crop: lesions are often off-centre and a crop could cut them, and the mask
    must map 1:1 onto the image (the same squash applied to both keeps them aligned).
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] == (size, size):
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)


def shades_of_gray(rgb: np.ndarray, p: int = SHADES_OF_GRAY_P) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi, "Shades of Gray and Colour
    Constancy", CIC 2004): uint8 (H, W, 3) -> same shape, colour cast removed.

    The illuminant is estimated per channel as the Minkowski p-mean of the pixels (p=1 is
    Gray World, p=inf White Patch) and divided out, scaled so that a neutral illuminant
    leaves the image unchanged (gain_c = |e| / (sqrt(3) e_c)). An image with a channel
    that is (almost) black everywhere carries no colour cast to estimate: it is returned as is.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    pixels = rgb.reshape(-1, 3).astype(np.float64) / 255.0
    illuminant = np.power(np.mean(np.power(pixels, p), axis=0), 1.0 / p)
    if illuminant.min() < 1.0 / 255.0:
        return rgb
    gains = np.linalg.norm(illuminant) / (np.sqrt(3.0) * illuminant)
    # One lookup table per channel: exact, fast, and the same on every platform.
    tables = np.clip(np.rint(np.arange(256)[:, None] * gains[None, :]), 0, 255).astype(np.uint8)
    return np.stack([tables[rgb[..., c], c] for c in range(3)], axis=-1)


def preprocess_image_bytes(
    data: bytes, size: int = IMAGE_SIZE, *, colour_constancy: str = COLOUR_CONSTANCY[0]
) -> tuple[np.ndarray, list[str]]:
    """Bytes -> ((size, size, 3) uint8 RGB model input, conversion notes).

    ``colour_constancy`` must match what the model was trained on: the processed manifest's
    ``preprocessing.colour_constancy`` (``"none"`` for data preprocessed before it existed).
    """
    if colour_constancy not in COLOUR_CONSTANCY:
        raise ValueError(f"colour_constancy must be one of {COLOUR_CONSTANCY}, got {colour_constancy!r}")
    rgb, notes = decode_rgb(data, target_size=size)
    image = resize_for_model(rgb, size)
    return (shades_of_gray(image) if colour_constancy == "shades_of_gray" else image), notes


def colour_constancy_of(preprocessing: dict | None) -> str:
    """The colour constancy a manifest's (or a model's) ``preprocessing`` record says was applied.

    Version 1 records (before colour constancy) applied none.
    """
    if not preprocessing:
        raise ValueError("no preprocessing record: cannot tell which colour constancy the data had")
    method = preprocessing.get("colour_constancy", "none")
    if method not in COLOUR_CONSTANCY:
        raise ValueError(f"unknown colour constancy {method!r} in the preprocessing record")
    return method


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
    header = _checked_header(data, MAX_PIXELS)
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
