"""Checkpoint state of a training run on object storage: what a rerun resumes from.

After every epoch ``<run_root>/model/checkpoints/`` gets the trained weights, the optimizer
state and the early-stopping state (``state.json``, written last, so it never points at
weights that do not exist). :class:`PhaseTracker` measures validation AUROC, stops early and
writes them; :func:`check_resumable` refuses checkpoints written under other settings.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from melanoma.progress import Progress
from melanoma.storage import Storage
from training.config import TrainConfig
from training.model_io import load_weights_bytes, weights_bytes

__all__ = [
    "CHECKPOINTS",
    "STRUCTURAL",
    "PhaseTracker",
    "check_resumable",
    "finish_phase",
    "load_optimizer_bytes",
    "optimizer_bytes",
    "read_state",
    "write_json",
]

log = logging.getLogger(__name__)

CHECKPOINTS = "model/checkpoints"
# Settings a resumed run must share with the attempt that wrote the checkpoints.
STRUCTURAL = (
    "backbone",
    "weights",
    "target",
    "train_flips",
    "train_augment",
    "train_colour_jitter",
    "train_random_crop",
    "fine_tune_blocks",
    "feature_cache",
    "fine_tune_cache",
    "cache_dtype",
    "limit_train",
    "limit_val",
    "as_of",
    "manifest_version",
    "seed",
)


def optimizer_bytes(optimizer) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(v.numpy()) for v in optimizer.variables])
    return buffer.getvalue()


def load_optimizer_bytes(trainee, data: bytes) -> None:
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


def write_json(run: Storage, key: str, value) -> None:
    run.write_bytes(key, json.dumps(value, indent=1, default=str).encode())


def check_resumable(run: Storage, cfg: TrainConfig) -> None:
    """Refuse to resume checkpoints written under different structural settings."""
    key = f"{CHECKPOINTS}/run-config.json"
    mine = {name: getattr(cfg, name) for name in STRUCTURAL}
    if run.exists(key):
        theirs = json.loads(run.read_bytes(key))
        # A setting added after those checkpoints were written had its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = sorted(
            name
            for name in STRUCTURAL
            if json.dumps(theirs.get(name, defaults[name]), default=str)
            != json.dumps(mine[name], default=str)
        )
        if changed:
            raise ValueError(
                f"{run.uri(CHECKPOINTS)} holds checkpoints of a run with different {changed}: "
                "use a new run root (or delete those checkpoints) to train with new settings"
            )
    else:
        write_json(run, key, mine)


class PhaseTracker:
    """Validation AUROC (scikit-learn, on the melanoma probability), early stopping and a
    checkpoint after every epoch; its state (best, wait, history, best weights) survives a restart.

    ``progress``: counts this attempt's epochs; each epoch's line (metrics, seconds, the
    phase's ETA if no early stop comes first) goes through it.
    """

    def __init__(
        self,
        run: Storage,
        phase: int,
        trainee,
        scorer,
        val_x,
        val_y: np.ndarray,
        resume: dict | None,
        progress: Progress | None = None,
    ) -> None:
        self.run, self.phase, self.trainee, self.scorer, self.val_x, self.val_y = (
            run,
            phase,
            trainee,
            scorer,
            val_x,
            val_y,
        )
        self.progress = progress
        self.best_key = f"{CHECKPOINTS}/phase{phase}-best.weights.h5"
        self.best = resume["best"] if resume else -np.inf
        self.wait = resume["wait"] if resume else 0
        self.best_epoch = resume.get("best_epoch", -1) if resume else -1
        self.history: dict[str, list[float]] = (
            {k: list(v) for k, v in resume["history"].items()} if resume else {}
        )
        self.baseline = resume.get("baseline") if resume else None
        self.best_weights: bytes | None = (
            run.read_bytes(self.best_key) if resume and run.exists(self.best_key) else None
        )
        self.stop_reason: str | None = None

    def validate(self) -> tuple[float, float]:
        p = self.scorer.predict(self.val_x, batch_size=64, verbose=0).reshape(-1).astype(np.float64)
        q = np.clip(p, 1e-7, 1 - 1e-7)
        loss = float(-np.mean(self.val_y * np.log(q) + (1 - self.val_y) * np.log(1 - q)))
        return float(roc_auc_score(self.val_y, p)), loss

    def set_baseline(self) -> None:
        """Phase 2 starts from phase 1's weights: they are the score to beat (best_epoch -1)."""
        auroc, loss = self.validate()
        self.baseline = {"val_auroc": auroc, "val_loss": loss}
        self.best, self.best_epoch, self.wait = auroc, -1, 0
        self.best_weights = weights_bytes(self.trainee)
        self.run.write_bytes(self.best_key, self.best_weights)
        log.info("phase %d starts from val AUROC %.4f", self.phase, auroc)

    def end_epoch(
        self,
        epoch: int,
        epochs: int,
        logs: dict,
        train_seconds: float,
        started: float,
        decay_patience: int = 0,
        decay_factor: float = 1.0,
    ) -> None:
        auroc, loss = self.validate()
        logs = dict(
            logs,
            val_auroc=auroc,
            val_loss=loss,
            train_seconds=train_seconds,
            epoch_seconds=time.perf_counter() - started,
        )
        improved = auroc > self.best
        if improved:
            self.best, self.wait, self.best_epoch = auroc, 0, epoch
            self.best_weights = weights_bytes(self.trainee)
            self.run.write_bytes(self.best_key, self.best_weights)
        else:
            self.wait += 1
            if decay_patience and self.wait % decay_patience == 0:
                # Before the checkpoint: the optimizer state saved below carries the new rate.
                rate = float(np.asarray(self.trainee.optimizer.learning_rate)) * decay_factor
                self.trainee.optimizer.learning_rate.assign(rate)
                log.info(
                    "phase %d learning rate -> %.2e after %d epochs without improvement",
                    self.phase,
                    rate,
                    self.wait,
                )
        self.save_epoch(epoch, logs)
        shown = " ".join(
            f"{k} {v:.4g}"
            for k, v in logs.items()
            if k not in ("val_auroc", "train_seconds", "epoch_seconds")
        )
        line = (
            f"epoch {epoch + 1}/{epochs}: {shown} val_auroc {auroc:.4f}{' (best)' if improved else ''} "
            f"[{train_seconds:.1f}s train, {logs['epoch_seconds']:.1f}s with validation and checkpoint]"
        )
        if self.progress is not None:
            self.progress.advance(detail=line)
        else:
            log.info("phase %d %s", self.phase, line)

    def save_epoch(self, epoch: int, logs: dict) -> None:
        """Last weights, optimizer state, history and early-stopping state of an epoch just trained."""
        self.run.write_bytes(f"{CHECKPOINTS}/phase{self.phase}-last.weights.h5", weights_bytes(self.trainee))
        self.run.write_bytes(
            f"{CHECKPOINTS}/phase{self.phase}-optimizer.npz", optimizer_bytes(self.trainee.optimizer)
        )
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        # The state is written after the weights, so it never points at weights that don't exist.
        state = {
            "phase": self.phase,
            "epoch": epoch,
            "best": self.best,
            "wait": self.wait,
            "best_epoch": self.best_epoch,
            "done": False,
            "history": self.history,
            "baseline": self.baseline,
        }
        write_json(self.run, f"{CHECKPOINTS}/state.json", state)

    def restore_best(self) -> None:
        if self.best_weights is not None:
            load_weights_bytes(self.trainee, self.best_weights)


def finish_phase(run: Storage, phase: int, tracker: PhaseTracker, model) -> dict:
    """Mark the phase done; the full classifier's weights (best epoch restored) become its final weights."""
    state = read_state(run) or {}
    state.update(
        phase=phase,
        done=True,
        best=tracker.best,
        best_epoch=tracker.best_epoch,
        history=tracker.history,
        baseline=tracker.baseline,
        stop_reason=tracker.stop_reason or "epochs done",
    )
    run.write_bytes(f"{CHECKPOINTS}/phase{phase}-final.weights.h5", weights_bytes(model))
    write_json(run, f"{CHECKPOINTS}/phase{phase}-history.json", tracker.history)
    write_json(run, f"{CHECKPOINTS}/state.json", state)
    return state
