"""training.ensemble: members' logits averaged in one flat graph, and Grad-CAM on it."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.data import DX_CLASSES  # noqa: E402
from training.ensemble import build_ensemble, ensemble_backbones, gradcam_layer_names, is_ensemble  # noqa: E402
from training.gradcam import gradcam_heatmaps  # noqa: E402
from training.model import build_classifier  # noqa: E402

pytestmark = pytest.mark.slow


def logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p) - np.log1p(-p)


@pytest.fixture(scope="module")
def members():
    """A diagnosis-head member and a binary-head member, random weights, different seeds."""
    keras.utils.set_random_seed(0)
    dx_member = build_classifier("efficientnet_lite0", None, classes=DX_CLASSES)
    keras.utils.set_random_seed(1)
    binary_member = build_classifier("efficientnet_lite0", None)
    return dx_member, binary_member


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3)).astype(np.uint8)


def test_ensemble_probability_is_the_sigmoid_of_the_mean_member_logit(members, images, tmp_path):
    ensemble = build_ensemble(members)
    member_logits = [logit(m.predict(images, verbose=0).ravel()) for m in members]
    expected = 1.0 / (1.0 + np.exp(-np.mean(member_logits, axis=0)))
    got = ensemble.predict(images, verbose=0).ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert is_ensemble(ensemble) and not is_ensemble(members[0])
    assert ensemble_backbones(ensemble) == ["efficientnet_lite0", "efficientnet_lite0"]
    assert gradcam_layer_names(ensemble) == ["m0_top_activation", "m1_top_activation"]
    assert ensemble.count_params() == sum(m.count_params() for m in members)
    # Saved and loaded like any classifier (safe mode), same scores.
    ensemble.save(tmp_path / "ensemble.keras")
    loaded = keras.models.load_model(tmp_path / "ensemble.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0).ravel(), got, rtol=1e-6, atol=1e-7)


def test_ensemble_of_one_model_twice_explains_like_the_model(members, images):
    # Two copies: the same probability, and the same Grad-CAM map (each copy's gradient
    # halved, two copies added: the scaling to peak 1 leaves the single model's map).
    member = members[0]
    twice = build_ensemble([member, member])
    np.testing.assert_allclose(
        twice.predict(images, verbose=0), member.predict(images, verbose=0), rtol=1e-4, atol=1e-6
    )
    single_maps = gradcam_heatmaps(member, images, gradcam_layer_names(member))
    twice_maps = gradcam_heatmaps(twice, images, gradcam_layer_names(twice))
    assert twice_maps.shape == single_maps.shape == (5, 7, 7)
    np.testing.assert_allclose(twice_maps, single_maps, atol=1e-4)


def test_ensemble_heatmap_weighs_both_members(members, images):
    ensemble = build_ensemble(members)
    both = gradcam_heatmaps(ensemble, images, gradcam_layer_names(ensemble))
    first = gradcam_heatmaps(ensemble, images, gradcam_layer_names(ensemble)[:1])
    assert both.shape == (5, 7, 7) and np.isfinite(both).all()
    assert not np.allclose(both, first, atol=1e-3)  # the second member's maps change the result


def test_ensemble_heatmap_each_is_the_mean_of_the_members_own_maps(members, images):
    import tensorflow as tf

    from training.gradcam import cam_step, normalise_maps

    ensemble = build_ensemble(members)
    # Each member's own Grad-CAM, before the per-image scaling to peak 1.
    own = [
        cam_step(m, gradcam_layer_names(m), images.shape, tf.uint8, False)(tf.constant(images)).numpy()
        for m in members
    ]
    each = gradcam_heatmaps(ensemble, images, gradcam_layer_names(ensemble), combine_layers="each")
    np.testing.assert_allclose(each, normalise_maps((own[0] + own[1]) / 2), atol=1e-4)
    joint = gradcam_heatmaps(ensemble, images, gradcam_layer_names(ensemble), combine_layers="joint")
    assert not np.allclose(each, joint, atol=1e-3)  # the positive part taken before the sum, not after
    with pytest.raises(ValueError, match="combine_layers"):
        gradcam_heatmaps(ensemble, images, gradcam_layer_names(ensemble), combine_layers="max")


def test_build_ensemble_refuses_bad_members(members):
    with pytest.raises(ValueError, match="at least two"):
        build_ensemble(members[:1])
    with pytest.raises(ValueError, match="itself an ensemble"):
        build_ensemble([build_ensemble(members), members[0]])


def test_ensemble_cli_combines_saved_models(members, images, tmp_path, capsys):
    import json

    from training.cli import RESULT_PREFIX, main

    paths = []
    for index, member in enumerate(members):
        paths.append(str(tmp_path / f"member{index}.keras"))
        member.save(paths[-1])
    out = tmp_path / "out" / "model.keras"
    assert main(["ensemble", "--member", paths[0], "--member", paths[1], "--output", str(out)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(RESULT_PREFIX)][-1]
    assert json.loads(line[len(RESULT_PREFIX) :])["members"] == paths
    loaded = keras.models.load_model(out)
    np.testing.assert_allclose(
        loaded.predict(images, verbose=0),
        build_ensemble(members).predict(images, verbose=0),
        rtol=1e-5,
        atol=1e-7,
    )
