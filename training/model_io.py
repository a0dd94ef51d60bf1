"""Model I/O through :mod:`melanoma.storage`: ``.keras`` models and weight files as bytes.

Keras reads and writes files only, and a model may live on S3/MinIO: each function goes
through one temporary folder, so no caller handles temporary files. Every model load and
save of the project goes through here (training, ensembles, evaluation, predict).
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, TypeVar

import keras

import training.model  # noqa: F401  (registers the custom layers, which deserialising needs)
from melanoma.storage import Storage, split_uri

__all__ = ["load_model", "save_model", "model_bytes", "weights_bytes", "load_weights_bytes"]

T = TypeVar("T")


def _via_file(filename: str, save: Callable[[str], object]) -> bytes:
    """What ``save(path)`` writes to a temporary file named ``filename``, as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, filename)
        save(path)
        with open(path, "rb") as handle:
            return handle.read()


def _from_file(filename: str, data: bytes, load: Callable[[str], T]) -> T:
    """``load(path)`` of a temporary file named ``filename`` holding ``data``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, filename)
        with open(path, "wb") as handle:
            handle.write(data)
        return load(path)


def load_model(model_uri: str) -> keras.Model:
    """Load a ``.keras`` model from a path or an object-store URI."""
    storage, name = split_uri(model_uri)
    return _from_file(
        os.path.basename(name) or "model.keras", storage.read_bytes(name), keras.models.load_model
    )


def model_bytes(model: keras.Model) -> bytes:
    """The ``.keras`` file of ``model``, as bytes."""
    return _via_file("model.keras", model.save)


def save_model(model: keras.Model, target: str | Storage, key: str | None = None) -> str:
    """Save ``model`` as a ``.keras`` file: to a path or URI, or to ``key`` of a storage; returns its URI."""
    storage, name = (target, key) if key is not None else split_uri(str(target))
    storage.write_bytes(name, model_bytes(model))
    return storage.uri(name)


def weights_bytes(model: keras.Model) -> bytes:
    """The model's weights as a ``.weights.h5`` file's bytes (checkpoints)."""
    return _via_file("w.weights.h5", model.save_weights)


def load_weights_bytes(model: keras.Model, data: bytes) -> None:
    """Load weights saved by :func:`weights_bytes` into ``model`` (same architecture)."""
    _from_file("w.weights.h5", data, model.load_weights)
