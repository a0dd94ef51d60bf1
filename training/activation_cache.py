"""Activations of the frozen part of the network, computed once per stored image and kept.

Phase 1 trains the head on pooled features, phase 2 the unfrozen tail on the activation at
its cut (:func:`training.model.fine_tune_cut`). Everything before them is frozen and
deterministic (no dropout, BatchNorm in inference mode), so one forward pass per stored
image gives exactly what every epoch would compute again. The caches live with the run's
checkpoints, so a resumed run reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import keras
import numpy as np

from melanoma.progress import Progress
from melanoma.storage import Storage
from training.checkpoints import CHECKPOINTS, write_json
from training.config import TrainConfig
from training.cpu_turns import CpuTurns
from training.data import SplitArrays
from training.model import fine_tune_cut, weights_provenance
from training.variants import augment_version, train_variant

__all__ = ["CHUNK_IMAGES", "cached_activations", "fingerprint", "training_caches"]

log = logging.getLogger(__name__)

#: Images per forward pass chunk: bounded memory (each chunk is cast to its storage dtype),
#: one CPU turn and one progress step each.
CHUNK_IMAGES = 1024


def fingerprint(model, layer: str, ids: list[str], dtype: str) -> dict:
    """What a cache depends on: layer, dtype, backbone weights and the image ids, in order."""
    provenance = weights_provenance(model)
    return {
        "layer": layer,
        "dtype": dtype,
        "count": len(ids),
        "backbone": provenance["backbone"],
        "weights_sha256": provenance["weights_sha256"],
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }


def cached_activations(
    run: Storage,
    split: str,
    model,
    tensors: dict[str, object],
    images: np.ndarray,
    ids: list[str],
    dtypes: dict[str, str],
    batch_size: int = 64,
    variant: int = 0,
    augment_seed: int | None = None,
    colour_jitter: bool = False,
    random_crop: bool = False,
) -> dict[str, np.ndarray]:
    """Frozen-network outputs (one per name in ``tensors``) for ``images``, computed in ONE pass
    and kept with the run's checkpoints, so a resumed run reuses them.

    A cache is reused only when its layer, weights, dtype and image ids all match
    (``features-<split>-<layer>.npy`` + ``.json``). ``variant`` and ``augment_seed``: the
    training variant the images are turned into first (:func:`training.variants.train_variant`,
    with ``colour_jitter`` and ``random_crop``).
    """
    out: dict[str, np.ndarray] = {}
    missing = {}
    for name, tensor in tensors.items():
        layer = tensor._keras_history.operation.name
        key = f"{CHECKPOINTS}/features-{split}-{layer}"
        meta = dict(fingerprint(model, layer, ids, dtypes[name]), flip_variant=variant)
        if augment_seed is not None and variant:
            meta["augment"] = {"seed": augment_seed, "transform_version": augment_version()}
            if colour_jitter:  # only when on: caches drawn before the setting existed stay valid
                meta["augment"]["colour_jitter"] = True
            if random_crop:
                meta["augment"]["random_crop"] = True
        if (
            run.exists(f"{key}.json")
            and json.loads(run.read_bytes(f"{key}.json")) == meta
            and run.exists(f"{key}.npy")
        ):
            out[name] = np.load(io.BytesIO(run.read_bytes(f"{key}.npy")), allow_pickle=False)
        else:
            missing[name] = (tensor, key, meta)
    if missing:
        drawn_as = (variant, augment_seed, colour_jitter, random_crop)
        out.update(_compute(run, split, model, missing, images, ids, dtypes, batch_size, drawn_as))
    return out


def _compute(
    run: Storage,
    split: str,
    model,
    missing: dict,
    images: np.ndarray,
    ids: list[str],
    dtypes: dict[str, str],
    batch_size: int,
    drawn_as: tuple[int, int | None, bool, bool],
) -> dict[str, np.ndarray]:
    """One forward pass over ``images`` for every missing cache; writes them. ``drawn_as``: the
    arguments of :func:`train_variant` after the images and ids."""
    names = list(missing)
    layers = ", ".join(missing[n][2]["layer"] for n in names)
    extractor = keras.Model(model.input, [missing[n][0] for n in names])
    started, waited = time.perf_counter(), CpuTurns.waited
    progress = Progress(len(images), f"caching {layers} for {split} images", log.info)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(images), CHUNK_IMAGES):  # bounded memory: cast each chunk to its storage dtype
        with CpuTurns.turn():
            chunk = train_variant(
                images[start : start + CHUNK_IMAGES], ids[start : start + CHUNK_IMAGES], *drawn_as
            )
            outputs = extractor.predict(chunk, batch_size=batch_size, verbose=0)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for n, value in zip(names, outputs):
            parts[n].append(np.asarray(value).astype(dtypes[n]))
        progress.advance(len(chunk))
    waited = CpuTurns.waited - waited
    seconds = time.perf_counter() - started - waited
    log.info(
        "cached %s for %d %s images in %.1fs (%.0f img/s)%s",
        layers,
        len(images),
        split,
        seconds,
        len(images) / max(seconds, 1e-9),
        f" after waiting {waited:.0f}s for the CPU lock" if waited >= 1 else "",
    )
    out = {}
    for n in names:
        _, key, meta = missing[n]
        out[n] = (
            np.concatenate(parts[n])
            if parts[n]
            else np.zeros((0, *extractor.outputs[names.index(n)].shape[1:]), dtypes[n])
        )
        buffer = io.BytesIO()
        np.save(buffer, out[n], allow_pickle=False)
        run.write_bytes(f"{key}.npy", buffer.getvalue())
        write_json(run, f"{key}.json", meta)
    return out


def training_caches(
    model,
    cfg: TrainConfig,
    run: Storage,
    train: SplitArrays,
    val: SplitArrays,
    need_pooled: bool,
    need_cut: bool,
) -> dict | None:
    """Everything the cached phases still to run need, from one pass of the frozen network per image."""
    tensors, dtypes = {}, {}
    if need_pooled and cfg.feature_cache:
        tensors["pooled"], dtypes["pooled"] = model.get_layer("head_pool").output, "float32"
    if need_cut and cfg.fine_tune_epochs > 0 and cfg.fine_tune_cache:
        tensors["cut"], dtypes["cut"] = fine_tune_cut(model, cfg.fine_tune_blocks), cfg.cache_dtype
    if not tensors:
        return None
    cache = {
        "val": cached_activations(run, "val", model, tensors, val.images, val.ids(), dtypes),
        "train": {name: [] for name in tensors},
    }
    augment_seed = cfg.seed if cfg.train_augment else None
    for variant in range(cfg.train_flips):
        name = "train" if variant == 0 else f"train-{'aug' if cfg.train_augment else 'flip'}{variant}"
        outputs = cached_activations(
            run,
            name,
            model,
            tensors,
            train.images,
            train.ids(),
            dtypes,
            variant=variant,
            augment_seed=augment_seed,
            colour_jitter=cfg.train_colour_jitter,
            random_crop=cfg.train_random_crop,
        )
        for key, value in outputs.items():
            cache["train"][key].append(value)
    return cache
