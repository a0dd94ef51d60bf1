"""Deterministic augmentation of (image, mask) pairs for the augmented training copies.

Each copy's random draw is seeded from ``sha256(f"{image_id}:{copy_index}")``, so a rerun
of the augment job writes byte-identical shards, and two copies of one image differ. The
geometric part (flips, rotation, zoom or crop) is one affine warp applied to the image (bilinear)
and to its mask (nearest, so the mask stays in {0, 255}), keeping them aligned; the
photometric part (brightness; hue, saturation and contrast where their ranges are not the
identity) applies to the image only. Version 2 jittered hue (+-8 degrees), saturation
(x0.75-1.25) and contrast (x0.8-1.25) to stand for other dermatoscopes; together with colour
constancy it cost the best recipe 0.041 HAM validation AUROC (research/2026-12-external-validity),
so version 3 keeps those ranges at the identity: its images are version 1's, byte for byte.
Training can still draw version 2's jitter alone (``draw_params(key, colour_jitter=True)``, the
``train_colour_jitter`` setting) to measure it without colour constancy, and random resized
crops in place of the centred zoom (``random_crop=True``, the ``train_random_crop`` setting).
Pure numpy + OpenCV: it runs inside Spark executors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import cv2
import numpy as np

from melanoma.records import IMAGE_SIZE

#: What the augment job does, recorded in the manifest's ``augmentation`` field.
AUGMENT_PARAMS = {
    "version": 3,
    "seed": "first 8 bytes of sha256(f'{image_id}:{copy_index}'), big-endian, numpy default_rng",
    "hflip_probability": 0.5,
    "vflip_probability": 0.5,
    "rotation_degrees": [0.0, 360.0],  # uniform: dermoscopy has no canonical "up"
    "zoom": [0.9, 1.2],  # uniform; > 1 zooms in
    "brightness": [0.8, 1.2],  # uniform factor on every channel, image only
    # Off since version 3 (the identity; version 2: [-8, 8], [0.75, 1.25], [0.8, 1.25]): see above.
    "hue_degrees": [0.0, 0.0],  # uniform shift of the HSV hue, image only
    "saturation": [1.0, 1.0],  # uniform factor on the HSV saturation, image only
    "contrast": [1.0, 1.0],  # uniform factor on the distance to the image's mean, image only
    "border": "reflect_101",  # skin continues past the edge; black corners would be a new cue
    "image_interpolation": "bilinear",
    "mask_interpolation": "nearest",
    "augmented_id": "{image_id}_aug{copy_index}",
}
#: Version 2's photometric ranges, drawn in their place by ``draw_params(..., colour_jitter=True)``.
COLOUR_JITTER = {"hue_degrees": [-8.0, 8.0], "saturation": [0.75, 1.25], "contrast": [0.8, 1.25]}
#: Random resized crops (Szegedy et al. 2015, "Going deeper with convolutions"; torchvision's
#: RandomResizedCrop), drawn by ``draw_params(..., random_crop=True)`` in place of the centred zoom:
#: a box of ``area`` times the image's area and width/height ``aspect`` (log-uniform), anywhere in
#: the rotated image, stretched back to its size. Why: the stored images are squashed to a square
#: and every lesion sits at one scale and place per image; another device frames them otherwise.
#: The area starts at 0.5, not torchvision's 0.08, so the crop keeps most of a lesion.
RANDOM_CROP = {"area": [0.5, 1.0], "aspect": [3 / 4, 4 / 3]}


@dataclass(frozen=True)
class AugmentParams:
    """One copy's draw: flips, rotation in degrees (counter-clockwise), zoom, brightness factor;
    hue, saturation and contrast; a crop box (x, y, width, height) as fractions of the image."""

    hflip: bool
    vflip: bool
    angle: float
    zoom: float
    brightness: float
    hue: float = 0.0
    saturation: float = 1.0
    contrast: float = 1.0
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def augmented_image_id(image_id: str, copy_index: int) -> str:
    """Id of the ``copy_index``-th augmented copy of ``image_id``."""
    return f"{image_id}_aug{copy_index}"


def sample_params(image_id: str, copy_index: int) -> AugmentParams:
    """The draw for one copy, a pure function of (image_id, copy_index)."""
    return draw_params(f"{image_id}:{copy_index}")


def draw_params(key: str, colour_jitter: bool = False, random_crop: bool = False) -> AugmentParams:
    """One draw of the transform in :data:`AUGMENT_PARAMS`, a pure function of ``key``; with
    ``colour_jitter``, hue, saturation and contrast from :data:`COLOUR_JITTER` instead; with
    ``random_crop``, a crop box from :data:`RANDOM_CROP` instead of the zoom. Each option's draws
    come after the others', so turning one on leaves the others' values as they were."""
    photometric = {**AUGMENT_PARAMS, **COLOUR_JITTER} if colour_jitter else AUGMENT_PARAMS
    digest = hashlib.sha256(key.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    low_rot, high_rot = AUGMENT_PARAMS["rotation_degrees"]
    params = AugmentParams(
        hflip=bool(rng.random() < AUGMENT_PARAMS["hflip_probability"]),
        vflip=bool(rng.random() < AUGMENT_PARAMS["vflip_probability"]),
        angle=float(rng.uniform(low_rot, high_rot)),
        zoom=float(rng.uniform(*AUGMENT_PARAMS["zoom"])),
        brightness=float(rng.uniform(*AUGMENT_PARAMS["brightness"])),
        # Drawn after the version-1 fields, so those keep their version-1 values.
        hue=float(rng.uniform(*photometric["hue_degrees"])),
        saturation=float(rng.uniform(*photometric["saturation"])),
        contrast=float(rng.uniform(*photometric["contrast"])),
    )
    return replace(params, zoom=1.0, crop=_draw_crop(rng)) if random_crop else params


def _draw_crop(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A box of :data:`RANDOM_CROP`'s area and aspect at a uniform place, as image fractions."""
    area = rng.uniform(*RANDOM_CROP["area"])
    aspect = float(np.exp(rng.uniform(*np.log(RANDOM_CROP["aspect"]))))
    width, height = min(1.0, float(np.sqrt(area * aspect))), min(1.0, float(np.sqrt(area / aspect)))
    return (float(rng.uniform(0.0, 1.0 - width)), float(rng.uniform(0.0, 1.0 - height)), width, height)


def affine_matrix(params: AugmentParams, width: int, height: int) -> np.ndarray:
    """(2, 3) source->destination matrix: flips, then rotation and zoom about the centre, then
    the crop box stretched to the whole image (skipped when it is the whole image, so the augment
    job's matrices stay exactly what they were).

    Uses pixel-centre coordinates ((w-1)/2, (h-1)/2), so a pure flip maps pixels exactly
    onto pixels.
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    flip = np.array(
        [
            [-1.0 if params.hflip else 1.0, 0.0, (width - 1) if params.hflip else 0.0],
            [0.0, -1.0 if params.vflip else 1.0, (height - 1) if params.vflip else 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    rotate = np.vstack([cv2.getRotationMatrix2D((cx, cy), params.angle, params.zoom), [0.0, 0.0, 1.0]])
    if params.crop == (0.0, 0.0, 1.0, 1.0):
        return (rotate @ flip)[:2]
    x, y, w, h = params.crop  # pixel edges: the box [x*W, (x+w)*W) maps onto [0, W)
    sx, sy = 1.0 / w, 1.0 / h
    crop = np.array(
        [[sx, 0.0, (0.5 - x * width) * sx - 0.5], [0.0, sy, (0.5 - y * height) * sy - 0.5], [0.0, 0.0, 1.0]]
    )
    return (crop @ rotate @ flip)[:2]


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 (H, W, 3) scaled by ``factor``, saturating at 255 (a lookup table: exact and fast)."""
    table = np.clip(np.rint(np.arange(256) * factor), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def adjust_colour(image: np.ndarray, hue: float, saturation: float, contrast: float) -> np.ndarray:
    """uint8 (H, W, 3) RGB with its hue shifted by ``hue`` degrees, saturation and contrast scaled."""
    if hue == 0.0 and saturation == 1.0 and contrast == 1.0:
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)  # hue 0..255 for 360 degrees
    hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256.0 / 360.0, 256.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    rgb = cv2.cvtColor(np.rint(hsv).clip(0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
    mean = rgb.mean(axis=(0, 1), keepdims=True)
    return np.clip(np.rint((rgb - mean) * contrast + mean), 0, 255).astype(np.uint8)


def apply_augment(
    image: np.ndarray, mask: np.ndarray, params: AugmentParams
) -> tuple[np.ndarray, np.ndarray]:
    """Warp image uint8 (H, W, 3) and mask uint8 (H, W) alike; brighten the image only."""
    height, width = mask.shape
    matrix = affine_matrix(params, width, height)
    warped_mask = cv2.warpAffine(
        mask, matrix, (width, height), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101
    )
    return augment_image(image, params), warped_mask


def augment_image(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """The image part of :func:`apply_augment`: uint8 (H, W, 3) -> warped, recoloured and brightened, same shape."""
    height, width = image.shape[:2]
    warped = cv2.warpAffine(
        image,
        affine_matrix(params, width, height),
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return adjust_brightness(
        adjust_colour(warped, params.hue, params.saturation, params.contrast), params.brightness
    )


def augment_pair(
    image: np.ndarray, mask: np.ndarray, image_id: str, copy_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy: image uint8 (224, 224, 3), mask uint8 (224, 224) -> same shapes.

    Identical arguments give identical outputs; a mask of zeros (image without a mask)
    stays zeros.
    """
    if image.dtype != np.uint8 or image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"image must be uint8 ({IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {image.dtype} {image.shape}"
        )
    if mask.dtype != np.uint8 or mask.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"mask must be uint8 ({IMAGE_SIZE}, {IMAGE_SIZE}), got {mask.dtype} {mask.shape}")
    if copy_index < 0:
        raise ValueError(f"copy_index must be >= 0, got {copy_index}")
    return apply_augment(image, mask, sample_params(image_id, copy_index))
