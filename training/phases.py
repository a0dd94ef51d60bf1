"""The two training phases of the classifier, each resumable epoch by epoch.

Phase 1 trains the head with the backbone frozen: on cached pooled features (default) or on
images every epoch (``feature_cache=False``, for comparison). Phase 2 unfreezes the last
``fine_tune_blocks`` backbone blocks (BatchNorm stays frozen, which in Keras 3 also keeps it
in inference mode) and fine-tunes them with the head at a lower learning rate, on cached
activations at their cut (default) or end to end. Both measure validation AUROC after every
epoch, stop early on it and restore the best weights (:class:`training.checkpoints.PhaseTracker`).
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np

from melanoma.progress import Progress
from melanoma.storage import Storage
from training.checkpoints import CHECKPOINTS, PhaseTracker, finish_phase, load_optimizer_bytes
from training.config import TrainConfig
from training.cpu_turns import CpuTurns
from training.data import DX_CLASSES, SplitArrays, shard_dataset
from training.model import fine_tune_cut, freeze_backbone, unfreeze_last_blocks
from training.model_io import load_weights_bytes
from training.variants import epoch_order, flip_variant

__all__ = ["run_phase", "smoothed_sparse_crossentropy", "train_phase1", "train_phase2", "training_output"]

log = logging.getLogger(__name__)


def training_output(model, target: str):
    """What the loss sees: the probability (binary) or the diagnosis logits (dx)."""
    return model.output if target == "melanoma" else model.get_layer("dx_logits").output


def smoothed_sparse_crossentropy(smoothing: float, classes: int):
    """Loss (labels (N,) or (N,1) int, logits (N,K)) -> (N,): cross-entropy against smoothed one-hot targets.

    Keras' sparse cross-entropy has no label smoothing, so the labels are one-hot encoded and
    the categorical loss (target (1 - smoothing) * one_hot + smoothing / K) is used.
    """

    def loss(labels, logits):
        one_hot = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(labels, "int32"), (-1,)), classes)
        return keras.losses.categorical_crossentropy(
            one_hot, logits, from_logits=True, label_smoothing=smoothing
        )

    return loss


def _compile(trainee, cfg: TrainConfig, learning_rate: float) -> None:
    if cfg.target == "melanoma":
        loss = keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing)
        metrics = [keras.metrics.AUC(num_thresholds=1000, name="auroc")]
    elif cfg.label_smoothing:
        loss, metrics = smoothed_sparse_crossentropy(cfg.label_smoothing, len(DX_CLASSES)), []
    else:
        loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), []
    trainee.compile(
        optimizer=keras.optimizers.Adam(learning_rate, beta_1=0.9, beta_2=0.999), loss=loss, metrics=metrics
    )


def _resume(
    run: Storage, phase: int, trainee, tracker: PhaseTracker, resume: dict | None, baseline: bool
) -> int:
    """Load the last epoch's weights and optimizer state (or set phase 2's baseline); returns the first epoch to run."""
    if resume:
        initial_epoch = resume["epoch"] + 1
        load_weights_bytes(trainee, run.read_bytes(f"{CHECKPOINTS}/phase{phase}-last.weights.h5"))
        if run.exists(f"{CHECKPOINTS}/phase{phase}-optimizer.npz"):
            load_optimizer_bytes(trainee, run.read_bytes(f"{CHECKPOINTS}/phase{phase}-optimizer.npz"))
        log.info(
            "resuming phase %d at epoch %d (epochs 1-%d done, best val AUROC %.4f)",
            phase,
            initial_epoch + 1,
            initial_epoch,
            tracker.best,
        )
        return initial_epoch
    if baseline:
        tracker.set_baseline()
    return 0


def _stop_reason(tracker: PhaseTracker, cfg: TrainConfig, deadline: float | None) -> str | None:
    """Why no further epoch starts (patience used up, or the time budget), or None."""
    if tracker.wait >= cfg.patience:
        return f"early stopping: no better val AUROC in {tracker.wait} epochs"
    spent = tracker.history.get("epoch_seconds", [])
    if (
        deadline is not None
        and spent
        and time.perf_counter() - CpuTurns.waited + sum(spent) / len(spent) > deadline
    ):
        return f"time budget: another epoch (~{sum(spent) / len(spent):.0f}s) would not fit"
    return None


def _fit_epoch(
    trainee,
    cfg: TrainConfig,
    phase: int,
    epoch: int,
    train_x,
    train_y,
    class_weight: dict,
    sample_weight: np.ndarray | None,
) -> dict:
    """One epoch of ``trainee.fit``; returns its logs (loss, metrics, learning rate)."""
    if isinstance(train_x, (list, np.ndarray)):
        variant = epoch % cfg.train_flips
        order = epoch_order(len(train_y), cfg.seed, phase, epoch)
        if isinstance(train_x, list):  # cached outputs, one array per training variant
            epoch_x = train_x[variant][order]
        else:  # images: flipped here, exactly as the cached variants were
            epoch_x = flip_variant(train_x[order], variant)
        if epoch_x.dtype == np.float16:
            epoch_x = epoch_x.astype(np.float32)
        result = trainee.fit(
            epoch_x,
            train_y[order],
            sample_weight=sample_weight[order],
            batch_size=cfg.batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
    else:  # a function epoch -> tf.data pipeline of that epoch's batches
        result = trainee.fit(train_x(epoch), epochs=1, class_weight=class_weight, verbose=0)
    logs = {name: values[-1] for name, values in result.history.items()}
    logs["learning_rate"] = float(np.asarray(trainee.optimizer.learning_rate))
    return logs


def run_phase(
    phase: int,
    model,
    cfg: TrainConfig,
    run: Storage,
    start,
    train_x,
    train_y,
    val_x,
    val_y: np.ndarray,
    class_weight: dict,
    resume: dict | None,
    *,
    learning_rate: float,
    epochs: int,
    baseline: bool,
    deadline: float | None = None,
) -> dict:
    """Train ``start -> output`` (layers shared with ``model``) for one phase; returns its final state.

    ``train_x``: images (flipped per epoch by :func:`training.variants.flip_variant`), a list of
    cached arrays, one per flip variant (shuffled here, per epoch, by :func:`training.variants.epoch_order`),
    or a function epoch -> tf.data dataset of (x, y) batches (shuffled by itself); ``train_y`` goes with arrays.
    """
    trainee = keras.Model(start, training_output(model, cfg.target), name=f"phase{phase}_trainee")
    scorer = (
        trainee if cfg.target == "melanoma" else keras.Model(start, model.output, name=f"phase{phase}_scorer")
    )
    _compile(trainee, cfg, learning_rate)
    if isinstance(val_x, np.ndarray) and val_x.dtype == np.float16:
        val_x = val_x.astype(np.float32)
    tracker = PhaseTracker(run, phase, trainee, scorer, val_x, val_y, resume)
    initial_epoch = _resume(run, phase, trainee, tracker, resume, baseline)
    # Every epoch gets a line: its metrics, and the phase's ETA if no early stop comes first.
    tracker.progress = Progress(
        max(epochs - initial_epoch, 0), f"phase {phase} epochs", log.info, every_seconds=0
    )
    sample_weight = None
    if isinstance(train_x, (list, np.ndarray)):
        sample_weight = np.array([class_weight[int(label)] for label in train_y], np.float32)
    for epoch in range(initial_epoch, epochs):
        tracker.stop_reason = _stop_reason(tracker, cfg, deadline)
        if tracker.stop_reason:
            log.info("phase %d stops after epoch %d: %s", phase, epoch, tracker.stop_reason)
            break
        with CpuTurns.turn():
            started = time.perf_counter()
            logs = _fit_epoch(trainee, cfg, phase, epoch, train_x, train_y, class_weight, sample_weight)
            tracker.end_epoch(
                epoch,
                epochs,
                logs,
                time.perf_counter() - started,
                started,
                cfg.lr_decay_patience,
                cfg.lr_decay_factor,
            )
    tracker.restore_best()
    return finish_phase(run, phase, tracker, model)


def train_phase1(
    model,
    cfg: TrainConfig,
    run: Storage,
    train: SplitArrays,
    val: SplitArrays,
    weights: dict,
    resume: dict | None,
    cache: dict | None = None,
    deadline: float | None = None,
) -> dict:
    """Head only, backbone frozen: on cached pooled features (default) or on images every epoch."""
    freeze_backbone(model)
    if cfg.feature_cache:
        start = model.get_layer("head_pool").output
        train_x, val_x = (
            cache["train"]["pooled"],
            cache["val"]["pooled"],
        )  # train: one array per training variant
    else:
        start, train_x, val_x = model.input, train.images, val.images
    return run_phase(
        1,
        model,
        cfg,
        run,
        start,
        train_x,
        train.targets(cfg.target),
        val_x,
        val.labels.astype(np.float64),
        weights,
        resume,
        learning_rate=cfg.learning_rate,
        epochs=cfg.epochs,
        baseline=False,
        deadline=deadline,
    )


def train_phase2(
    model,
    cfg: TrainConfig,
    run: Storage,
    storage: Storage,
    manifest: dict,
    train: SplitArrays,
    val: SplitArrays,
    weights: dict,
    resume: dict | None,
    cache: dict | None = None,
    deadline: float | None = None,
) -> dict:
    """The last ``fine_tune_blocks`` blocks and the head: on cached activations (default) or end to end."""
    unfreeze_last_blocks(model, cfg.fine_tune_blocks)
    val_y = val.labels.astype(np.float64)
    if cfg.fine_tune_cache:
        start = fine_tune_cut(model, cfg.fine_tune_blocks)
        train_x, train_y, val_x = cache["train"]["cut"], train.targets(cfg.target), cache["val"]["cut"]
    else:
        start, val_x = model.input, val.images
        if cfg.limit_train is None:
            # Streams the shards (parallel reads, shuffle, prefetch) instead of holding them in memory.
            def train_x(epoch: int):
                return shard_dataset(
                    storage,
                    manifest,
                    ["train"],
                    augmented=True,
                    batch_size=cfg.batch_size,
                    shuffle=True,
                    seed=cfg.seed * 100_003 + epoch,
                    target=cfg.target,
                    flip=epoch % cfg.train_flips,
                )

            train_y = None
        else:
            train_x, train_y = train.images, train.targets(cfg.target)
    return run_phase(
        2,
        model,
        cfg,
        run,
        start,
        train_x,
        train_y,
        val_x,
        val_y,
        weights,
        resume,
        learning_rate=cfg.fine_tune_learning_rate,
        epochs=cfg.fine_tune_epochs,
        baseline=True,
        deadline=deadline,
    )
