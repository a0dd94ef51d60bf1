"""Every run setting, declared once, and the named recipes (issue #21.4, #23.1).

The DAG's Params (:mod:`pipeline.dag_parts`), the run plan's defaults and ``train_config``
(:mod:`pipeline.airflow_ops`), :class:`training.config.TrainConfig`'s defaults, the training
CLI's choices and ``benchmarks/bench_quality.py``'s flags are all built from :data:`SETTINGS`,
so a default, a bound or a description cannot drift between them. The training DAG's own
Params (which manifest, the retraining policy) are declared the same way in :data:`TRAIN_SETTINGS`.

Pure Python on purpose: it is imported at DAG parse time and in the training runtime.

A *recipe* names a full set of training choices. The ``recipe`` Param picks one; the Params it
controls default to null in the trigger form and a null one takes the recipe's value
(:func:`apply_recipe`), so a Param set by hand still overrides the recipe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

#: The line the training CLI prints its result on; the Airflow tasks read it back.
RESULT_PREFIX = "RESULT "
#: How evaluate picks the decision threshold on the validation split.
THRESHOLD_STRATEGIES = ("youden", "sensitivity", "f1")
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50")
CLASS_WEIGHTS = ("balanced", "reference", "none")
#: When a new manifest is worth a retraining (pipeline.retrain applies it).
POLICIES = ("every", "min_new", "always")
SECTIONS = ("Data", "Model", "Training", "Evaluation", "Retraining")
# JSON Schema's bounds are comparisons, and every comparison with NaN is false, so NaN passes
# "minimum"/"maximum". "not exclusiveMaximum: -max" holds only where x >= -max is true: refuses
# NaN and -inf (the maximum every number Param has refuses +inf). The inner "type" lets null
# through (a recipe-controlled Param left empty): null is no number, so the inner schema fails.
FINITE = {"not": {"type": "number", "exclusiveMaximum": -sys.float_info.max}}


def _minutes_to_seconds(minutes: Any) -> float | None:
    return float(minutes) * 60 or None  # 0 minutes: no budget


def _zero_is_none(value: Any) -> int | None:
    return int(value) or None  # 0 images: no cap


def _none_if_empty(value: Any) -> Any:
    return value or None  # '' names no file: None (the Param's minLength keeps '' out of the form)


@dataclass(frozen=True)
class Setting:
    """One run setting: its Param (``schema``: JSON Schema keywords) and the TrainConfig field it feeds."""

    name: str
    default: Any
    title: str
    section: str
    description: str
    schema: dict
    #: TrainConfig field it maps to (None: not a training setting) and how the value converts.
    config_field: str | None = None
    to_config: Callable[[Any], Any] | None = None
    #: The recipe gives its value: the Param defaults to null and ``default`` is unused there.
    from_recipe: bool = False
    #: A DAG Param (False: a training setting only the CLI and the benchmark take).
    param: bool = True
    #: The deployment gives its value (Variable ``melanoma_<name>``, env ``MELANOMA_<NAME>``, else
    #: ``default``): the Param defaults to null, so asset-triggered runs, which carry no conf, follow it.
    from_deployment: bool = False

    def config_value(self, value: Any) -> Any:
        return self.to_config(value) if self.to_config else value

    @property
    def param_default(self) -> Any:
        """What its DAG Param defaults to: null where the recipe or the deployment decides."""
        return None if self.from_recipe or self.from_deployment else self.default


def _int(low: int, high: int | None = None) -> dict:
    return {"type": "integer", "minimum": low, **({} if high is None else {"maximum": high})}


def _number(*, above: float | None = None, low: float | None = None, high: float | None = None) -> dict:
    """A finite number (see FINITE) within the bounds given."""
    bounds = {"exclusiveMinimum": above, "minimum": low, "maximum": high}
    return {"type": "number", **FINITE, **{k: v for k, v in bounds.items() if v is not None}}


def _one_of(*choices) -> dict:
    return {"enum": list(choices)}


def _drop_ids(most: int) -> dict:
    # dag_parts puts the drop-id pattern into the items (it lives in melanoma.drops).
    return {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "maxItems": most}


def _s(name, default, title, section, schema, *, train=None, recipe=False, param=True, deployment=False):
    """One Setting. ``train``: how it feeds TrainConfig: True (the field of the same name, as is), a
    converter (same name), or ``(field, converter)``; None: not a training setting."""
    if train is None or train is True:
        field, convert = (name if train else None), None
    else:
        field, convert = train if isinstance(train, tuple) else (name, train)
    description = DESCRIPTIONS[name] + (" Empty: the recipe's." if recipe else "")
    if deployment:
        description += f" Empty: Variable melanoma_{name} / env MELANOMA_{name.upper()} (default {default})."
    return Setting(
        name, default, title, section, description, schema, field, convert, recipe, param, deployment
    )


#: What each setting means, shown under its Param in the trigger form.
DESCRIPTIONS = {
    "drops": "Drop ids to process (folder names under the raw root, e.g. ham-2026-03-01). Empty: the drops "
    "dated in the run's data interval (scheduled/backfill) or every drop not processed yet (manual).",
    "external_drops": "Drops under the raw root to report as external test sets.",
    "max_train_images": "Cap on training images, whole lesions (0 = all). For quick demo runs.",
    "recipe": "Named training recipe: best (the best single model measured: dx target, 11 fine-tuned "
    "blocks, 4 augmented variants, phase 2 at 3e-4 with decay, 75 min, scores over 8 views); "
    "reference (the reference report: "
    "ResNet50, binary, Adam 1e-4 then 1e-5, class weights 0.5/28.5); quick (head only, the demo's). Params "
    "left empty take the recipe's value; a Param set here overrides it.",
    "backbone": "ImageNet backbone under the reference report's head.",
    "weights": "'imagenet' or a weights file path/URI. Never silently random.",
    "target": "melanoma: binary training (the reference report's); dx: train on the 7 diagnoses, export "
    "the melanoma probability.",
    "ensemble_size": "Models trained with seeds seed..seed+n-1; the exported model averages their melanoma "
    "logits (Grad-CAM explains the average). n times the training time.",
    "ensemble_colour_mix": "With train_augment: each of the ensemble's n seeds is trained twice, without and "
    "with train_colour_jitter (2n members, 2n times the training time). Off by default: it trades HAM "
    "validation for other devices' images (README, Other clinics).",
    "epochs": "Phase 1 (frozen backbone) epoch budget; early stopping on val AUROC, patience 10.",
    "fine_tune_epochs": "Phase 2 epochs fine-tuning the last blocks at fine_tune_learning_rate (0 = skip).",
    "fine_tune_blocks": "How many backbone blocks (counted from the top) phase 2 unfreezes: ResNet50 and "
    "Lite0 have 16, Lite1 and Lite2 21; the best recipe uses 11 of Lite0's.",
    "class_weight": "balanced: from training labels; reference: the reference report's 0.5/28.5.",
    "train_flips": "Flip variants of each training image, one per epoch in turn (1: as stored; 2: + "
    "horizontal; 4: + vertical and both).",
    "train_augment": "With train_flips > 1: every variant but the first (as stored) is a random draw, per "
    "image, of the augment job's flips, rotation, zoom and brightness instead of a pure flip (every image's "
    "borders move, not only the melanoma copies').",
    "train_colour_jitter": "With train_augment: those draws also shift hue (+-8 degrees) and scale saturation "
    "(x0.75-1.25) and contrast (x0.8-1.25), to stand for other dermatoscopes.",
    "fine_tune_interpolation": "Weight a of the fine-tuned model in the exported one: (1 - a) x phase 1's "
    "weights + a x phase 2's (WiSE-FT, training/weight_interpolation.py); 1: the fine-tuned model as it is.",
    "train_random_crop": "With train_augment: those draws crop a random box (half to all of the image's "
    "area, width/height 3/4-4/3, anywhere) and stretch it to the image instead of zooming about the centre.",
    "learning_rate": "Phase 1 (head) Adam learning rate; the reference report's 1e-4.",
    "fine_tune_learning_rate": "Phase 2 Adam learning rate; the reference report's 1e-5, the best "
    "recipe's 3e-4 (on cached activations).",
    "lr_decay_patience": "Learning rate x0.3 after this many epochs without a better val AUROC (0 = "
    "constant, the reference report's).",
    "max_train_minutes": "Training time budget: no new epoch starts that would not fit (0 = none; the "
    "task's own timeout is 12 h).",
    "patience": "Epochs without a better val AUROC before a phase stops.",
    "label_smoothing": "Label smoothing of the loss's targets (0: none).",
    "threshold_strategy": "How evaluate picks the threshold on the validation split.",
    "target_sensitivity": "Used by the 'sensitivity' strategy.",
    "score_pooling": "lesion: the images of one lesion are scored together (mean logit) before the "
    "threshold; none: each image alone.",
    "test_time_augmentation": "Score each image as the mean logit of its 8 dihedral views (rotations by "
    "quarter turns, mirrored or not) rather than once; the threshold is chosen on such scores and the "
    "model's later scorers use them too. 8x the scoring time.",
    "n_boot": "Lesion bootstrap resamples for the 95% intervals.",
    "promote_min_val_auroc": "The floor: a model becomes champion only with at least this validation AUROC "
    "(and a passing lesion-focus check).",
    "promote_margin": "A challenger must reach the champion's validation AUROC plus this, the champion "
    "re-scored on the challenger's validation split (0: as good is enough; the newer model saw more data).",
    "manifest_version": "Train on exactly this manifest (processed/manifest-NNNNNN.json). 0: the one the "
    "triggering asset event names, else (a manual run) the newest as of the run's date.",
    "retrain_policy": "every: train on every manifest newer than the last model's; min_new: only once at "
    "least retrain_min_new_images new images or retrain_min_new_melanomas new melanomas have arrived since "
    "it; always: train regardless.",
    "retrain_min_new_images": "min_new: retrain once this many images arrived since the last model's "
    "manifest (0 = not this criterion).",
    "inbox_drops": "Folders under the inbox root to score (Variable melanoma_inbox_root / env MELANOMA_INBOX_ROOT). "
    "Empty: those the triggering asset events name, else every folder not scored yet.",
    "model": "champion (the registry's), models:/melanoma-classifier@<alias> or /<version>, or a run's "
    "model/model.keras; scored with that model's own validated threshold.",
    "retrain_min_new_melanomas": "min_new: retrain once this many melanoma images arrived since the last "
    "model's manifest (0 = not this criterion).",
}

DATA, MODEL, TRAINING, EVALUATION, RETRAINING = SECTIONS
# One row per setting, in the trigger form's order: name, default, title, section, schema, and how
# it reaches TrainConfig. ``recipe=True``: the recipe gives its value when the Param is left empty.
# fmt: off
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        _s("drops", [], "Drops", DATA, _drop_ids(1000)),
        _s("external_drops", [], "External test drops", DATA, _drop_ids(50)),
        _s("max_train_images", 0, "Training images (cap)", DATA, _int(0, 10_000_000),
           train=("limit_train", _zero_is_none)),
        _s("recipe", "best", "Recipe", MODEL, _one_of("best", "reference", "quick"), deployment=True),
        _s("backbone", "efficientnet_lite0", "Backbone", MODEL, _one_of(*BACKBONES), train=True, recipe=True),
        _s("weights", "imagenet", "Weights", MODEL, {"type": "string", "minLength": 1, "maxLength": 1000},
           train=_none_if_empty),
        _s("target", "melanoma", "Training target", MODEL, _one_of("melanoma", "dx"), train=True, recipe=True),
        _s("ensemble_size", 1, "Ensemble size", MODEL, _int(1, 10), train=int),
        _s("ensemble_colour_mix", False, "Colour-mixed ensemble", MODEL, {"type": "boolean"}, train=bool),
        _s("epochs", 30, "Epochs (phase 1)", TRAINING, _int(1, 500), train=int, recipe=True),
        _s("fine_tune_epochs", 0, "Fine-tuning epochs (phase 2)", TRAINING, _int(0, 200), train=int,
           recipe=True),
        _s("fine_tune_blocks", 2, "Fine-tuned blocks", TRAINING, _int(1, 21), train=int, recipe=True),
        _s("class_weight", "balanced", "Class weights", TRAINING, _one_of(*CLASS_WEIGHTS), train=True,
           recipe=True),
        _s("train_flips", 1, "Flip variants", TRAINING, _one_of(1, 2, 4), train=int, recipe=True),
        _s("train_augment", False, "Random augmentation", TRAINING, {"type": "boolean"}, train=bool,
           recipe=True),
        _s("train_colour_jitter", False, "Colour jitter", TRAINING, {"type": "boolean"}, train=bool),
        _s("train_random_crop", False, "Random resized crops", TRAINING, {"type": "boolean"}, train=bool,
           param=False),
        _s("fine_tune_interpolation", 1.0, "Fine-tuned weight share", TRAINING, _number(low=0, high=1),
           train=float, param=False),
        _s("learning_rate", 1e-4, "Learning rate (phase 1)", TRAINING, _number(above=0, high=0.1),
           train=float, recipe=True),
        _s("fine_tune_learning_rate", 1e-5, "Learning rate (phase 2)", TRAINING, _number(above=0, high=0.1),
           train=float, recipe=True),
        _s("lr_decay_patience", 0, "Learning-rate decay patience", TRAINING, _int(0, 50), train=int,
           recipe=True),
        _s("max_train_minutes", 0, "Time budget (minutes)", TRAINING, _number(low=0, high=720),
           train=("max_train_seconds", _minutes_to_seconds), recipe=True),
        _s("patience", 10, "Early-stopping patience", TRAINING, _int(1), train=int, param=False),
        _s("label_smoothing", 0.0, "Label smoothing", TRAINING, {"type": "number", "minimum": 0},
           train=float, param=False),
        _s("threshold_strategy", "youden", "Threshold strategy", EVALUATION, _one_of(*THRESHOLD_STRATEGIES)),
        _s("target_sensitivity", 0.95, "Target sensitivity", EVALUATION, _number(above=0, high=1)),
        _s("score_pooling", "lesion", "Score pooling", EVALUATION, _one_of("lesion", "none")),
        _s("test_time_augmentation", False, "Test-time augmentation", EVALUATION, {"type": "boolean"},
           recipe=True),
        _s("n_boot", 1000, "Bootstrap resamples", EVALUATION, _int(100, 20000)),
        _s("promote_min_val_auroc", 0.85, "Champion floor (val AUROC)", EVALUATION, _number(low=0, high=1)),
        _s("promote_margin", 0.0, "Champion margin (val AUROC)", EVALUATION, _number(low=0, high=0.5)),
    )
}
#: The training DAG's own Params (``melanoma_train`` only): which manifest, and when a new one is
#: worth a retraining. The policy's defaults are the deployment's (pipeline.retrain.resolve_policy).
TRAIN_SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        _s("manifest_version", 0, "Manifest version", DATA, _int(0, 999_999)),
        _s("retrain_policy", "every", "Retraining policy", RETRAINING, {"type": "string", **_one_of(*POLICIES)},
           deployment=True),
        _s("retrain_min_new_images", 0, "New images needed (min_new)", RETRAINING, _int(0, 100_000_000),
           deployment=True),
        _s("retrain_min_new_melanomas", 0, "New melanomas needed (min_new)", RETRAINING, _int(0, 100_000_000),
           deployment=True),
    )
}
#: The scoring DAG's own Params (melanoma_score): which inbox folders, which model.
SCORE_SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        _s("inbox_drops", [], "Inbox folders", DATA, _drop_ids(1000)),
        _s("model", "champion", "Model", MODEL, {"type": "string", "minLength": 1, "maxLength": 1000}),
    )
}
# fmt: on

#: ``quick``: head only on Lite0 (what ``make demo`` runs, and TrainConfig's own defaults).
QUICK = {name: s.default for name, s in SETTINGS.items() if s.from_recipe}
RECIPES: dict[str, dict[str, Any]] = {
    # The best single model measured (research/2026-11-model-selection; bench_quality's defaults).
    "best": {
        **QUICK,
        "target": "dx",
        "epochs": 30,
        "fine_tune_epochs": 40,
        "fine_tune_blocks": 11,
        "train_flips": 4,
        "train_augment": True,
        "learning_rate": 1e-4,
        "fine_tune_learning_rate": 3e-4,
        "lr_decay_patience": 2,
        "class_weight": "balanced",
        "max_train_minutes": 75,
        # Kept 2026-12-03 (run `tta`): HAM val AUROC 0.896 -> 0.899 on the same model.
        "test_time_augmentation": True,
    },
    # The reference report: ResNet50, binary target, Adam 1e-4 (head) then 1e-5 (fine-tuning),
    # class weights 0.5/28.5. The repository does not record its epoch counts; these are ours.
    "reference": {
        **QUICK,
        "backbone": "resnet50",
        "class_weight": "reference",
        "fine_tune_epochs": 10,
    },
    "quick": QUICK,
}
DEFAULT_RECIPE = SETTINGS["recipe"].default

#: What a DAG Param defaults to: null where the recipe or the deployment decides.
PARAM_DEFAULTS: dict[str, Any] = {name: s.param_default for name, s in SETTINGS.items() if s.param}


def apply_recipe(values: dict) -> dict:
    """``values`` (Params) with every null recipe-controlled one filled from the chosen recipe."""
    recipe_name = values.get("recipe") or DEFAULT_RECIPE
    if recipe_name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe_name!r}")
    recipe = RECIPES[recipe_name]
    return {
        **values,
        **{k: recipe[k] for k, s in SETTINGS.items() if s.from_recipe and values.get(k) is None},
    }


def config_fields(values: dict) -> dict:
    """The TrainConfig fields the given settings map to (settings absent from ``values`` are left out)."""
    return {
        s.config_field: s.config_value(values[name])
        for name, s in SETTINGS.items()
        if s.config_field and name in values
    }


def recipe_config(name: str = DEFAULT_RECIPE) -> dict:
    """A recipe's TrainConfig fields: every training setting at its default, the recipe's on top."""
    return config_fields({**{n: s.default for n, s in SETTINGS.items()}, **RECIPES[name]})


#: TrainConfig's own defaults: the quick recipe (a bare TrainConfig trains the head only).
CONFIG_DEFAULTS = recipe_config("quick")
