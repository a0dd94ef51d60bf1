"""Image preprocessing: every bad and convertible input, orientation, reduced decoding, masks."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from melanoma import image_decode
from melanoma.colour_constancy import colour_constancy_of, shades_of_gray
from melanoma.drop_scan import scan_drop
from melanoma.image_decode import NOTES, decode_mask, decode_rgb, jpeg_scale_factor
from melanoma.image_header import MAX_PIXELS, REASONS, RejectedImage, read_image_header
from melanoma.imaging import SOURCE_SHORT_SIDE, match_source_detail, preprocess_image_bytes, resize_for_model
from melanoma.storage import LocalStorage

from badcorpus import (
    CONVERSION_NOTES,
    DECODE_REASONS,
    SCAN_REASONS,
    SHARED_DATA,
    build_bad_drop,
    exif_rotated_jpeg,
    jpeg_bytes,
    lesion_mask,
    pil_bytes,
    png_bomb,
    png_bytes,
    require_shared_data,
    synthetic_lesion,
)

DROP = "bad-20240601"


def rejection(data: bytes, **kwargs) -> str:
    with pytest.raises(RejectedImage) as caught:
        decode_rgb(data, **kwargs)
    return caught.value.reason


@pytest.fixture(scope="module")
def lesion() -> np.ndarray:
    """uint8 (150, 200, 3) RGB, asymmetric enough to tell every orientation apart."""
    image = synthetic_lesion(200, 150, seed=7)
    image[:10, :30] = (0, 0, 255)  # a blue mark in the stored top-left corner
    return image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    good = None
    images = SHARED_DATA / "ham10000" / "images"
    if images.exists():
        good = sorted(images.glob("ISIC_*.jpg"))[:4]
    return root, build_bad_drop(root, DROP, good)


# --- the bad-input corpus, end to end --------------------------------------------------


def test_every_input_of_the_bad_corpus_gets_its_verdict(corpus):
    """Scan, then decode as the Spark job does: every expected reason and note is met,
    and inputs == written + quarantined at the end."""
    root, expected = corpus
    storage = LocalStorage(root)
    scan = scan_drop(storage, DROP)
    quarantined = [(entry.item, entry.reason) for entry in scan.quarantined]
    written: dict[str, list[str]] = {}
    for item in scan.inputs:
        try:
            array, notes = preprocess_image_bytes(storage.read_bytes(item.image_key))
        except RejectedImage as error:
            quarantined.append((item.image_id, error.reason))
            continue
        assert array.shape == (224, 224, 3) and array.dtype == np.uint8
        written[item.image_id] = notes

    def reasons_of(image_id: str) -> set[str]:
        return {
            reason
            for item, reason in quarantined
            if item == image_id or "/" in item and Path(item).stem == image_id
        }

    for image_id, outcome in expected.items():
        if outcome in DECODE_REASONS | SCAN_REASONS:
            assert outcome in reasons_of(image_id), (image_id, outcome, reasons_of(image_id))
        elif outcome == "ok":
            assert written[image_id] == [], (image_id, written.get(image_id))
        else:
            assert outcome in NOTES and outcome in written[image_id], (
                image_id,
                outcome,
                written.get(image_id),
            )
    assert scan.n_inputs == len(written) + len(quarantined)
    assert DECODE_REASONS <= set(expected.values())
    assert CONVERSION_NOTES <= set(expected.values())


# --- rejections ------------------------------------------------------------------------


def test_rejection_carries_reason_message_and_survives_pickling():
    error = RejectedImage("truncated", "cut at byte 10")
    assert (error.reason, error.message, str(error)) == (
        "truncated",
        "cut at byte 10",
        "truncated: cut at byte 10",
    )
    again = pickle.loads(pickle.dumps(error))
    assert (
        isinstance(again, RejectedImage) and again.reason == "truncated" and again.message == "cut at byte 10"
    )
    assert isinstance(error, ValueError)
    with pytest.raises(ValueError, match="unknown rejection reason"):
        RejectedImage("typo", "x")


def test_empty_text_and_garbage(lesion):
    assert rejection(b"") == "empty-file"
    assert rejection(b"just some text, named .jpg\n") == "not-an-image"
    assert (
        rejection(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()) == "not-an-image"
    )


def test_truncated_jpeg_at_any_point_is_refused(lesion):
    data = jpeg_bytes(lesion)
    for cut in (3, 40, 200, len(data) // 3, len(data) - 100, len(data) - 1):
        assert rejection(data[:cut]) == "truncated", cut


def test_bytes_after_the_end_marker_are_tolerated(lesion):
    data = jpeg_bytes(lesion)
    assert np.array_equal(decode_rgb(data + b"\x00" * 64 + b"trailer")[0], decode_rgb(data)[0])


def test_an_exif_thumbnail_end_marker_does_not_hide_truncation(lesion):
    data = jpeg_bytes(lesion)
    thumbnail = jpeg_bytes(synthetic_lesion(40, 30, seed=1))  # ends with FF D9
    payload = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\x00\x00" + thumbnail
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    with_thumbnail = data[:2] + app1 + data[2:]
    assert decode_rgb(with_thumbnail)[0].shape == (150, 200, 3)
    assert rejection(with_thumbnail[: len(with_thumbnail) - 300]) == "truncated"


def test_decompression_bombs_are_refused_before_any_decoding(monkeypatch, lesion):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a bomb reached the decoder")

    monkeypatch.setattr(image_decode.cv2, "imdecode", no_decoding)
    assert rejection(png_bomb()) == "decompression-bomb"
    assert (
        rejection(pil_bytes(Image.new("L", (8000, 8000)), "PNG"), max_pixels=1_000_000)
        == "decompression-bomb"
    )
    # Formats read through Pillow's lazy header are checked the same way.
    assert (
        rejection(pil_bytes(Image.new("RGB", (2000, 1000)), "BMP"), max_pixels=1_000_000)
        == "decompression-bomb"
    )
    assert MAX_PIXELS == 60_000_000


def test_bad_dimensions(lesion):
    assert rejection(jpeg_bytes(synthetic_lesion(20, 40, seed=1))) == "bad-dimensions"
    assert rejection(jpeg_bytes(synthetic_lesion(900, 200, seed=1))) == "bad-dimensions"
    data = jpeg_bytes(lesion)
    sof = data.index(b"\xff\xc0")
    zero_height = data[: sof + 5] + b"\x00\x00" + data[sof + 7 :]
    assert read_image_header(data).height == 150 and rejection(zero_height) == "bad-dimensions"


def test_structurally_valid_but_corrupt_png_is_undecodable():
    ihdr_and_signature = png_bytes(np.zeros((40, 40), np.uint8))[:33]
    garbage = b"\x00\x00\x00\x10IDAT" + b"\x12" * 16 + b"\x00\x00\x00\x00"
    iend = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    assert rejection(ihdr_and_signature + garbage + iend) == "undecodable"


def test_reason_codes_are_the_documented_ones():
    assert set(REASONS) == DECODE_REASONS | {"bad-mask"}


# --- headers ---------------------------------------------------------------------------


def test_headers_match_pillow_without_decoding(lesion):
    cases = {
        "jpeg": jpeg_bytes(lesion),
        "png": png_bytes(cv2.cvtColor(lesion, cv2.COLOR_RGB2BGR)),
        "webp": pil_bytes(Image.fromarray(lesion), "WEBP"),
        "bmp": pil_bytes(Image.fromarray(lesion), "BMP"),
        "gif": pil_bytes(Image.fromarray(lesion), "GIF"),
        "tiff": pil_bytes(Image.fromarray(lesion), "TIFF"),
    }
    for fmt, data in cases.items():
        header = read_image_header(data)
        assert (header.format, header.width, header.height) == (fmt, 200, 150), header
    jpeg = read_image_header(cases["jpeg"])
    assert (jpeg.channels, jpeg.bit_depth, jpeg.color, jpeg.orientation) == (3, 8, "ycbcr", 1)
    png16 = read_image_header(png_bytes(np.zeros((40, 50, 4), np.uint16)))
    assert (png16.channels, png16.bit_depth, png16.has_alpha) == (4, 16, True)


def test_other_formats_decode_with_a_content_note(lesion):
    for fmt, note in (("WEBP", "webp-content"), ("BMP", "bmp-content"), ("TIFF", "tiff-content")):
        rgb, notes = decode_rgb(
            pil_bytes(Image.fromarray(lesion), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        )
        assert notes == [note] and np.array_equal(rgb, lesion), fmt
    rgb, notes = decode_rgb(pil_bytes(Image.fromarray(lesion).convert("CMYK"), "TIFF"))
    assert notes == ["tiff-content", "cmyk->rgb"] and np.abs(rgb.astype(int) - lesion).max() <= 2


def test_progressive_jpeg_decodes_and_its_truncation_is_caught(lesion):
    data = pil_bytes(Image.fromarray(lesion), "JPEG", quality=95, progressive=True)
    rgb, notes = decode_rgb(data)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert notes == [] and np.abs(rgb.astype(int) - reference).mean() < 1
    assert rejection(data[: len(data) * 2 // 3]) == "truncated"


# --- conversions -----------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_like_pillow(lesion, orientation, fmt):
    image = Image.fromarray(lesion)
    exif = image.getexif()
    exif[0x0112] = orientation
    data = pil_bytes(image, fmt, exif=exif.tobytes(), quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    rgb, notes = decode_rgb(data, target_size=1000)  # full scale, to compare pixel for pixel
    assert rgb.shape == expected.shape
    assert np.abs(rgb.astype(int) - expected).max() <= 1  # libjpeg-turbo vs Pillow's libjpeg IDCT
    assert ("exif-rotated" in notes) == (orientation != 1)


def test_exif_orientation_also_applies_at_reduced_scale():
    stored = synthetic_lesion(1200, 900, seed=3)
    rgb, notes = decode_rgb(exif_rotated_jpeg(stored, 6))
    assert rgb.shape == (300, 225, 3) and notes == ["exif-rotated"]
    plain, _ = decode_rgb(jpeg_bytes(stored, 92))
    assert np.abs(rgb.astype(int) - np.rot90(plain, k=-1)).mean() < 1.5


def test_grayscale_cmyk_alpha_and_16bit_conversions(lesion):
    bgr = cv2.cvtColor(lesion, cv2.COLOR_RGB2BGR)
    gray, notes = decode_rgb(pil_bytes(Image.fromarray(lesion).convert("L"), "JPEG", quality=95))
    assert notes == ["grayscale->rgb"] and gray.shape == (150, 200, 3)
    assert np.array_equal(gray[:, :, 0], gray[:, :, 2])

    cmyk_bytes = pil_bytes(Image.fromarray(lesion).convert("CMYK"), "JPEG", quality=95)
    cmyk, notes = decode_rgb(cmyk_bytes)
    assert notes == ["cmyk->rgb"]
    reference = np.asarray(Image.open(io.BytesIO(cmyk_bytes)).convert("RGB"))
    assert np.abs(cmyk.astype(int) - reference).mean() < 2.0  # Adobe-inverted CMYK read right
    assert np.abs(cmyk.astype(int) - lesion).mean() < 3.0

    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    bgra[:, :, 3] = 0  # fully transparent: colours are kept as stored, not painted white
    rgb, notes = decode_rgb(png_bytes(bgra))
    assert notes == ["png-content", "alpha-dropped"] and np.array_equal(rgb, lesion)

    rgb, notes = decode_rgb(png_bytes(bgr.astype(np.uint16) * 257))
    assert notes == ["png-content", "16bit->8bit"] and np.array_equal(rgb, lesion)

    gray16 = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    rgb, notes = decode_rgb(png_bytes(gray16))
    assert notes == ["png-content", "grayscale->rgb", "16bit->8bit"] and rgb.shape == (150, 200, 3)

    palette = Image.fromarray(lesion).convert("P", palette=Image.ADAPTIVE)
    rgb, notes = decode_rgb(pil_bytes(palette, "PNG"))
    assert notes == ["png-content", "palette->rgb"] and np.array_equal(
        rgb, np.asarray(palette.convert("RGB"))
    )


# --- reduced-scale decoding ------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, factor",
    [
        (200, 150, 1),
        (600, 450, 2),
        (600, 447, 2),
        (600, 446, 1),
        (1022, 767, 2),
        (1504, 1129, 4),
        (3072, 2304, 8),
        (6000, 4000, 8),
    ],
)
def test_jpeg_scale_factor_keeps_the_short_side_at_least_224(width, height, factor):
    assert jpeg_scale_factor(width, height, 224) == factor
    if factor > 1:
        assert -(-min(width, height) // factor) >= 224  # libjpeg rounds scaled sizes up


def test_reduced_decode_matches_full_decode_then_resize():
    # A real photograph's texture, brought to 1200x900 (decoded at 1/4).
    real = SHARED_DATA / "ham10000" / "images" / "ISIC_0027419.jpg"
    source = cv2.imread(str(real))[:, :, ::-1] if real.exists() else synthetic_lesion(200, 150, seed=9)
    data = jpeg_bytes(cv2.resize(source, (1200, 900), interpolation=cv2.INTER_CUBIC), 95)
    reduced, notes = decode_rgb(data)
    assert reduced.shape == (225, 300, 3) and notes == []
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert np.abs(resize_for_model(reduced).astype(int) - resize_for_model(full)).mean() < 1.5


def test_reduced_decode_on_full_size_isic_images():
    sample = require_shared_data("isic_uda1_sample")
    for path in sorted(sample.glob("ISIC_*.jpg"))[:4]:
        data = path.read_bytes()
        header = read_image_header(data)
        rgb, notes = decode_rgb(data)
        factor = jpeg_scale_factor(header.width, header.height, 224)
        assert factor > 1 and min(rgb.shape[:2]) >= 224 and notes == []
        full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        area = cv2.resize(full, (224, 224), interpolation=cv2.INTER_AREA)
        assert np.abs(resize_for_model(rgb).astype(int) - area).mean() < 2.5, path.name


def test_large_non_jpeg_is_shrunk_like_a_jpeg():
    rgb, notes = decode_rgb(png_bytes(cv2.cvtColor(synthetic_lesion(2000, 1000, seed=2), cv2.COLOR_RGB2BGR)))
    assert rgb.shape == (250, 500, 3) and notes == ["png-content"]


# --- resizing and the whole step -------------------------------------------------------


def test_resize_squashes_the_whole_image(lesion):
    out = resize_for_model(lesion)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out[2, 2].tolist() == [0, 0, 255]  # the corner mark survives: no crop
    with pytest.raises(ValueError):
        resize_for_model(lesion.astype(np.float32))
    with pytest.raises(ValueError):
        resize_for_model(lesion[:, :, 0])


def test_preprocess_is_decode_then_resize_then_colour_constancy(lesion):
    data = jpeg_bytes(lesion)
    array, notes = preprocess_image_bytes(data, colour_constancy="shades_of_gray")
    resized = resize_for_model(decode_rgb(data)[0])
    assert np.array_equal(array, shades_of_gray(resized)) and notes == []
    assert not np.array_equal(array, resized)  # the synthetic lesion has a colour cast to remove
    assert np.array_equal(preprocess_image_bytes(data)[0], resized)  # the default: none
    assert preprocess_image_bytes(data, size=64)[0].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="colour_constancy"):
        preprocess_image_bytes(data, colour_constancy="grey_world")


def test_a_sharper_image_reaches_the_model_at_the_training_data_s_detail():
    # A 768x576 image (PH2's size) and the same image reduced to 200x150 (HAM's size, the
    # training data's) must give the model the same input; a HAM-size image is left alone.
    sharp = synthetic_lesion(768, 576, seed=3)
    rng = np.random.default_rng(3)
    sharp = np.clip(sharp.astype(int) + rng.integers(-40, 41, sharp.shape), 0, 255).astype(np.uint8)
    ham_size = cv2.resize(sharp, (200, 150), interpolation=cv2.INTER_AREA)
    assert SOURCE_SHORT_SIDE == 150
    assert np.array_equal(match_source_detail(sharp), ham_size)
    assert match_source_detail(ham_size) is ham_size
    assert match_source_detail(sharp[:, :200]).shape == (432, 150, 3)  # portrait 200x576: the width is short
    # The PNG is decoded at 1/2 first, then reduced: close to, not equal to, one INTER_AREA step.
    from_sharp = preprocess_image_bytes(png_bytes(cv2.cvtColor(sharp, cv2.COLOR_RGB2BGR)))[0]
    assert np.abs(from_sharp.astype(int) - resize_for_model(ham_size)).mean() < 1.5
    assert np.array_equal(
        preprocess_image_bytes(png_bytes(cv2.cvtColor(ham_size, cv2.COLOR_RGB2BGR)))[0],
        resize_for_model(ham_size),
    )
    # Without the step the fine texture would have reached the model.
    assert np.abs(resize_for_model(sharp).astype(int) - from_sharp).mean() > 5


def test_shades_of_gray_removes_a_colour_cast_and_keeps_a_neutral_image():
    rng = np.random.default_rng(0)
    neutral = np.repeat(rng.integers(30, 220, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    assert np.array_equal(shades_of_gray(neutral), neutral)  # a grey scene under white light: unchanged
    # The same scene under a reddish light (another device's white balance) comes back
    # close to the neutral one: per-channel p-means equal again.
    cast = np.clip(neutral * np.array([1.25, 1.0, 0.8]), 0, 255).astype(np.uint8)
    corrected = shades_of_gray(cast).astype(np.float64)
    p_means = np.power(np.mean(np.power(corrected / 255, 6), axis=(0, 1)), 1 / 6)
    assert p_means.max() - p_means.min() < 0.01
    assert np.abs(corrected - shades_of_gray(neutral)).mean() < 12
    black = np.zeros((8, 8, 3), np.uint8)
    black[..., 0] = 100  # no green or blue at all: nothing to estimate, returned as is
    assert np.array_equal(shades_of_gray(black), black)
    with pytest.raises(ValueError):
        shades_of_gray(neutral.astype(np.float32))


def test_colour_constancy_of_reads_manifests_old_and_new():
    assert colour_constancy_of({"version": "1", "size": 224}) == "none"
    assert colour_constancy_of({"version": "2", "colour_constancy": "shades_of_gray"}) == "shades_of_gray"
    with pytest.raises(ValueError):
        colour_constancy_of(None)
    with pytest.raises(ValueError):
        colour_constancy_of({"colour_constancy": "retinex"})


# --- masks -----------------------------------------------------------------------------


def test_masks_from_the_shared_data_are_binary_and_aligned():
    masks = require_shared_data("ham10000", "masks")
    for path in sorted(masks.glob("*_segmentation.png"))[:5]:
        mask = decode_mask(path.read_bytes())
        assert mask.shape == (224, 224) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        nearest = cv2.resize(
            cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (224, 224), interpolation=cv2.INTER_NEAREST_EXACT
        )
        assert np.mean(mask == nearest) > 0.99


def test_large_masks_match_one_area_resize_within_a_fraction_of_a_percent():
    # decode_mask halves a 600x450 mask exactly before its area resize (half the cost);
    # the result must stay the "at least half of the footprint is lesion" mask.
    for seed in range(5):
        mask = lesion_mask(synthetic_lesion(600, 450, seed=seed))
        direct = cv2.resize(mask, (224, 224), interpolation=cv2.INTER_AREA)
        expected = np.where(direct >= 128, np.uint8(255), np.uint8(0))
        got = decode_mask(png_bytes(mask))
        assert set(np.unique(got)) <= {0, 255}
        assert np.mean(got != expected) < 0.002, seed


def test_mask_variants_become_the_same_binary_mask(lesion):
    mask = lesion_mask(lesion)
    expected = decode_mask(png_bytes(mask))
    assert set(np.unique(expected)) == {0, 255}
    red = np.zeros((*mask.shape, 3), np.uint8)
    red[:, :, 2] = mask  # BGR: pure red lesion, luminance 76
    variants = {
        "0/1 labels": png_bytes(mask // 255),
        "red": png_bytes(red),
        "16-bit": png_bytes(mask.astype(np.uint16) * 257),
        "16-bit 0/1": png_bytes((mask // 255).astype(np.uint16)),
        "jpeg": jpeg_bytes(np.repeat(mask[:, :, None], 3, axis=2), 90),
    }
    for name, data in variants.items():
        assert np.mean(decode_mask(data) == expected) > 0.995, name


def test_bad_masks_are_refused(lesion):
    with pytest.raises(RejectedImage) as caught:
        decode_mask(jpeg_bytes(lesion))  # a photograph is not a mask
    assert caught.value.reason == "bad-mask"
    with pytest.raises(RejectedImage) as caught:
        decode_mask(b"")
    assert caught.value.reason == "empty-file"
    with pytest.raises(RejectedImage) as caught:
        decode_mask(png_bomb())
    assert caught.value.reason == "decompression-bomb"


# --- runs inside Spark executors -------------------------------------------------------


def test_modules_import_neither_tensorflow_nor_pyspark():
    code = (
        "import sys, melanoma.imaging, melanoma.image_header, melanoma.image_decode, melanoma.colour_constancy,"
        " melanoma.drops, melanoma.drop_scan, melanoma.drop_metadata, melanoma.augment;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'pyspark', 'torch'));"
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(image_decode.__file__).resolve().parents[1]
    )
