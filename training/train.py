"""Two-phase training of the melanoma classifier, resumable from object storage.

Phase 1 trains the head with the backbone frozen. Because a frozen backbone maps each image
to the same pooled features every epoch, the features are computed once (augmented copies
included) and the head trains on them: the same model, at a fraction of the cost
(``feature_cache=False`` runs the frozen backbone every epoch instead, for comparison).
Phase 2 unfreezes the last backbone blocks (BatchNorm stays in inference mode) and
fine-tunes end to end at a lower learning rate.

Both phases stop early on validation AUROC (patience 10 by default) and restore the best
weights. After every epoch the weights and the early-stopping state go to
``<run_root>/model/checkpoints/``; a rerun of the same run continues from there.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from melanoma.manifest import require_manifest
from melanoma.storage import Storage, open_storage
from training.data import SplitArrays, class_weights, load_arrays, shard_dataset

CHECKPOINTS = "model/checkpoints"


@dataclass
class TrainConfig:
    processed_root: str
    run_root: str
    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    epochs: int = 30
    fine_tune_epochs: int = 0
    fine_tune_blocks: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-4
    fine_tune_learning_rate: float = 1e-5
    patience: int = 10
    class_weight: str | dict = "balanced"
    feature_cache: bool = True
    seed: int = 0
    limit_train: int | None = None
    limit_val: int | None = None
    as_of: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)


# --- checkpoint state on object storage -----------------------------------------------------


def _weights_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.weights.h5")
        model.save_weights(path)
        with open(path, "rb") as handle:
            return handle.read()


def _load_weights_bytes(model, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.weights.h5")
        with open(path, "wb") as handle:
            handle.write(data)
        model.load_weights(path)


def read_state(run: Storage) -> dict | None:
    key = f"{CHECKPOINTS}/state.json"
    return json.loads(run.read_bytes(key)) if run.exists(key) else None


def _make_callbacks(run: Storage, phase: int, patience: int, resume: dict | None):
    """Early stopping on val AUROC whose state (best, wait, best weights) survives a restart."""
    import keras

    class ResumableAurocEarlyStopping(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = resume["best"] if resume else -np.inf
            self.wait = resume["wait"] if resume else 0
            self.best_epoch = resume.get("best_epoch", -1) if resume else -1
            self.history: dict[str, list[float]] = dict(resume["history"]) if resume else {}
            self.best_weights: bytes | None = run.read_bytes(f"{CHECKPOINTS}/phase{phase}-best.weights.h5") if resume and resume["best_epoch"] >= 0 else None

        def on_epoch_end(self, epoch, logs=None):
            score = float((logs or {})["val_auroc"])
            if score > self.best:
                self.best, self.wait, self.best_epoch = score, 0, epoch
                self.best_weights = _weights_bytes(self.model)
                run.write_bytes(f"{CHECKPOINTS}/phase{phase}-best.weights.h5", self.best_weights)
            else:
                self.wait += 1
            run.write_bytes(f"{CHECKPOINTS}/phase{phase}-last.weights.h5", _weights_bytes(self.model))
            for name, value in (logs or {}).items():
                self.history.setdefault(name, []).append(float(value))
            # The state is written after the weights, so it never points at weights that don't exist.
            state = {"phase": phase, "epoch": epoch, "best": self.best, "wait": self.wait, "best_epoch": self.best_epoch, "done": False, "history": self.history}
            run.write_bytes(f"{CHECKPOINTS}/state.json", json.dumps(state).encode())
            if self.wait >= patience:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                _load_weights_bytes(self.model, self.best_weights)

    return ResumableAurocEarlyStopping()


def _finish_phase(run: Storage, phase: int, stopper) -> dict:
    state = read_state(run) or {"history": {}}
    state.update(phase=phase, done=True, best=stopper.best, best_epoch=stopper.best_epoch)
    run.write_bytes(f"{CHECKPOINTS}/state.json", json.dumps(state).encode())
    run.write_bytes(f"{CHECKPOINTS}/phase{phase}-final.weights.h5", _weights_bytes(stopper.model))
    run.write_bytes(f"{CHECKPOINTS}/phase{phase}-history.json", json.dumps(state["history"]).encode())
    return state


# --- phases -----------------------------------------------------------------------------------


def cached_features(run: Storage, name: str, extractor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Pooled backbone features (N, C) float32, computed once per run and kept with its checkpoints."""
    key = f"{CHECKPOINTS}/features-{name}.npy"
    if run.exists(key):
        cached = np.load(io.BytesIO(run.read_bytes(key)), allow_pickle=False)
        if len(cached) == len(images):
            return cached
    features = extractor.predict(images, batch_size=batch_size, verbose=0).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    run.write_bytes(key, buffer.getvalue())
    return features


def _auroc_metric():
    import keras

    return keras.metrics.AUC(num_thresholds=1000, name="auroc")


def train_phase1(model, cfg: TrainConfig, run: Storage, train: SplitArrays, val: SplitArrays, weights: dict, resume: dict | None) -> dict:
    import keras

    from training.model import feature_extractor, freeze_backbone, head_model

    freeze_backbone(model)
    stopper = _make_callbacks(run, 1, cfg.patience, resume)
    initial_epoch = resume["epoch"] + 1 if resume else 0
    if cfg.feature_cache:
        extractor = feature_extractor(model)
        train_x = cached_features(run, "train", extractor, train.images, 64)
        val_x = cached_features(run, "val", extractor, val.images, 64)
        trainee = head_model(model)
    else:
        train_x, val_x, trainee = train.images, val.images, model
    if resume and run.exists(f"{CHECKPOINTS}/phase1-last.weights.h5"):
        _load_weights_bytes(trainee, run.read_bytes(f"{CHECKPOINTS}/phase1-last.weights.h5"))
    trainee.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate, beta_1=0.9, beta_2=0.999),
        loss="binary_crossentropy",
        metrics=[_auroc_metric()],
    )
    trainee.fit(
        train_x,
        train.labels.astype(np.float32),
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        initial_epoch=initial_epoch,
        validation_data=(val_x, val.labels.astype(np.float32)),
        class_weight=weights,
        callbacks=[stopper],
        shuffle=True,
        verbose=2,
    )
    return _finish_phase(run, 1, stopper)


def train_phase2(model, cfg: TrainConfig, run: Storage, storage: Storage, manifest: dict, val: SplitArrays, weights: dict, resume: dict | None) -> dict:
    import keras

    from training.model import unfreeze_last_blocks

    unfreeze_last_blocks(model, cfg.fine_tune_blocks)
    stopper = _make_callbacks(run, 2, cfg.patience, resume)
    if resume and run.exists(f"{CHECKPOINTS}/phase2-last.weights.h5"):
        _load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase2-last.weights.h5"))
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.fine_tune_learning_rate, beta_1=0.9, beta_2=0.999),
        loss="binary_crossentropy",
        metrics=[_auroc_metric()],
    )
    if cfg.limit_train is None:
        train_data = shard_dataset(storage, manifest, ["train"], augmented=True, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
    else:
        import tensorflow as tf

        subset = load_arrays(storage, manifest, "train", augmented=True, limit=cfg.limit_train)
        train_data = (
            tf.data.Dataset.from_tensor_slices((subset.images, subset.labels.astype(np.float32)))
            .shuffle(len(subset), seed=cfg.seed)
            .batch(cfg.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    model.fit(
        train_data,
        epochs=cfg.fine_tune_epochs,
        initial_epoch=resume["epoch"] + 1 if resume else 0,
        validation_data=(val.images, val.labels.astype(np.float32)),
        validation_batch_size=64,
        class_weight=weights,
        callbacks=[stopper],
        verbose=2,
    )
    return _finish_phase(run, 2, stopper)


# --- the whole run ----------------------------------------------------------------------------


def run_training(cfg: TrainConfig) -> dict:
    """Train (or resume) one run; writes model.keras, history.json, config.json, provenance.json."""
    import keras

    from training.model import build_classifier, weights_provenance

    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    storage = open_storage(cfg.processed_root)
    run = open_storage(cfg.run_root)
    manifest = require_manifest(storage, as_of=cfg.as_of)
    train = load_arrays(storage, manifest, "train", augmented=True, limit=cfg.limit_train)
    val = load_arrays(storage, manifest, "val", limit=cfg.limit_val)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"manifest v{manifest['version']} has {len(train)} training and {len(val)} validation images: need both")
    if val.labels.min() == val.labels.max():
        raise ValueError("the validation split holds one class only: AUROC (the early-stopping signal) is undefined")
    weights = class_weights(train.labels, cfg.class_weight)
    model = build_classifier(cfg.backbone, cfg.weights)
    print(f"train: manifest v{manifest['version']}, {len(train)} train ({int(train.labels.sum())} melanoma incl. augmented), "
          f"{len(val)} val; class weights {weights}; backbone {cfg.backbone} weights {cfg.weights}")

    state = read_state(run)
    history: dict[str, dict] = {}
    if state and state["phase"] == 1 and state["done"]:
        _load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase1-final.weights.h5"))
        history["phase1"] = state["history"]
        print("train: phase 1 already finished in a previous attempt; reusing its weights")
        if cfg.fine_tune_epochs > 0:
            history["phase2"] = train_phase2(model, cfg, run, storage, manifest, val, weights, None)["history"]
    elif state and state["phase"] == 2:
        history["phase1"] = json.loads(run.read_bytes(f"{CHECKPOINTS}/phase1-history.json"))
        if state["done"]:
            _load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase2-final.weights.h5"))
            history["phase2"] = state["history"]
        else:
            print(f"train: resuming phase 2 after epoch {state['epoch'] + 1}")
            history["phase2"] = train_phase2(model, cfg, run, storage, manifest, val, weights, state)["history"]
    else:
        resume = state if state and state["phase"] == 1 else None
        if resume:
            print(f"train: resuming phase 1 after epoch {resume['epoch'] + 1}")
        history["phase1"] = train_phase1(model, cfg, run, train, val, weights, resume)["history"]
        if cfg.fine_tune_epochs > 0:
            history["phase2"] = train_phase2(model, cfg, run, storage, manifest, val, weights, None)["history"]

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as handle:
            run.write_bytes("model/model.keras", handle.read())
    provenance = weights_provenance(model)
    seconds = time.perf_counter() - started
    best = {phase: max(h.get("val_auroc", [float("nan")])) for phase, h in history.items()}
    run.write_bytes("model/history.json", json.dumps(history, indent=2).encode())
    run.write_bytes("model/config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str).encode())
    run.write_bytes(
        "model/provenance.json",
        json.dumps({**provenance, "manifest_version": manifest["version"], "train_images": len(train), "val_images": len(val)}, indent=2).encode(),
    )
    return {
        "model_uri": run.uri("model/model.keras"),
        "manifest_version": manifest["version"],
        "backbone": cfg.backbone,
        "weights": provenance,
        "best_val_auroc": best,
        "epochs_run": {phase: len(h.get("loss", [])) for phase, h in history.items()},
        "train_seconds": round(seconds, 1),
    }
