"""build_classifier and its helpers. ResNet50 checks use random weights (no download)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from training import efficientnet_lite as lite
from training import model as M
from training.weights import WeightsUnavailableError, sha256_file


def _images(n: int = 2, size: int = 224, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) noise images."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _trainable_count(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def resnet() -> keras.Model:
    keras.utils.set_random_seed(0)
    return M.build_classifier("resnet50", None)


def test_resnet50_parameter_counts(resnet: keras.Model) -> None:
    assert resnet.count_params() == 24_112_513
    M.freeze_backbone(resnet)
    assert _trainable_count(resnet) == 524_801


def test_graph_is_flat_with_named_head(resnet: keras.Model) -> None:
    assert not any(isinstance(layer, keras.Model) for layer in resnet.layers)
    assert [layer.name for layer in resnet.layers[-5:]] == list(M.HEAD_LAYERS)
    assert tuple(resnet.get_layer(M.last_conv_layer_name(resnet)).output.shape) == (None, 7, 7, 2048)
    assert resnet.get_layer("preprocess").count_params() == 0


def test_preprocessing_is_inside_the_model(resnet: keras.Model) -> None:
    images = _images()
    preprocess = keras.Model(resnet.input, resnet.get_layer("preprocess").output)
    expected = keras.applications.resnet50.preprocess_input(images.astype("float32"))
    np.testing.assert_allclose(np.asarray(preprocess(images.astype("float32"))), expected, atol=1e-4)
    from_uint8 = resnet.predict(images, verbose=0)
    from_float = resnet.predict(images.astype("float32"), verbose=0)
    assert from_uint8.shape == (2, 1)
    np.testing.assert_array_equal(from_uint8, from_float)


def test_save_load_round_trip(resnet: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / "classifier.keras"
    resnet.save(path)
    loaded = M.load_classifier(path)
    images = _images(seed=1)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), resnet.predict(images, verbose=0))
    assert M.backbone_name(loaded) == "resnet50"
    assert M.last_conv_layer_name(loaded) == "conv5_block3_out"
    assert M.weights_provenance(loaded) == M.weights_provenance(resnet)


def test_unfreeze_last_blocks_keeps_batchnorm_frozen(resnet: keras.Model) -> None:
    M.unfreeze_last_blocks(resnet, 3)  # the three conv5 blocks
    trainable = [layer.name for layer in M.backbone_layers(resnet) if layer.trainable_weights]
    assert trainable and all(name.startswith("conv5_") for name in trainable)
    assert "conv5_block1_0_conv" in trainable and "conv4_block6_3_conv" not in trainable
    batchnorms = [layer for layer in resnet.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert not any(bn.trainable for bn in batchnorms)
    conv5_convs = [
        layer for layer in resnet.layers if layer.name.startswith("conv5_") and layer.name.endswith("_conv")
    ]
    expected = 524_801 + sum(layer.count_params() for layer in conv5_convs)
    assert _trainable_count(resnet) == expected

    # A training-mode forward pass must not touch frozen BN statistics.
    bn = resnet.get_layer("conv5_block3_3_bn")
    before = bn.moving_mean.numpy().copy()
    resnet(_images(seed=2).astype("float32"), training=True)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)

    M.unfreeze_last_blocks(resnet, 0)
    assert _trainable_count(resnet) == 524_801
    with pytest.raises(ValueError, match="n_blocks"):
        M.unfreeze_last_blocks(resnet, 17)


def test_head_model_shares_weights_with_classifier(resnet: keras.Model) -> None:
    M.freeze_backbone(resnet)
    features_model, head = M.feature_extractor(resnet), M.head_model(resnet)
    images = _images(seed=3)
    features = features_model.predict(images, verbose=0)
    assert features.shape == (2, 2048)
    np.testing.assert_allclose(
        head.predict(features, verbose=0), resnet.predict(images, verbose=0), rtol=1e-5, atol=1e-6
    )
    before = resnet.get_layer("head_dense").kernel.numpy().copy()
    head.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    head.fit(features, np.array([[1.0], [0.0]]), epochs=1, verbose=0)
    after_in_classifier = resnet.get_layer("head_dense").kernel.numpy()
    assert not np.array_equal(after_in_classifier, before)
    np.testing.assert_array_equal(after_in_classifier, head.get_layer("head_dense").kernel.numpy())


def test_resnet50_loads_a_local_weights_file(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    reference = keras.applications.ResNet50(include_top=False, weights=None)
    path = tmp_path / "resnet50_notop.weights.h5"
    reference.save_weights(path)
    model = M.build_classifier("resnet50", str(path))
    np.testing.assert_array_equal(
        model.get_layer("conv5_block3_3_conv").kernel.numpy(),
        reference.get_layer("conv5_block3_3_conv").kernel.numpy(),
    )
    provenance = M.weights_provenance(model)
    assert provenance["weights_sha256"] == sha256_file(path)
    assert provenance["backbone"] == "resnet50"


def test_efficientnet_lite0_classifier_uses_package_weights() -> None:
    model = M.build_classifier("efficientnet_lite0", "imagenet")
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert M.last_conv_layer_name(model) == "top_activation"
    # The classifier's trunk must equal the verified ImageNet network on normalised input.
    reference = lite.efficientnet_lite_imagenet_classifier(lite.IMAGENET_PACKAGE)
    images = _images(n=1, seed=4)
    trunk = keras.Model(model.input, model.get_layer("top_activation").output)
    expected_trunk = keras.Model(reference.input, reference.get_layer("top_activation").output)
    normalised = (images.astype("float32") - 127.0) / 128.0
    np.testing.assert_allclose(
        np.asarray(trunk(images.astype("float32"))), np.asarray(expected_trunk(normalised)), atol=1e-5
    )
    assert M.weights_provenance(model)["weights_sha256"] == lite.PACKAGE_WEIGHTS_SHA256
    assert M.weights_provenance({"backbone": "efficientnet_lite0", "weights": "imagenet"}) == (
        M.weights_provenance(model)
    )
    # Frozen features must not be stochastic in training mode (feature caching relies on it).
    features = M.feature_extractor(model)
    M.freeze_backbone(model)
    np.testing.assert_allclose(
        np.asarray(features(images, training=True)),
        np.asarray(features(images, training=False)),
        atol=1e-6,
    )
    M.unfreeze_last_blocks(model, 1)
    trainable = {layer.name for layer in M.backbone_layers(model) if layer.trainable_weights}
    assert trainable == {"block7a_expand_conv", "block7a_dwconv", "block7a_project_conv", "top_conv"}


@pytest.mark.parametrize("backbone", M.BACKBONES)
def test_missing_weights_file_is_refused(backbone: str) -> None:
    with pytest.raises(WeightsUnavailableError, match="neither 'imagenet' nor an existing file"):
        M.build_classifier(backbone, "/nonexistent/weights.h5")


def test_unreachable_resnet50_imagenet_weights_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise Exception("URL fetch failure: network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsUnavailableError, match="keras/models"):
        M.build_classifier("resnet50", "imagenet")


# Keras warns once per layer it cannot fill before raising; the raise is what matters here.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_weights_file_for_another_model_is_refused(tmp_path: Path) -> None:
    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    path = tmp_path / "small.weights.h5"
    small.save_weights(path)
    with pytest.raises(WeightsUnavailableError, match="could not load ResNet50 weights"):
        M.build_classifier("resnet50", str(path))
    lite_path = Path(__file__).parent / "data" / "torch_zip_sample.pth"
    with pytest.raises(WeightsUnavailableError, match="not an EfficientNet-Lite0"):
        M.build_classifier("efficientnet_lite0", str(lite_path))


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        M.build_classifier("vgg16", None)


def test_efficientnet_lite2_classifier_blocks_and_cache_point() -> None:
    """Lite2 has 21 blocks; unfreezing 14 of them is stages 4-7, fed by block3c's 28x28x48 output."""
    from training.model import fine_tune_cut

    model = M.build_classifier("efficientnet_lite2", "imagenet")
    assert M.weights_provenance(model)["weights_sha256"] == lite.VARIANTS["efficientnet_lite2"].weights_sha256
    assert tuple(model.get_layer(M.last_conv_layer_name(model)).output.shape) == (None, 7, 7, 1280)
    assert len(M.backbone_blocks(model)) == 21
    M.unfreeze_last_blocks(model, 14)
    trainable_blocks = sorted(
        {layer.name[:7] for layer in M.backbone_layers(model) if layer.trainable_weights}
    )
    assert trainable_blocks[0] == "block4a" and "block3c" not in trainable_blocks
    assert tuple(fine_tune_cut(model, 14).shape) == (None, 28, 28, 48)
