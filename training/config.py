"""The training settings of one run (:class:`TrainConfig`), checked when made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from melanoma.settings import CONFIG_DEFAULTS as D
from training.data import TARGETS

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    # Defaults of run settings come from melanoma.settings (declared once there): the quick
    # recipe, so a bare TrainConfig trains the head only; the DAG and bench-quality pass a recipe.
    processed_root: str
    run_root: str
    backbone: str = D["backbone"]
    weights: str | None = D["weights"]
    epochs: int = D["epochs"]
    fine_tune_epochs: int = D["fine_tune_epochs"]
    fine_tune_blocks: int = D["fine_tune_blocks"]
    batch_size: int = 32
    learning_rate: float = D["learning_rate"]
    fine_tune_learning_rate: float = D["fine_tune_learning_rate"]
    patience: int = D["patience"]
    # Multiply the learning rate by lr_decay_factor after every lr_decay_patience epochs
    # without a better val AUROC (0: constant learning rate, the seed's).
    lr_decay_patience: int = D["lr_decay_patience"]
    lr_decay_factor: float = 0.3
    class_weight: str | dict = D["class_weight"]
    # Label smoothing of the loss's targets (0: none, the seed's): epsilon moves each one-hot
    # target towards the uniform distribution over the classes (2 for melanoma, 7 for dx).
    label_smoothing: float = D["label_smoothing"]
    feature_cache: bool = True
    # Phase 2 on cached activations at the input of the unfrozen blocks (same math, far cheaper).
    fine_tune_cache: bool = True
    # Storage type of those cached activations ("float16" halves their memory; "float32" exact).
    cache_dtype: str = "float16"
    # "melanoma" (binary, the seed's) or "dx" (seven diagnoses, melanoma probability out).
    target: str = D["target"]
    # Flipped copies of the training images (1: as stored; 2: + horizontal flip; 4: + vertical
    # and both). Epoch e trains on variant e mod train_flips; cached runs cache every variant.
    # With train_augment, the number of training variants (see below).
    train_flips: int = D["train_flips"]
    # Variants 1.. as random draws of the augment job's transform (melanoma.augment: flips,
    # rotation with reflected borders, zoom, brightness), one per image, variant and seed, in
    # place of pure flips; variant 0 stays as stored. Every training image then shows moved and
    # changed borders, not only the augmented melanoma copies (a shortcut otherwise open to the
    # model: reflected borders mean melanoma). Drawn once into the activation caches.
    train_augment: bool = D["train_augment"]
    # With train_augment: those draws also jitter hue, saturation and contrast
    # (melanoma.augment.COLOUR_JITTER, augment version 2's ranges) to stand for other devices.
    train_colour_jitter: bool = D["train_colour_jitter"]
    # With train_augment: those draws crop a random box (melanoma.augment.RANDOM_CROP) instead of
    # zooming about the centre, so lesions appear at other scales, places and aspect ratios.
    train_random_crop: bool = D["train_random_crop"]
    # The exported weights: (1 - a) * phase 1's + a * phase 2's (training.weight_interpolation);
    # 1 exports the fine-tuned model as it is. Applied at export, so a finished run can change it.
    fine_tune_interpolation: float = D["fine_tune_interpolation"]
    seed: int = 0
    # Members of an ensemble (1: one model). Member k is a full run with seed + k under
    # <run_root>/members/seed-<seed + k>/; model/model.keras averages their logits.
    ensemble_size: int = D["ensemble_size"]
    # Each of those seeds also trained with train_colour_jitter on, under seed-<s>-jitter/: 2n
    # members. The jitter buys other devices' images with HAM's own (issue #24); a mix holds both.
    ensemble_colour_mix: bool = D["ensemble_colour_mix"]
    # Wall-clock budget of the whole run_training call: no new epoch starts when the mean epoch
    # so far would not fit in what is left (None: no limit). The state records the stop.
    max_train_seconds: float | None = D["max_train_seconds"]
    # Resume a run whose last phase stopped on its time budget (done, yet not converged):
    # it goes on from that phase's last epoch, with its optimizer state and early-stopping
    # counters, under this call's budget. Without it a finished run is left as it is.
    continue_after_budget: bool = False
    limit_train: int | None = D["limit_train"]
    limit_val: int | None = None
    as_of: str | None = None
    # Exactly this manifest (the version an asset-triggered run was triggered with), not "as of".
    manifest_version: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.train_flips not in (1, 2, 4):
            raise ValueError(f"train_flips must be 1, 2 or 4, got {self.train_flips}")
        if self.train_augment and not (self.feature_cache and self.fine_tune_cache):
            raise ValueError(
                "train_augment draws each training variant once, into the activation caches: "
                "it needs feature_cache and fine_tune_cache on"
            )
        if self.train_colour_jitter and not self.train_augment:
            raise ValueError("train_colour_jitter jitters the train_augment draws: it needs train_augment on")
        if self.train_random_crop and not self.train_augment:
            raise ValueError("train_random_crop crops the train_augment draws: it needs train_augment on")
        if self.cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}")
        if self.ensemble_colour_mix and (self.train_colour_jitter or not self.train_augment):
            raise ValueError(
                "ensemble_colour_mix trains each seed with and without colour jitter: it needs "
                "train_augment on and train_colour_jitter off"
            )
        if not 1 <= self.ensemble_size <= 10:
            raise ValueError(f"ensemble_size must be in [1, 10], got {self.ensemble_size}")
        if not 0.0 <= self.fine_tune_interpolation <= 1.0:
            raise ValueError(f"fine_tune_interpolation must be in [0, 1], got {self.fine_tune_interpolation}")
        if self.fine_tune_interpolation < 1.0 and self.fine_tune_epochs == 0:
            raise ValueError(
                "fine_tune_interpolation mixes phase 1's and phase 2's weights: it needs fine_tune_epochs"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.batch_size < 1 or self.epochs < 0 or self.fine_tune_epochs < 0 or self.patience < 1:
            raise ValueError("batch_size and patience must be >= 1, epochs and fine_tune_epochs >= 0")
