"""Two-phase training of the melanoma classifier, resumable from object storage.

Phase 1 trains the head with the backbone frozen. Because a frozen backbone maps each image
to the same pooled features every epoch, the features are computed once (augmented copies
included: augmentation is offline, the copies are stored images) and the head trains on
them: the same model, at a fraction of the cost (``feature_cache=False`` runs the frozen
backbone every epoch instead, for comparison).

Phase 2 unfreezes the last ``fine_tune_blocks`` backbone blocks (BatchNorm stays frozen, which
in Keras 3 also keeps it in inference mode) and fine-tunes them with the head at a lower
learning rate. Everything before those blocks is frozen and deterministic, so its output for a
stored image never changes: with ``fine_tune_cache=True`` (default) that activation (the
single tensor feeding the first unfrozen block) is computed once per image and phase 2
trains the tail ``cut -> probability`` on it. That is the same computation as running the
whole network with those blocks unfrozen, at the cost of the tail only. The exported
``model.keras`` is always the full image -> probability network (the tail shares its layers).

Targets: ``target="melanoma"`` (default, the seed's) trains a binary sigmoid head with
class-weighted binary cross-entropy; ``target="dx"`` trains on the seven diagnoses (softmax
cross-entropy, melanoma and non-melanoma classes weighted like the binary loss) and the model
still outputs the melanoma probability (N, 1) through ``melanoma_logit`` + sigmoid.

Both phases measure validation AUROC on the melanoma probability after every epoch (exact,
scikit-learn), stop early on it (patience 10 by default) and restore the best weights; phase 2
starts from phase 1's weights and keeps them if no fine-tuning epoch beats them. After every
epoch the trained weights, the optimizer state and the early-stopping state go to
``<run_root>/model/checkpoints/``; a rerun of the same run continues from the next epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from melanoma.manifest import require_manifest
from melanoma.storage import Storage, open_storage
from training.data import DX_CLASSES, TARGETS, SplitArrays, class_weights, load_arrays, shard_dataset, target_class_weights

CHECKPOINTS = "model/checkpoints"
# Settings a resumed run must share with the attempt that wrote the checkpoints.
_STRUCTURAL = ("backbone", "weights", "target", "train_flips", "train_augment", "fine_tune_blocks", "feature_cache", "fine_tune_cache", "cache_dtype",
               "limit_train", "limit_val", "as_of", "manifest_version", "seed")


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
    # Multiply the learning rate by lr_decay_factor after every lr_decay_patience epochs
    # without a better val AUROC (0: constant learning rate, the seed's).
    lr_decay_patience: int = 0
    lr_decay_factor: float = 0.3
    class_weight: str | dict = "balanced"
    # Label smoothing of the loss's targets (0: none, the seed's): epsilon moves each one-hot
    # target towards the uniform distribution over the classes (2 for melanoma, 7 for dx).
    label_smoothing: float = 0.0
    feature_cache: bool = True
    # Phase 2 on cached activations at the input of the unfrozen blocks (same math, far cheaper).
    fine_tune_cache: bool = True
    # Storage type of those cached activations ("float16" halves their memory; "float32" exact).
    cache_dtype: str = "float16"
    # "melanoma" (binary, the seed's) or "dx" (seven diagnoses, melanoma probability out).
    target: str = "melanoma"
    # Flipped copies of the training images (1: as stored; 2: + horizontal flip; 4: + vertical
    # and both). Epoch e trains on variant e mod train_flips; cached runs cache every variant.
    # With train_augment, the number of training variants (see below).
    train_flips: int = 1
    # Variants 1.. as random draws of the augment job's transform (melanoma.augment: flips,
    # rotation with reflected borders, zoom, brightness), one per image, variant and seed, in
    # place of pure flips; variant 0 stays as stored. Every training image then shows moved and
    # changed borders, not only the augmented melanoma copies (a shortcut otherwise open to the
    # model: reflected borders mean melanoma). Drawn once into the activation caches.
    train_augment: bool = False
    seed: int = 0
    # Members of an ensemble (1: one model). Member k is a full run with seed + k under
    # <run_root>/members/seed-<seed + k>/; model/model.keras averages their logits.
    ensemble_size: int = 1
    # Wall-clock budget of the whole run_training call: no new epoch starts when the mean epoch
    # so far would not fit in what is left (None: no limit). The state records the stop.
    max_train_seconds: float | None = None
    # Resume a run whose last phase stopped on its time budget (done, yet not converged):
    # it goes on from that phase's last epoch, with its optimizer state and early-stopping
    # counters, under this call's budget. Without it a finished run is left as it is.
    continue_after_budget: bool = False
    limit_train: int | None = None
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
            raise ValueError("train_augment draws each training variant once, into the activation caches: "
                             "it needs feature_cache and fine_tune_cache on")
        if self.cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}")
        if not 1 <= self.ensemble_size <= 10:
            raise ValueError(f"ensemble_size must be in [1, 10], got {self.ensemble_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.batch_size < 1 or self.epochs < 0 or self.fine_tune_epochs < 0 or self.patience < 1:
            raise ValueError("batch_size and patience must be >= 1, epochs and fine_tune_epochs >= 0")


# --- sharing the CPU ---------------------------------------------------------------------------

CPU_LOCK_ENV = "MELANOMA_CPU_LOCK"


class CpuTurns:
    """Optional cooperative CPU sharing: when ``$MELANOMA_CPU_LOCK`` names a file, every epoch
    and every chunk of cached activations runs under a shared ``flock`` of it, so a timed
    benchmark elsewhere can take it exclusively between two of them. ``waited`` adds up the
    seconds spent waiting (they are kept out of the time budget)."""

    waited = 0.0

    @classmethod
    @contextlib.contextmanager
    def turn(cls):
        path = os.environ.get(CPU_LOCK_ENV)
        if not path:
            yield
            return
        import fcntl

        with open(path, "a") as handle:
            asked = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_SH)
            cls.waited += time.perf_counter() - asked
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


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


def _optimizer_bytes(optimizer) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(v.numpy()) for v in optimizer.variables])
    return buffer.getvalue()


def _load_optimizer_bytes(trainee, data: bytes) -> None:
    """Restore Adam's step count and moments, so a resumed run continues the same optimisation."""
    trainee.optimizer.build(trainee.trainable_variables)
    with np.load(io.BytesIO(data), allow_pickle=False) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    variables = trainee.optimizer.variables
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        raise ValueError("saved optimizer state does not fit the model being resumed")
    for variable, value in zip(variables, values):
        variable.assign(value)


def read_state(run: Storage) -> dict | None:
    key = f"{CHECKPOINTS}/state.json"
    return json.loads(run.read_bytes(key)) if run.exists(key) else None


def _write_json(run: Storage, key: str, value) -> None:
    run.write_bytes(key, json.dumps(value, indent=1, default=str).encode())


def _check_resumable(run: Storage, cfg: TrainConfig) -> None:
    """Refuse to resume checkpoints written under different structural settings."""
    key = f"{CHECKPOINTS}/run-config.json"
    mine = {name: getattr(cfg, name) for name in _STRUCTURAL}
    if run.exists(key):
        theirs = json.loads(run.read_bytes(key))
        # A setting added after those checkpoints were written had its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = sorted(name for name in _STRUCTURAL if json.dumps(theirs.get(name, defaults[name]), default=str) != json.dumps(mine[name], default=str))
        if changed:
            raise ValueError(f"{run.uri(CHECKPOINTS)} holds checkpoints of a run with different {changed}: "
                             "use a new run root (or delete those checkpoints) to train with new settings")
    else:
        _write_json(run, key, mine)


class _PhaseTracker:
    """Validation AUROC (scikit-learn, on the melanoma probability), early stopping and a
    checkpoint after every epoch; its state (best, wait, history, best weights) survives a restart."""

    def __init__(self, run: Storage, phase: int, trainee, scorer, val_x, val_y: np.ndarray, resume: dict | None) -> None:
        self.run, self.phase, self.trainee, self.scorer, self.val_x, self.val_y = run, phase, trainee, scorer, val_x, val_y
        self.best_key = f"{CHECKPOINTS}/phase{phase}-best.weights.h5"
        self.best = resume["best"] if resume else -np.inf
        self.wait = resume["wait"] if resume else 0
        self.best_epoch = resume.get("best_epoch", -1) if resume else -1
        self.history: dict[str, list[float]] = {k: list(v) for k, v in resume["history"].items()} if resume else {}
        self.baseline = resume.get("baseline") if resume else None
        self.best_weights: bytes | None = run.read_bytes(self.best_key) if resume and run.exists(self.best_key) else None
        self.stop_reason: str | None = None

    def validate(self) -> tuple[float, float]:
        from sklearn.metrics import roc_auc_score

        p = self.scorer.predict(self.val_x, batch_size=64, verbose=0).reshape(-1).astype(np.float64)
        q = np.clip(p, 1e-7, 1 - 1e-7)
        loss = float(-np.mean(self.val_y * np.log(q) + (1 - self.val_y) * np.log(1 - q)))
        return float(roc_auc_score(self.val_y, p)), loss

    def set_baseline(self) -> None:
        """Phase 2 starts from phase 1's weights: they are the score to beat (best_epoch -1)."""
        auroc, loss = self.validate()
        self.baseline = {"val_auroc": auroc, "val_loss": loss}
        self.best, self.best_epoch, self.wait = auroc, -1, 0
        self.best_weights = _weights_bytes(self.trainee)
        self.run.write_bytes(self.best_key, self.best_weights)
        print(f"train: phase {self.phase} starts from val AUROC {auroc:.4f}", flush=True)

    def end_epoch(self, epoch: int, epochs: int, logs: dict, train_seconds: float, started: float,
                  decay_patience: int = 0, decay_factor: float = 1.0) -> None:
        auroc, loss = self.validate()
        logs = dict(logs, val_auroc=auroc, val_loss=loss, train_seconds=train_seconds, epoch_seconds=time.perf_counter() - started)
        improved = auroc > self.best
        if improved:
            self.best, self.wait, self.best_epoch = auroc, 0, epoch
            self.best_weights = _weights_bytes(self.trainee)
            self.run.write_bytes(self.best_key, self.best_weights)
        else:
            self.wait += 1
            if decay_patience and self.wait % decay_patience == 0:
                # Before the checkpoint: the optimizer state saved below carries the new rate.
                rate = float(np.asarray(self.trainee.optimizer.learning_rate)) * decay_factor
                self.trainee.optimizer.learning_rate.assign(rate)
                print(f"train: phase {self.phase} learning rate -> {rate:.2e} after {self.wait} epochs without improvement", flush=True)
        self.run.write_bytes(f"{CHECKPOINTS}/phase{self.phase}-last.weights.h5", _weights_bytes(self.trainee))
        self.run.write_bytes(f"{CHECKPOINTS}/phase{self.phase}-optimizer.npz", _optimizer_bytes(self.trainee.optimizer))
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        # The state is written after the weights, so it never points at weights that don't exist.
        state = {"phase": self.phase, "epoch": epoch, "best": self.best, "wait": self.wait, "best_epoch": self.best_epoch,
                 "done": False, "history": self.history, "baseline": self.baseline}
        _write_json(self.run, f"{CHECKPOINTS}/state.json", state)
        shown = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k not in ("val_auroc", "train_seconds", "epoch_seconds"))
        print(f"train: phase {self.phase} epoch {epoch + 1}/{epochs}: {shown} val_auroc {auroc:.4f}{' (best)' if improved else ''} "
              f"[{train_seconds:.1f}s train, {logs['epoch_seconds']:.1f}s with validation and checkpoint]", flush=True)

    def restore_best(self) -> None:
        if self.best_weights is not None:
            _load_weights_bytes(self.trainee, self.best_weights)


def _finish_phase(run: Storage, phase: int, tracker: _PhaseTracker, model) -> dict:
    """Mark the phase done; the full classifier's weights (best epoch restored) become its final weights."""
    state = read_state(run) or {}
    state.update(phase=phase, done=True, best=tracker.best, best_epoch=tracker.best_epoch, history=tracker.history,
                 baseline=tracker.baseline, stop_reason=tracker.stop_reason or "epochs done")
    run.write_bytes(f"{CHECKPOINTS}/phase{phase}-final.weights.h5", _weights_bytes(model))
    _write_json(run, f"{CHECKPOINTS}/phase{phase}-history.json", tracker.history)
    _write_json(run, f"{CHECKPOINTS}/state.json", state)
    return state


# --- cached activations -----------------------------------------------------------------------


def _fingerprint(model, layer: str, ids: list[str], dtype: str) -> dict:
    from training.model import weights_provenance

    provenance = weights_provenance(model)
    return {"layer": layer, "dtype": dtype, "count": len(ids), "backbone": provenance["backbone"],
            "weights_sha256": provenance["weights_sha256"], "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def cached_activations(run: Storage, split: str, model, tensors: dict[str, object], images: np.ndarray, ids: list[str],
                       dtypes: dict[str, str], batch_size: int = 64, variant: int = 0,
                       augment_seed: int | None = None) -> dict[str, np.ndarray]:
    """Frozen-network outputs (one per name in ``tensors``) for ``images``, computed in ONE pass
    and kept with the run's checkpoints, so a resumed run reuses them.

    The backbone before these tensors is frozen and deterministic (no dropout, BatchNorm in
    inference mode), so one forward pass per stored image gives exactly what every epoch
    would compute again. A cache is reused only when its layer, weights, dtype and image ids
    all match (``features-<split>-<layer>.npy`` + ``.json``). ``variant`` and ``augment_seed``:
    the training variant the images are turned into first (:func:`train_variant`).
    """
    import keras

    out: dict[str, np.ndarray] = {}
    missing = {}
    for name, tensor in tensors.items():
        layer = tensor._keras_history.operation.name
        key = f"{CHECKPOINTS}/features-{split}-{layer}"
        meta = dict(_fingerprint(model, layer, ids, dtypes[name]), flip_variant=variant)
        if augment_seed is not None and variant:
            meta["augment"] = {"seed": augment_seed, "transform_version": _augment_version()}
        if run.exists(f"{key}.json") and json.loads(run.read_bytes(f"{key}.json")) == meta and run.exists(f"{key}.npy"):
            out[name] = np.load(io.BytesIO(run.read_bytes(f"{key}.npy")), allow_pickle=False)
        else:
            missing[name] = (tensor, key, meta)
    if missing:
        names = list(missing)
        extractor = keras.Model(model.input, [missing[n][0] for n in names])
        started, waited = time.perf_counter(), CpuTurns.waited
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, len(images), 1024):  # bounded memory: cast each chunk to its storage dtype
            with CpuTurns.turn():
                chunk = train_variant(images[start : start + 1024], ids[start : start + 1024], variant, augment_seed)
                outputs = extractor.predict(chunk, batch_size=batch_size, verbose=0)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            for n, value in zip(names, outputs):
                parts[n].append(np.asarray(value).astype(dtypes[n]))
        waited = CpuTurns.waited - waited
        seconds = time.perf_counter() - started - waited
        print(f"train: cached {', '.join(missing[n][2]['layer'] for n in names)} for {len(images)} {split} images "
              f"in {seconds:.1f}s ({len(images) / max(seconds, 1e-9):.0f} img/s)"
              f"{f' after waiting {waited:.0f}s for the CPU lock' if waited >= 1 else ''}", flush=True)
        for n in names:
            _, key, meta = missing[n]
            out[n] = np.concatenate(parts[n]) if parts[n] else np.zeros((0, *extractor.outputs[names.index(n)].shape[1:]), dtypes[n])
            buffer = io.BytesIO()
            np.save(buffer, out[n], allow_pickle=False)
            run.write_bytes(f"{key}.npy", buffer.getvalue())
            _write_json(run, f"{key}.json", meta)
    return out


def fine_tune_cut(model, n_blocks: int):
    """The one tensor feeding the last ``n_blocks`` backbone blocks: phase 2's cache point.

    Every input of those blocks' layers that is not produced inside them must be this same
    tensor (true at block boundaries of ResNet50 and Lite0); ``n_blocks=0`` gives the last
    conv layer's output (head-only fine-tuning).
    """
    from training.model import _backbone_blocks, last_conv_layer_name

    if n_blocks == 0:
        return model.get_layer(last_conv_layer_name(model)).output
    blocks = _backbone_blocks(model)
    if not 0 < n_blocks <= len(blocks):
        raise ValueError(f"fine_tune_blocks must be in [0, {len(blocks)}], got {n_blocks}")
    inside = [layer for block in blocks[len(blocks) - n_blocks :] for layer in block]
    produced = {id(layer.output) for layer in inside}
    external: dict[int, object] = {}
    for layer in inside:
        inputs = layer._inbound_nodes[0].input_tensors
        for tensor in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if id(tensor) not in produced:
                external[id(tensor)] = tensor
    if len(external) != 1:
        raise ValueError(f"the last {n_blocks} blocks take {len(external)} inputs from the frozen part; expected exactly one")
    return next(iter(external.values()))


# --- phases -----------------------------------------------------------------------------------


def _training_output(model, target: str):
    """What the loss sees: the probability (binary) or the diagnosis logits (dx)."""
    return model.output if target == "melanoma" else model.get_layer("dx_logits").output


def smoothed_sparse_crossentropy(smoothing: float, classes: int):
    """Loss (labels (N,) or (N,1) int, logits (N,K)) -> (N,): cross-entropy against smoothed one-hot targets.

    Keras' sparse cross-entropy has no label smoothing, so the labels are one-hot encoded and
    the categorical loss (target (1 - smoothing) * one_hot + smoothing / K) is used.
    """
    import keras

    def loss(labels, logits):
        one_hot = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(labels, "int32"), (-1,)), classes)
        return keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True, label_smoothing=smoothing)

    return loss


def _compile(trainee, cfg: TrainConfig, learning_rate: float) -> None:
    import keras

    if cfg.target == "melanoma":
        loss = keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing)
        metrics = [keras.metrics.AUC(num_thresholds=1000, name="auroc")]
    elif cfg.label_smoothing:
        loss, metrics = smoothed_sparse_crossentropy(cfg.label_smoothing, len(DX_CLASSES)), []
    else:
        loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), []
    trainee.compile(optimizer=keras.optimizers.Adam(learning_rate, beta_1=0.9, beta_2=0.999), loss=loss, metrics=metrics)


FLIP_AXES = {0: (), 1: (2,), 2: (1,), 3: (1, 2)}  # variant -> flipped image axes (N, H, W, C)


def flip_variant(images: np.ndarray, variant: int) -> np.ndarray:
    """Variant 0: as stored; 1: left-right; 2: up-down; 3: both (a 180 degree rotation)."""
    return np.ascontiguousarray(np.flip(images, FLIP_AXES[variant])) if variant else images


def _augment_version() -> int:
    from melanoma.augment import AUGMENT_PARAMS

    return int(AUGMENT_PARAMS["version"])


def train_variant(images: np.ndarray, ids: list[str], variant: int, augment_seed: int | None = None) -> np.ndarray:
    """Training images uint8 (N, H, W, 3) as epoch variant ``variant`` shows them, same shape.

    ``augment_seed`` None: :func:`flip_variant`. Otherwise variant 0 is the images as stored and
    variant v >= 1 warps each image by its own draw of the augment job's transform, keyed by
    (image id, seed, v), so a rerun or a resumed run draws the same images.
    """
    if augment_seed is None or variant == 0:
        return flip_variant(images, variant)
    from melanoma.augment import augment_image, draw_params

    if len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    out = np.empty_like(images)
    for i, image_id in enumerate(ids):
        out[i] = augment_image(images[i], draw_params(f"{image_id}:train-variant:{augment_seed}:{variant}"))
    return out


def epoch_order(n: int, seed: int, phase: int, epoch: int) -> np.ndarray:
    """The shuffle of one epoch: a function of (seed, phase, epoch) only, so a resumed run
    sees the same batches as an uninterrupted one, and cached and uncached runs the same."""
    return np.random.default_rng([seed, phase, epoch]).permutation(n)


def _run_phase(phase: int, model, cfg: TrainConfig, run: Storage, start, train_x, train_y, val_x, val_y: np.ndarray,
               class_weight: dict, resume: dict | None, *, learning_rate: float, epochs: int, baseline: bool,
               deadline: float | None = None) -> dict:
    """Train ``start -> output`` (layers shared with ``model``) for one phase; returns its final state.

    ``train_x``: images (flipped per epoch by :func:`flip_variant`), a list of cached arrays,
    one per flip variant (shuffled here, per epoch, by :func:`epoch_order`), or a function
    epoch -> tf.data dataset of (x, y) batches (shuffled by itself); ``train_y`` goes with arrays.
    """
    import keras

    trainee = keras.Model(start, _training_output(model, cfg.target), name=f"phase{phase}_trainee")
    scorer = trainee if cfg.target == "melanoma" else keras.Model(start, model.output, name=f"phase{phase}_scorer")
    _compile(trainee, cfg, learning_rate)
    if isinstance(val_x, np.ndarray) and val_x.dtype == np.float16:
        val_x = val_x.astype(np.float32)
    tracker = _PhaseTracker(run, phase, trainee, scorer, val_x, val_y, resume)
    initial_epoch = resume["epoch"] + 1 if resume else 0
    if resume:
        _load_weights_bytes(trainee, run.read_bytes(f"{CHECKPOINTS}/phase{phase}-last.weights.h5"))
        if run.exists(f"{CHECKPOINTS}/phase{phase}-optimizer.npz"):
            _load_optimizer_bytes(trainee, run.read_bytes(f"{CHECKPOINTS}/phase{phase}-optimizer.npz"))
        print(f"train: resuming phase {phase} at epoch {initial_epoch + 1} (epochs 1-{initial_epoch} done, "
              f"best val AUROC {tracker.best:.4f})", flush=True)
    elif baseline:
        tracker.set_baseline()
    if isinstance(train_x, (list, np.ndarray)):
        sample_weight = np.array([class_weight[int(label)] for label in train_y], np.float32)
    for epoch in range(initial_epoch, epochs):
        if tracker.wait >= cfg.patience:
            tracker.stop_reason = f"early stopping: no better val AUROC in {tracker.wait} epochs"
            print(f"train: phase {phase} stops: {tracker.stop_reason}", flush=True)
            break
        spent = tracker.history.get("epoch_seconds", [])
        if deadline is not None and spent and time.perf_counter() - CpuTurns.waited + sum(spent) / len(spent) > deadline:
            tracker.stop_reason = f"time budget: another epoch (~{sum(spent) / len(spent):.0f}s) would not fit"
            print(f"train: phase {phase} stops after epoch {epoch}: {tracker.stop_reason}", flush=True)
            break
        with CpuTurns.turn():
            started = time.perf_counter()
            if isinstance(train_x, (list, np.ndarray)):
                variant = epoch % cfg.train_flips
                order = epoch_order(len(train_y), cfg.seed, phase, epoch)
                if isinstance(train_x, list):  # cached outputs, one array per training variant
                    epoch_x = train_x[variant][order]
                else:  # images: flipped here, exactly as the cached variants were
                    epoch_x = flip_variant(train_x[order], variant)
                if epoch_x.dtype == np.float16:
                    epoch_x = epoch_x.astype(np.float32)
                result = trainee.fit(epoch_x, train_y[order], sample_weight=sample_weight[order], batch_size=cfg.batch_size,
                                     epochs=1, shuffle=False, verbose=0)
            else:  # a function epoch -> tf.data pipeline of that epoch's batches
                result = trainee.fit(train_x(epoch), epochs=1, class_weight=class_weight, verbose=0)
            logs = {name: values[-1] for name, values in result.history.items()}
            logs["learning_rate"] = float(np.asarray(trainee.optimizer.learning_rate))
            tracker.end_epoch(epoch, epochs, logs, time.perf_counter() - started, started, cfg.lr_decay_patience, cfg.lr_decay_factor)
    tracker.restore_best()
    return _finish_phase(run, phase, tracker, model)


def train_phase1(model, cfg: TrainConfig, run: Storage, train: SplitArrays, val: SplitArrays, weights: dict, resume: dict | None,
                 cache: dict | None = None, deadline: float | None = None) -> dict:
    """Head only, backbone frozen: on cached pooled features (default) or on images every epoch."""
    from training.model import freeze_backbone

    freeze_backbone(model)
    if cfg.feature_cache:
        start = model.get_layer("head_pool").output
        train_x, val_x = cache["train"]["pooled"], cache["val"]["pooled"]  # train: one array per training variant
    else:
        start, train_x, val_x = model.input, train.images, val.images
    return _run_phase(1, model, cfg, run, start, train_x, train.targets(cfg.target), val_x, val.labels.astype(np.float64),
                      weights, resume, learning_rate=cfg.learning_rate, epochs=cfg.epochs, baseline=False, deadline=deadline)


def train_phase2(model, cfg: TrainConfig, run: Storage, storage: Storage, manifest: dict, train: SplitArrays, val: SplitArrays,
                 weights: dict, resume: dict | None, cache: dict | None = None, deadline: float | None = None) -> dict:
    """The last ``fine_tune_blocks`` blocks and the head: on cached activations (default) or end to end."""
    from training.model import unfreeze_last_blocks

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
                return shard_dataset(storage, manifest, ["train"], augmented=True, batch_size=cfg.batch_size, shuffle=True,
                                     seed=cfg.seed * 100_003 + epoch, target=cfg.target, flip=epoch % cfg.train_flips)

            train_y = None
        else:
            train_x, train_y = train.images, train.targets(cfg.target)
    return _run_phase(2, model, cfg, run, start, train_x, train_y, val_x, val_y, weights, resume,
                      learning_rate=cfg.fine_tune_learning_rate, epochs=cfg.fine_tune_epochs, baseline=True, deadline=deadline)


def _caches(model, cfg: TrainConfig, run: Storage, train: SplitArrays, val: SplitArrays, need_pooled: bool, need_cut: bool) -> dict | None:
    """Everything the cached phases still to run need, from one pass of the frozen network per image."""
    tensors, dtypes = {}, {}
    if need_pooled and cfg.feature_cache:
        tensors["pooled"], dtypes["pooled"] = model.get_layer("head_pool").output, "float32"
    if need_cut and cfg.fine_tune_epochs > 0 and cfg.fine_tune_cache:
        tensors["cut"], dtypes["cut"] = fine_tune_cut(model, cfg.fine_tune_blocks), cfg.cache_dtype
    if not tensors:
        return None
    cache = {"val": cached_activations(run, "val", model, tensors, val.images, val.ids(), dtypes), "train": {name: [] for name in tensors}}
    augment_seed = cfg.seed if cfg.train_augment else None
    for variant in range(cfg.train_flips):
        name = "train" if variant == 0 else f"train-{'aug' if cfg.train_augment else 'flip'}{variant}"
        outputs = cached_activations(run, name, model, tensors, train.images, train.ids(), dtypes, variant=variant,
                                     augment_seed=augment_seed)
        for key, value in outputs.items():
            cache["train"][key].append(value)
    return cache


# --- the whole run ----------------------------------------------------------------------------


def run_training(cfg: TrainConfig) -> dict:
    """Train (or resume) one run; writes model.keras, history.json, config.json, provenance.json."""
    if cfg.ensemble_size > 1:
        return run_ensemble_training(cfg)
    import keras

    from training.model import build_classifier, weights_provenance

    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    storage = open_storage(cfg.processed_root)
    run = open_storage(cfg.run_root)
    manifest = require_manifest(storage, as_of=cfg.as_of, version=cfg.manifest_version)
    stream_phase2 = cfg.fine_tune_epochs > 0 and not cfg.fine_tune_cache and cfg.limit_train is None
    train = load_arrays(storage, manifest, "train", augmented=True, limit=cfg.limit_train)
    val = load_arrays(storage, manifest, "val", limit=cfg.limit_val)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"manifest v{manifest['version']} has {len(train)} training and {len(val)} validation images: need both")
    if val.labels.min() == val.labels.max():
        raise ValueError("the validation split holds one class only: AUROC (the early-stopping signal) is undefined")
    binary_weights = class_weights(train.labels, cfg.class_weight)
    weights = target_class_weights(binary_weights, cfg.target)
    train.targets(cfg.target)  # a diagnosis outside DX_CLASSES fails here, before any training
    model = build_classifier(cfg.backbone, cfg.weights, classes=DX_CLASSES if cfg.target == "dx" else None)
    _check_resumable(run, cfg)
    print(f"train: manifest v{manifest['version']}, {len(train)} train ({int(train.labels.sum())} melanoma incl. augmented), "
          f"{len(val)} val; target {cfg.target}; class weights {binary_weights}; backbone {cfg.backbone} weights {cfg.weights}", flush=True)

    waited_before = CpuTurns.waited
    # Seconds spent waiting for the CPU lock do not count against the budget (see CpuTurns).
    deadline = started + cfg.max_train_seconds + waited_before if cfg.max_train_seconds else None
    state = read_state(run)
    if cfg.continue_after_budget and state and state["done"] and str(state.get("stop_reason") or "").startswith("time budget"):
        print(f"train: phase {state['phase']} stopped on its time budget after epoch {state['epoch'] + 1} "
              f"({state['stop_reason']}); continuing it", flush=True)
        state = {**state, "done": False}
    phase1_done = bool(state) and (state["phase"] == 2 or state["done"])
    cache_started, waited_before_cache = time.perf_counter(), CpuTurns.waited
    phase2_done = bool(state) and state["phase"] == 2 and state["done"]
    cache = _caches(model, cfg, run, train, val, need_pooled=not phase1_done, need_cut=not phase2_done)
    cache_seconds = time.perf_counter() - cache_started - (CpuTurns.waited - waited_before_cache)
    if stream_phase2 and (cfg.feature_cache or phase1_done):
        train.images = None  # phase 2 streams the shards; nothing else needs the training images in memory
    history: dict[str, dict] = {}
    stop_reason: dict[str, str | None] = {}
    if not phase1_done:
        resume = state if state and state["phase"] == 1 else None
        final = train_phase1(model, cfg, run, train, val, weights, resume, cache, deadline)
        history["phase1"], stop_reason["phase1"] = final["history"], final.get("stop_reason")
    else:
        _load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase1-final.weights.h5"))
        history["phase1"] = json.loads(run.read_bytes(f"{CHECKPOINTS}/phase1-history.json"))
        if state["phase"] == 1:
            print("train: phase 1 already finished in a previous attempt; reusing its weights", flush=True)
    if cfg.fine_tune_epochs > 0:
        if state and state["phase"] == 2 and state["done"]:
            _load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase2-final.weights.h5"))
            history["phase2"], stop_reason["phase2"] = state["history"], state.get("stop_reason")
        else:
            resume = state if state and state["phase"] == 2 else None
            final = train_phase2(model, cfg, run, storage, manifest, train, val, weights, resume, cache, deadline)
            history["phase2"], stop_reason["phase2"] = final["history"], final.get("stop_reason")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as handle:
            run.write_bytes("model/model.keras", handle.read())
    provenance = weights_provenance(model)
    seconds = time.perf_counter() - started
    best = {phase: max(h.get("val_auroc", [float("nan")]) or [float("nan")]) for phase, h in history.items()}
    run.write_bytes("model/history.json", json.dumps(history, indent=2).encode())
    run.write_bytes("model/config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str).encode())
    run.write_bytes(
        "model/provenance.json",
        json.dumps({**provenance, "manifest_version": manifest["version"], "preprocessing": manifest.get("preprocessing"),
                    "train_images": len(train), "val_images": len(val),
                    "target": cfg.target, "classes": list(DX_CLASSES) if cfg.target == "dx" else ["other", "melanoma"]},
                   indent=2).encode(),
    )
    return {
        "model_uri": run.uri("model/model.keras"),
        "manifest_version": manifest["version"],
        "backbone": cfg.backbone,
        "target": cfg.target,
        "weights": provenance,
        "best_val_auroc": best,
        "epochs_run": {phase: len(h.get("loss", [])) for phase, h in history.items()},
        "stop_reason": stop_reason,
        "train_seconds": round(seconds, 1),
        "cache_seconds": round(cache_seconds, 1),
        "cpu_lock_wait_seconds": round(CpuTurns.waited - waited_before, 1),
    }


def run_ensemble_training(cfg: TrainConfig) -> dict:
    """Train (or resume) ``cfg.ensemble_size`` members, then export their ensemble.

    Member k is :func:`run_training` with ``seed + k`` under ``<run_root>/members/seed-<seed + k>``
    (each resumes on its own); a time budget is shared out as the members go (each gets an
    equal share of what is left). ``model/model.keras`` is :func:`training.ensemble.build_ensemble`
    of the members; ``model/history.json`` and ``provenance.json`` list them.
    """
    from training.ensemble import build_ensemble
    from training.predict import load_model

    started = time.perf_counter()
    run = open_storage(cfg.run_root)
    members = []
    for index in range(cfg.ensemble_size):
        budget = None
        if cfg.max_train_seconds:
            budget = max(0.0, cfg.max_train_seconds - (time.perf_counter() - started)) / (cfg.ensemble_size - index)
        seed = cfg.seed + index
        member_cfg = dataclasses.replace(cfg, run_root=run.uri(f"members/seed-{seed}"), seed=seed,
                                         ensemble_size=1, max_train_seconds=budget)
        print(f"train: ensemble member {index + 1}/{cfg.ensemble_size} (seed {seed}) under {member_cfg.run_root}", flush=True)
        members.append(run_training(member_cfg))
    ensemble = build_ensemble([load_model(member["model_uri"]) for member in members])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        ensemble.save(path)
        with open(path, "rb") as handle:
            run.write_bytes("model/model.keras", handle.read())
    by_member = {f"seed-{cfg.seed + index}": member for index, member in enumerate(members)}
    run.write_bytes("model/config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str).encode())
    run.write_bytes("model/history.json", json.dumps({name: member["best_val_auroc"] for name, member in by_member.items()}, indent=2).encode())
    run.write_bytes("model/provenance.json", json.dumps({"ensemble_of": {name: member["model_uri"] for name, member in by_member.items()},
                                                         "members": {name: member["weights"] for name, member in by_member.items()}},
                                                        indent=2).encode())
    return {
        "model_uri": run.uri("model/model.keras"),
        "manifest_version": members[0]["manifest_version"],
        "backbone": cfg.backbone,
        "target": cfg.target,
        "ensemble_size": cfg.ensemble_size,
        "members": {name: {key: member[key] for key in ("model_uri", "best_val_auroc", "epochs_run", "stop_reason", "train_seconds")}
                    for name, member in by_member.items()},
        "train_seconds": round(time.perf_counter() - started, 1),
        "cpu_lock_wait_seconds": round(sum(member["cpu_lock_wait_seconds"] for member in members), 1),
    }
