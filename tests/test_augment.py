"""Augmentation: deterministic per (image_id, copy_index), image and mask kept aligned."""

from __future__ import annotations

import numpy as np
import pytest

from melanoma.augment import (
    AUGMENT_PARAMS,
    AugmentParams,
    apply_augment,
    augment_image,
    augment_pair,
    augmented_image_id,
    draw_params,
    sample_params,
)

from badcorpus import lesion_mask, synthetic_lesion


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    image = synthetic_lesion(224, 224, seed=5)
    return image, lesion_mask(image)


def test_augmented_image_id():
    assert augmented_image_id("ISIC_0024306", 2) == "ISIC_0024306_aug2"


def test_same_ids_give_identical_outputs_and_copies_differ(pair):
    image, mask = pair
    first = augment_pair(image, mask, "ISIC_1", 0)
    again = augment_pair(image.copy(), mask.copy(), "ISIC_1", 0)
    other_copy = augment_pair(image, mask, "ISIC_1", 1)
    other_image = augment_pair(image, mask, "ISIC_2", 0)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other_copy[0])
    assert not np.array_equal(first[0], other_image[0])


def test_outputs_keep_shapes_dtypes_and_binary_mask(pair):
    image, mask = pair
    out_image, out_mask = augment_pair(image, mask, "x", 3)
    assert out_image.shape == (224, 224, 3) and out_image.dtype == np.uint8
    assert out_mask.shape == (224, 224) and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 255}
    assert out_mask.any()


def test_sampled_parameters_stay_in_documented_ranges():
    draws = [sample_params(f"img{i}", i % 3) for i in range(400)]
    assert all(0 <= p.angle < 360 for p in draws)
    assert all(0.9 <= p.zoom <= 1.2 for p in draws)
    assert all(0.8 <= p.brightness <= 1.2 for p in draws)
    # Both flip outcomes occur at roughly the documented rate.
    assert 0.35 < np.mean([p.hflip for p in draws]) < 0.65
    assert 0.35 < np.mean([p.vflip for p in draws]) < 0.65
    assert AUGMENT_PARAMS["zoom"] == [0.9, 1.2] and AUGMENT_PARAMS["brightness"] == [0.8, 1.2]
    # Version 3: hue, saturation and contrast at the identity (version 2's jitter cost HAM validation).
    assert all((p.hue, p.saturation, p.contrast) == (0.0, 1.0, 1.0) for p in draws)


def test_version_3_images_are_version_1s(pair):
    """With the photometric jitter at the identity, a copy is the geometry and brightness alone."""
    image, mask = pair
    params = sample_params("ISIC_5", 2)
    plain = AugmentParams(params.hflip, params.vflip, params.angle, params.zoom, params.brightness)
    assert np.array_equal(apply_augment(image, mask, params)[0], apply_augment(image, mask, plain)[0])


def test_pure_flips_are_exact(pair):
    image, mask = pair
    params = AugmentParams(hflip=True, vflip=True, angle=0.0, zoom=1.0, brightness=1.0)
    out_image, out_mask = apply_augment(image, mask, params)
    assert np.array_equal(out_image, image[::-1, ::-1])
    assert np.array_equal(out_mask, mask[::-1, ::-1])


def test_mask_follows_the_image_geometry(pair):
    # An image that is its own mask: after any warp, thresholding the image must give
    # back (almost exactly) the warped mask.
    _, mask = pair
    image = np.repeat(mask[:, :, None], 3, axis=2)
    for copy_index in range(5):
        params = sample_params("align", copy_index)
        warped, warped_mask = apply_augment(
            image, mask, AugmentParams(params.hflip, params.vflip, params.angle, params.zoom, 1.0)
        )
        agreement = np.mean((warped[:, :, 0] >= 128) == (warped_mask == 255))
        assert agreement > 0.99, (params, agreement)


def test_brightness_scales_the_image_only(pair):
    image, mask = pair
    brighter, same_mask = apply_augment(image, mask, AugmentParams(False, False, 0.0, 1.0, 1.2))
    assert np.array_equal(same_mask, mask)
    expected = np.clip(np.rint(image.astype(np.float64) * 1.2), 0, 255).astype(np.uint8)
    assert np.array_equal(brighter, expected)


def test_empty_mask_stays_empty(pair):
    image, _ = pair
    _, out_mask = augment_pair(image, np.zeros((224, 224), np.uint8), "no-mask", 0)
    assert not out_mask.any()


@pytest.mark.parametrize(
    "image, mask",
    [
        (np.zeros((224, 224, 3), np.float32), np.zeros((224, 224), np.uint8)),
        (np.zeros((100, 100, 3), np.uint8), np.zeros((224, 224), np.uint8)),
        (np.zeros((224, 224, 3), np.uint8), np.zeros((224, 224, 1), np.uint8)),
    ],
)
def test_bad_shapes_are_refused(image, mask):
    with pytest.raises(ValueError):
        augment_pair(image, mask, "x", 0)


def test_augment_image_is_the_image_half_of_apply_augment(pair):
    image, mask = pair
    params = sample_params("ISIC_9", 1)
    assert np.array_equal(augment_image(image, params), apply_augment(image, mask, params)[0])
    assert draw_params("ISIC_9:1") == params
