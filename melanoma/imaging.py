"""The one definition of image preprocessing: bytes in, a (224, 224, 3) uint8 RGB array out.

The Spark preprocessing job and prediction both call :func:`preprocess_image_bytes`, so a
model never sees pixels prepared differently from the ones it was trained on. This module
puts the steps together, squashes to the model's size, and describes the whole (for the
manifest) in :data:`PREPROCESSING`. It and the modules it uses run numpy and OpenCV only
(Pillow just to read the header of rare formats): they run inside Spark executors and must
never import TensorFlow or PySpark.

Steps, in order:

1. :func:`melanoma.image_header.read_image_header` parses the container header (JPEG SOF /
   PNG IHDR, Pillow for other formats) without decoding pixels, so a decompression bomb is
   refused before a single pixel buffer is allocated.
2. :func:`melanoma.image_decode.decode_rgb` checks the header (size, aspect, completeness),
   decodes, and converts whatever it finds (grayscale, CMYK, alpha, 16-bit, EXIF orientation,
   PNG content under a ``.jpg`` name) into uint8 RGB, returning a note per conversion. JPEGs
   at least twice the target size are decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT
   scaling, which is both faster and a proper low-pass before the final resize.
3. :func:`match_source_detail` reduces an image sharper than the training data
   (short side above :data:`SOURCE_SHORT_SIDE`) to that level of detail, INTER_AREA.
4. :func:`resize_for_model` squashes the whole image to a square, bilinear.
5. :func:`melanoma.colour_constancy.shades_of_gray` (colour constancy) divides out each
   image's estimated illuminant, so that another clinic's device (a different light and colour
   response) gives the model the colours it learnt on; ``colour_constancy="none"`` skips it
   (models trained before it).

Masks go through :func:`decode_mask` (defined in :mod:`melanoma.image_decode`).

Anything that cannot be turned into an image raises
:class:`melanoma.image_header.RejectedImage`, whose ``reason`` is one of its ``REASONS``;
callers put it in quarantine with that reason.
"""

from __future__ import annotations

import cv2
import numpy as np

from melanoma.colour_constancy import COLOUR_CONSTANCY, shades_of_gray

# decode_mask is defined in image_decode; it is named here because every processed manifest
# records its mask function as "melanoma.imaging.decode_mask" (preprocess_job), a path that must
# keep resolving.
from melanoma.image_decode import decode_mask, decode_rgb
from melanoma.image_header import MAX_ASPECT, MAX_PIXELS, MIN_SIDE
from melanoma.records import IMAGE_SIZE

__all__ = [
    "PREPROCESSING",
    "SOURCE_SHORT_SIDE",
    "decode_mask",
    "match_source_detail",
    "preprocess_image_bytes",
    "resize_for_model",
]

#: The level of detail a model learns from, as a short side in pixels: larger inputs are first
#: reduced to it. 150 is the short side of the HAM10000 copy the shipped recipe trains on
#: (200x150, itself reduced from 600x450), upsampled to 224 for the model. Without this step,
#: another device's images (PH2's 768x576, the ISIC archive's up to 3072x2304) reached the
#: model with detail no training image had: the libjpeg reduction keeps a short side >= 224 and
#: the bilinear squash keeps its fine texture, while every HAM image is a blurred 150-pixel one.
#: HAM images are not changed by it (their short side is 150), so it costs HAM nothing.
SOURCE_SHORT_SIDE = 150

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
    "source_detail": (
        f"short side above {SOURCE_SHORT_SIDE} reduced to {SOURCE_SHORT_SIDE} (cv2.INTER_AREA, aspect kept) "
        "before the squash"
    ),
}


def match_source_detail(rgb: np.ndarray, short_side: int = SOURCE_SHORT_SIDE) -> np.ndarray:
    """(H, W, 3) uint8 -> the same image with its short side at most ``short_side`` (INTER_AREA).

    Smaller images are returned as they are: upsampling adds no detail, and the squash that
    follows enlarges them anyway. The aspect ratio is kept, so a mask squashed from the
    original stays aligned with the image.
    """
    height, width = rgb.shape[:2]
    if min(height, width) <= short_side:
        return rgb
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


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
    image = resize_for_model(match_source_detail(rgb), size)
    return (shades_of_gray(image) if colour_constancy == "shades_of_gray" else image), notes
