"""Grad-CAM on hand-built models whose evidence is known, and the lesion-focus arithmetic."""

from __future__ import annotations

import csv
import io
import json

import cv2
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from melanoma.records import Shard  # noqa: E402
from melanoma.storage import LocalStorage  # noqa: E402
from training import gradcam  # noqa: E402
from training.gradcam import gradcam_heatmaps, overlay_heatmap, upsample_heatmap  # noqa: E402
from training.lesion_focus import (  # noqa: E402
    lesion_focus,
    lesion_focus_check,
    outcome,
    run_gradcam,
    safe_name,
    select_gallery,
    summarise_focus,
)

SIZE = 32
PATCH = 8


def bright_patch_model(size: int = SIZE, stride: int = 1, dense_scale: float = 1.0, split_head: bool = False):
    """A model whose melanoma evidence is bright pixels, and only bright pixels.

    Channel 0 of the 1x1-ish "conv" fires only where a pixel is brighter than 200 (bias -200
    after averaging RGB) and pushes the score up; channel 1 fires on dark pixels and pushes it
    down. So the correct Grad-CAM is positive exactly on the bright patch and zero elsewhere
    (the dark evidence has a negative weight and is removed by the ReLU).
    """
    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(2, stride, strides=stride, activation="relu", name="conv")
    x = conv(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if split_head:
        x = keras.layers.Dense(1, name="logit")(x)
        outputs = keras.layers.Activation("sigmoid", name="probability")(x)
        head = None
    else:
        head = keras.layers.Dense(1, activation="sigmoid", name="probability")
        outputs = head(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((stride, stride, 3, 2), np.float32)
    kernel[..., 0] = 1.0 / (3 * stride * stride)
    kernel[..., 1] = -1.0 / (3 * stride * stride)
    conv.set_weights([kernel, np.array([-200.0, 100.0], np.float32)])
    dense = model.get_layer("logit" if split_head else "probability")
    dense.set_weights([np.array([[dense_scale], [-dense_scale]], np.float32), np.zeros(1, np.float32)])
    return model


def patch_images(corners: list[tuple[int, int]], size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Dim noise (0..90) with one 255 square of side PATCH at each (row, col) corner; None: no patch."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (len(corners), size, size, 3)).astype(np.uint8)
    for image, corner in zip(images, corners):
        if corner is not None:
            r, c = corner
            image[r : r + PATCH, c : c + PATCH] = 255
    return images


CORNERS = [(0, 0), (20, 4), (10, 22), (24, 24)]


@pytest.mark.parametrize("plusplus", [False, True])
def test_heatmap_covers_exactly_the_evidence(plusplus):
    model = bright_patch_model()
    heatmaps = gradcam_heatmaps(model, patch_images(CORNERS), "conv", plusplus=plusplus)
    assert heatmaps.shape == (len(CORNERS), SIZE, SIZE) and heatmaps.dtype == np.float32
    for heatmap, (r, c) in zip(heatmaps, CORNERS):
        inside = np.zeros((SIZE, SIZE), bool)
        inside[r : r + PATCH, c : c + PATCH] = True
        peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        assert inside[peak]
        assert heatmap.max() == pytest.approx(1.0)
        # The dark pixels are negative evidence: ReLU must leave them at exactly zero.
        assert np.all(heatmap[~inside] == 0.0)
        assert np.all(heatmap[inside] > 0.5)


def test_image_without_evidence_gives_all_zero_map():
    model = bright_patch_model()
    heatmaps = gradcam_heatmaps(model, patch_images([None, (0, 0)]), "conv")
    assert np.all(heatmaps[0] == 0.0)
    assert heatmaps[1].max() == pytest.approx(1.0)


def test_saturated_probability_still_explained_through_the_logit():
    # With huge weights the sigmoid rounds to exactly 0 or 1 in float32, so the gradient of the
    # probability, p (1 - p), is zero and its map empty; the logit keeps the evidence visible.
    model = bright_patch_model(dense_scale=1e4)
    images = patch_images([(4, 4)])
    assert float(model.predict(images, verbose=0)[0, 0]) in (0.0, 1.0)
    heatmap = gradcam_heatmaps(model, images, "conv")[0]
    assert heatmap.max() == pytest.approx(1.0)
    assert heatmap[4 : 4 + PATCH, 4 : 4 + PATCH].min() > 0.5
    assert heatmap.sum() == pytest.approx(heatmap[4 : 4 + PATCH, 4 : 4 + PATCH].sum())


def test_activation_head_and_batching_give_the_same_maps():
    images = patch_images(CORNERS, seed=3)
    fused = gradcam_heatmaps(bright_patch_model(), images, "conv", batch_size=32)
    split = gradcam_heatmaps(bright_patch_model(split_head=True), images, "conv", batch_size=3)
    np.testing.assert_allclose(split, fused, atol=1e-6)


@pytest.mark.parametrize("plusplus", [False, True])
def test_padded_last_batch_and_one_trace(plusplus, monkeypatch):
    # 7 images in batches of 3: the last batch is padded with black images, which must not
    # change any map, and the compiled step is traced once for all three calls.
    images = patch_images(CORNERS + [(2, 2), None, (12, 12)], seed=5)
    model = bright_patch_model(stride=2)
    steps = []
    build = gradcam.cam_step
    monkeypatch.setattr(gradcam, "cam_step", lambda *a, **k: steps.append(build(*a, **k)) or steps[-1])

    batched = gradcam_heatmaps(model, images, "conv", batch_size=3, plusplus=plusplus)
    one_by_one = np.concatenate(
        [gradcam_heatmaps(model, images[i : i + 1], "conv", plusplus=plusplus) for i in range(7)]
    )

    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    assert steps[0].experimental_get_tracing_count() == 1


@pytest.mark.parametrize("plusplus", [False, True])
def test_compiled_maps_match_the_numpy_reference(plusplus):
    # The graph computes the weights itself; they must be _channel_weights' on the same tensors.
    import tensorflow as tf

    model = bright_patch_model(stride=2)
    images = patch_images(CORNERS, seed=7).astype(np.float32)
    images[:, :4] = 230  # several separate regions of evidence, where Grad-CAM++ differs
    grad_model, to_score = gradcam.score_model(model, "conv")
    with tf.GradientTape() as tape:
        maps, head_input = grad_model(tf.constant(images), training=False)
        scores = to_score(head_input)
    grads = tape.gradient(scores, maps).numpy().astype(np.float64)
    maps = maps.numpy().astype(np.float64)
    weights = gradcam.channel_weights(maps, grads, plusplus)
    expected = gradcam.normalise_maps(np.maximum(np.einsum("nhwc,nc->nhw", maps, weights), 0.0))

    np.testing.assert_allclose(
        gradcam_heatmaps(model, images, "conv", plusplus=plusplus), expected, atol=1e-6
    )


def test_no_images_gives_an_empty_stack():
    assert gradcam_heatmaps(
        bright_patch_model(stride=2), np.zeros((0, SIZE, SIZE, 3), np.uint8), "conv"
    ).shape == (0, 16, 16)


def test_gradcam_plusplus_weights_match_the_closed_form():
    # One channel, constant gradient g = 2 over a 2x2 map of ones (sum 4):
    # alpha = g^2 / (2 g^2 + 4 g^3) = 4 / 40 = 0.1 at each pixel, weight = 4 * 0.1 * relu(2) = 0.8.
    maps = np.ones((1, 2, 2, 1))
    grads = np.full((1, 2, 2, 1), 2.0)
    np.testing.assert_allclose(gradcam.channel_weights(maps, grads, plusplus=True), [[0.8]])
    np.testing.assert_allclose(gradcam.channel_weights(maps, grads, plusplus=False), [[2.0]])
    # Negative gradients carry no Grad-CAM++ weight.
    np.testing.assert_allclose(gradcam.channel_weights(maps, -grads, plusplus=True), [[0.0]])


def test_upsample_is_bilinear_on_pixel_centres():
    out = upsample_heatmap(np.array([[0.0, 1.0]], np.float32), (2, 4))
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]] * 2)
    assert out.dtype == np.float32


def test_overlay_blends_rgb_colours():
    image = np.full((4, 4, 3), 100, np.uint8)
    np.testing.assert_array_equal(overlay_heatmap(image, np.ones((4, 4)), alpha=0.0), image)
    hot = overlay_heatmap(image, np.ones((4, 4)), alpha=1.0)
    cold = overlay_heatmap(image, np.zeros((4, 4)), alpha=1.0)
    # JET: hot is red, cold is blue, in RGB order (OpenCV hands back BGR).
    assert hot[0, 0, 0] > 100 and hot[0, 0, 2] == 0
    assert cold[0, 0, 2] > 100 and cold[0, 0, 0] == 0
    half = overlay_heatmap(image, np.ones((4, 4)), alpha=0.5)
    np.testing.assert_array_equal(half[0, 0], np.round(0.5 * 100 + 0.5 * hot[0, 0].astype(float)))
    with pytest.raises(ValueError):
        overlay_heatmap(image, np.ones((3, 4)))


def test_lesion_focus_exact_values():
    heatmap = np.zeros((4, 4))
    heatmap[:2, :2] = 1.0
    heatmap[3, 3] = 3.0
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 255
    focus = lesion_focus(heatmap, mask)
    assert focus["energy_inside"] == pytest.approx(4 / 7)
    assert focus["pointing_hit"] is False
    assert focus["lesion_area_share"] == pytest.approx(0.25)

    heatmap[0, 1] = 5.0
    focus = lesion_focus(heatmap, mask.astype(bool))
    assert focus["energy_inside"] == pytest.approx(8 / 11)
    assert focus["pointing_hit"] is True


def test_lesion_focus_empty_heatmap_and_bad_masks():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    assert lesion_focus(np.zeros((4, 4)), mask) == {
        "energy_inside": None,
        "pointing_hit": None,
        "lesion_area_share": 1 / 16,
    }
    with pytest.raises(ValueError, match="empty lesion mask"):
        lesion_focus(np.ones((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        lesion_focus(np.ones((4, 4)), np.ones((4, 5)))


def test_outcome_rule():
    assert [outcome(1, 0.5, 0.5), outcome(1, 0.49, 0.5), outcome(0, 0.5, 0.5), outcome(0, 0.1, 0.5)] == [
        "TP",
        "FN",
        "FP",
        "TN",
    ]


def _row(label, out, energy, hit, has_mask=True, area=0.2):
    return {
        "label": label,
        "outcome": out,
        "has_mask": has_mask,
        "energy_inside": energy,
        "pointing_hit": hit,
        "lesion_area_share": area if has_mask else None,
    }


def test_summarise_focus_counts_and_means():
    rows = [
        _row(1, "TP", 0.8, True),
        _row(1, "TP", 0.6, False),
        _row(1, "FN", None, None, has_mask=False),
        _row(0, "FP", 0.2, False, area=0.4),
        _row(0, "TN", None, None),  # mask present, empty heatmap
    ]
    summary = summarise_focus(rows)
    assert summary["n_images"] == 5
    assert summary["n_without_mask"] == 1
    assert summary["n_empty_heatmap"] == 1
    melanoma = summary["by_class"]["melanoma"]
    assert (melanoma["n"], melanoma["n_scored"], melanoma["n_without_mask"]) == (3, 2, 1)
    assert melanoma["energy_inside_mean"] == pytest.approx(0.7)
    assert melanoma["energy_inside_median"] == pytest.approx(0.7)
    assert melanoma["pointing_hit_rate"] == pytest.approx(0.5)
    other = summary["by_class"]["other"]
    assert (other["n"], other["n_scored"]) == (2, 1)
    assert other["lesion_area_share_mean"] == pytest.approx(0.4)
    assert summary["by_outcome"]["FN"]["n_scored"] == 0
    assert summary["by_outcome"]["FN"]["energy_inside_mean"] is None
    assert summary["by_outcome"]["TP"]["pointing_hit_rate"] == pytest.approx(0.5)
    assert summary["overall"]["energy_inside_median"] == pytest.approx(0.6)
    json.dumps(summary)  # it goes into a JSON file and an XCom


def test_lesion_focus_check_compares_melanoma_maps_with_a_uniform_map():
    on = summarise_focus(
        [_row(1, "TP", 0.5, True, area=0.3), _row(1, "FN", 0.3, False, area=0.3), _row(0, "TN", 0.0, False)]
    )
    check = lesion_focus_check(on)
    assert check["on_lesion"] is True and check["n_scored"] == 2
    assert check["energy_inside_mean"] == pytest.approx(0.4) and check[
        "lesion_area_share_mean"
    ] == pytest.approx(0.3)
    # Melanoma maps no better than uniform fail, however well the other class's maps do.
    off = summarise_focus([_row(1, "TP", 0.1, False, area=0.3), _row(0, "TN", 0.9, True)])
    assert lesion_focus_check(off)["on_lesion"] is False
    assert (
        lesion_focus_check(summarise_focus([_row(1, "TP", None, None, has_mask=False)]))["on_lesion"] is None
    )


def test_select_gallery_confident_and_borderline():
    probabilities = {"a": 0.99, "b": 0.7, "c": 0.55, "d": 0.3, "e": 0.45, "f": 0.01, "g": 0.6}
    labels = {"a": 1, "b": 1, "c": 1, "d": 1, "e": 0, "f": 0, "g": 0}
    rows = [{"image_id": i, "label": labels[i], "probability": p} for i, p in probabilities.items()]
    gallery = select_gallery(rows, threshold=0.5, per_group=1)
    picked = [(g["outcome"], g["selection"], g["image_id"]) for g in gallery]
    assert picked == [
        ("TP", "most confident", "a"),
        ("TP", "borderline", "c"),
        ("FP", "most confident", "g"),  # the only FP, listed once
        ("FN", "most confident", "d"),
        ("TN", "most confident", "f"),
        ("TN", "borderline", "e"),
    ]
    assert gallery[0]["probability"] == 0.99 and "outcome" not in rows[0]
    everything = select_gallery(rows, threshold=0.5, per_group=3)
    assert sorted(g["image_id"] for g in everything) == sorted(probabilities)


def _records(ids, labels, has_mask):
    return [
        {
            "image_id": i,
            "lesion_id": f"L{n}",
            "label": y,
            "dx": "mel" if y else "nv",
            "split": "test",
            "has_mask": m,
        }
        for n, (i, y, m) in enumerate(zip(ids, labels, has_mask))
    ]


def test_run_gradcam_end_to_end(tmp_path):
    size, stride = 64, 4
    corners = [(0, 0), (40, 8), (8, 40), (30, 30), None]
    images = patch_images(corners, size=size, seed=1)
    masks = np.zeros((len(corners), size, size), np.uint8)
    masks[0, 0:PATCH, 0:PATCH] = 255  # map on the lesion
    masks[1, 0:16, 48:64] = 255  # lesion elsewhere: a miss
    masks[4, 10:20, 10:20] = 255  # no evidence in the image: empty map
    ids = ["ISIC_1", "ISIC_2", "../evil id", "ISIC_4", "ISIC_5"]
    shard = Shard(images, masks, _records(ids, [1, 1, 0, 0, 0], [True, True, False, False, True]))
    predictions = dict(zip(ids, [0.9, 0.3, 0.8, 0.2, 0.1]))
    payload = {"threshold": 0.5, "strategy": "youden", "chosen_on": "val", "test": {"auroc": 0.9}}
    storage = LocalStorage(tmp_path)

    result = run_gradcam(
        bright_patch_model(size, stride),
        shard,
        predictions,
        payload,
        storage,
        "runs/r1/gradcam",
        layer_name="conv",
    )

    assert result["threshold"] == 0.5 and result["strategy"] == "youden"
    assert result["n_images"] == 5 and result["n_without_mask"] == 2
    json.dumps(result)
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes("runs/r1/gradcam/lesion_focus.csv").decode())))
    by_id = {r["image_id"]: r for r in rows}
    assert [r["image_id"] for r in rows] == ids
    assert float(by_id["ISIC_1"]["energy_inside"]) > 0.8 and by_id["ISIC_1"]["pointing_hit"] == "True"
    assert float(by_id["ISIC_2"]["energy_inside"]) < 0.05 and by_id["ISIC_2"]["pointing_hit"] == "False"
    assert by_id["ISIC_4"]["energy_inside"] == "" and by_id["ISIC_4"]["has_mask"] == "False"
    assert by_id["ISIC_5"]["energy_inside"] == "" and by_id["ISIC_5"]["has_mask"] == "True"
    assert [r["outcome"] for r in rows] == ["TP", "FN", "FP", "TN", "TN"]

    summary = json.loads(storage.read_bytes("runs/r1/gradcam/gradcam_summary.json"))
    assert summary["threshold"] == 0.5 and summary["strategy"] == "youden" and summary["chosen_on"] == "val"
    assert summary["heatmaps_per_s"] > 0 and summary["heatmap_shape"] == [16, 16]
    assert summary["combine_layers"] is None  # one layer: nothing to combine
    assert summary["focus"]["n_without_mask"] == 2 and summary["focus"]["n_empty_heatmap"] == 1
    assert summary["focus"]["by_outcome"]["TP"]["pointing_hit_rate"] == 1.0
    # Melanomas: ISIC_1's map is on its lesion, ISIC_2's is not; their mean beats the area share.
    assert (
        summary["lesion_focus_check"]["n_scored"] == 2 and summary["lesion_focus_check"]["on_lesion"] is True
    )
    assert result["melanoma_maps_on_lesion"] is True

    # Every image is in a group of at most 2, so all five are in the gallery, with overlays.
    assert sorted(g["image_id"] for g in summary["gallery"]) == sorted(ids)
    assert sorted(result["keys"]["overlays"]) == sorted(g["overlay_key"] for g in summary["gallery"])
    for key in result["keys"]["overlays"]:
        assert key.startswith("runs/r1/gradcam/overlays/") and ".." not in key
        png = cv2.imdecode(np.frombuffer(storage.read_bytes(key), np.uint8), cv2.IMREAD_COLOR)
        assert png.shape == (size, 2 * size, 3)
    first = next(g for g in summary["gallery"] if g["image_id"] == "ISIC_1")
    side_by_side = cv2.imdecode(
        np.frombuffer(storage.read_bytes(first["overlay_key"]), np.uint8), cv2.IMREAD_COLOR
    )
    np.testing.assert_array_equal(side_by_side[:, :size, ::-1], images[0])  # left half: the original


def test_run_gradcam_refuses_images_without_prediction(tmp_path):
    shard = Shard(patch_images([(0, 0)]), np.zeros((1, SIZE, SIZE), np.uint8), _records(["x"], [1], [False]))
    with pytest.raises(ValueError, match="no prediction"):
        run_gradcam(
            bright_patch_model(),
            shard,
            {},
            {"threshold": 0.5},
            LocalStorage(tmp_path),
            "g",
            layer_name="conv",
        )


@pytest.mark.slow
def test_real_classifier_graph():
    # The project's classifier (random weights): its sigmoid Dense head and named last conv
    # layer must be understood as they are, for both methods.
    from training.model import build_classifier, last_conv_layer_name

    model = build_classifier("efficientnet_lite0", None)
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)).astype(np.uint8)
    for plusplus in (False, True):
        heatmaps = gradcam_heatmaps(model, images, last_conv_layer_name(model), plusplus=plusplus)
        assert heatmaps.shape == (2, 7, 7) and heatmaps.dtype == np.float32
        assert np.all((heatmaps >= 0) & (heatmaps <= 1))
        # Each map is normalised to peak 1, or is all zero if random weights left no positive evidence.
        assert all(peak == pytest.approx(1.0) or peak == 0.0 for peak in heatmaps.max(axis=(1, 2)))


def test_overlay_names_are_safe_and_distinct():
    assert safe_name("ISIC_0000001") == "ISIC_0000001"
    names = {safe_name(i) for i in ("a/b", "a_b", "a b", "../a_b")}
    assert len(names) == 4
    assert all("/" not in n and not n.startswith(".") for n in names)
