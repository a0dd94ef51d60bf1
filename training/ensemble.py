"""Several trained classifiers as ONE flat Keras graph that averages their melanoma logits.

    image -> m0_preprocess -> <member 0's layers, all prefixed m0_> -> m0_melanoma_logit --+
          -> m1_preprocess -> <member 1's layers, all prefixed m1_> -> m1_melanoma_logit --+-> ensemble_logit (mean)
          ...                                                                              -> melanoma_probability (sigmoid)

The result is a model like any other (images (N,224,224,3) in, (N,1) probability out), so
evaluate, predict and the DAG's tasks use it unchanged. Averaging logits, not
probabilities, is the same rule as lesion pooling (:func:`training.metrics.lesion_pooled_scores`).
Grad-CAM explains the averaged logit at every member's last conv layer
(:func:`gradcam_layer_names`): the gradient reaching member m is 1/M of its own, so the
default heatmap (``combine_layers="each"``) is the mean of the members' own Grad-CAM maps;
``"joint"`` sums the weighted maps before the ReLU instead (see BENCHMARKS.md for why
``each`` was chosen).
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from training.model import (
    INPUT_LAYER,
    LAST_CONV_LAYER,
    PREPROCESS_LAYER,
    BackbonePreprocessing,
    last_conv_layer_name,
)
from training.model_io import load_model, save_model

ENSEMBLE_LOGIT = "ensemble_logit"
OUTPUT_LAYER = "melanoma_probability"


def member_prefix(index: int) -> str:
    return f"m{index}_"


def _logit_clone(member: keras.Model, index: int, images: keras.KerasTensor) -> keras.KerasTensor:
    """Member ``index`` rebuilt on ``images`` with prefixed layer names; returns its logit (N,1).

    The final sigmoid (a Dense with sigmoid activation in the binary head, an Activation
    after ``melanoma_logit`` in the diagnosis head) is rebuilt without it.
    """
    prefix = member_prefix(index)

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        config["name"] = prefix + layer.name
        if layer.name == OUTPUT_LAYER:
            config["activation"] = "linear"
            config["name"] = (
                prefix + "melanoma_logit" + ("_dense" if isinstance(layer, layers.Dense) else "_out")
            )
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(member, input_tensors=images, clone_function=clone)
    for source, target in zip(member.layers, copy.layers, strict=True):
        if source.weights:
            target.set_weights(source.get_weights())
    return copy.outputs[0]


def build_ensemble(members: Sequence[keras.Model], name: str = "melanoma_ensemble") -> keras.Model:
    """One model whose probability is sigmoid(mean of the members' melanoma logits).

    members: two or more classifiers from :func:`training.model.build_classifier` (possibly
    loaded from disk), same input size; they may differ in backbone, target and weights.
    The members are left untouched (their weights are copied).
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    for index, member in enumerate(members):
        if is_ensemble(member):
            raise ValueError(f"member {index} is itself an ensemble: pass its members instead")
        if not isinstance(member.get_layer(PREPROCESS_LAYER), BackbonePreprocessing):
            raise ValueError(f"member {index} ({member.name}) was not built by build_classifier")
    shapes = {tuple(member.inputs[0].shape[1:]) for member in members}
    if len(shapes) != 1:
        raise ValueError(f"members take different input shapes: {sorted(shapes)}")
    images = keras.Input(shapes.pop(), name=INPUT_LAYER)
    logits = [_logit_clone(member, index, images) for index, member in enumerate(members)]
    mean_logit = layers.Average(dtype="float32", name=ENSEMBLE_LOGIT)(logits)
    probability = layers.Activation("sigmoid", dtype="float32", name=OUTPUT_LAYER)(mean_logit)
    return keras.Model(images, probability, name=name)


def save_ensemble(member_uris: Sequence[str], output_uri: str) -> dict:
    """Load the members (paths or URIs), build their ensemble and save it to ``output_uri``."""
    ensemble = build_ensemble([load_model(uri) for uri in member_uris])
    save_model(ensemble, output_uri)
    return {"model_uri": output_uri, "members": list(member_uris), "params": ensemble.count_params()}


def is_ensemble(model: keras.Model) -> bool:
    return any(layer.name == ENSEMBLE_LOGIT for layer in model.layers)


def ensemble_backbones(model: keras.Model) -> list[str]:
    """The members' backbones, in member order (empty for a single classifier)."""
    found = {}
    for layer in model.layers:
        if isinstance(layer, BackbonePreprocessing) and layer.name.endswith("_" + PREPROCESS_LAYER):
            found[int(layer.name[1 : layer.name.index("_")])] = layer.backbone
    return [found[index] for index in sorted(found)] if is_ensemble(model) else []


def gradcam_layer_names(model: keras.Model) -> list[str]:
    """The layers Grad-CAM takes maps from: the last conv layer, or each member's for an ensemble."""
    backbones = ensemble_backbones(model)
    if backbones:
        return [member_prefix(index) + LAST_CONV_LAYER[backbone] for index, backbone in enumerate(backbones)]
    return [last_conv_layer_name(model)]
