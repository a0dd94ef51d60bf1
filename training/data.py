"""Training inputs from the preprocessed shards: in-memory arrays and tf.data pipelines.

Every reader starts from a manifest (never from a folder listing), and every shard is
checked against the manifest's checksum before use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from melanoma.drop_metadata import DX_CODES
from melanoma.manifest import load_split, read_verified_shard, select_shards
from melanoma.records import IMAGE_SIZE
from melanoma.storage import Storage

#: Training targets: "melanoma" = the seed's binary label; "dx" = the diagnosis, one of
#: :data:`DX_CLASSES` (the model still outputs the melanoma probability, see training.model).
TARGETS = ("melanoma", "dx")
#: Class order of a "dx" model's logits.
DX_CLASSES: tuple[str, ...] = tuple(DX_CODES)


def dx_index(dx: str | None) -> int:
    if dx not in DX_CLASSES:
        raise ValueError(f"diagnosis {dx!r} is not one of {DX_CLASSES}: cannot train target 'dx' on it")
    return DX_CLASSES.index(dx)


def record_targets(records: list[dict], target: str) -> np.ndarray:
    """Training labels of ``records``: float32 0/1 (melanoma) or int32 class indices (dx)."""
    if target == "melanoma":
        return np.array([r["label"] for r in records], np.float32)
    if target == "dx":
        return np.array([dx_index(r.get("dx")) for r in records], np.int32)
    raise ValueError(f"unknown training target {target!r}; expected one of {TARGETS}")


@dataclass
class SplitArrays:
    """images: uint8 (N,224,224,3); labels: int32 (N,); records: N dicts."""

    images: np.ndarray
    labels: np.ndarray
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)

    def targets(self, target: str) -> np.ndarray:
        return record_targets(self.records, target)

    def ids(self) -> list[str]:
        return [r["image_id"] for r in self.records]


def load_arrays(
    storage: Storage, manifest: dict, split: str, *, augmented: bool = False, limit: int | None = None
) -> SplitArrays:
    """One split in memory (about 150 KB an image); ``augmented`` adds the augmented copies.

    ``limit`` keeps the first ``limit`` lesions' images in manifest order (demo/test runs).
    """
    kinds = ("original", "augmented") if augmented else ("original",)
    shard = load_split(storage, manifest, [split], kinds)
    keep = np.arange(len(shard))
    if limit is not None and len(shard) > limit:
        keep = _first_lesions(shard.records, limit)
    records = [shard.records[i] for i in keep]
    return SplitArrays(shard.images[keep], np.array([r["label"] for r in records], np.int32), records)


def _first_lesions(records: list[dict], limit: int) -> np.ndarray:
    """Indices of whole lesions (originals and their augmented copies together) up to ``limit`` images."""
    chosen: list[int] = []
    by_lesion: dict[str, list[int]] = {}
    # Lesions in the order of their first ORIGINAL image (augmented shards sort first, and
    # would otherwise fill the subset with melanoma lesions only).
    for record in records:
        if record.get("kind", "original") == "original":
            by_lesion.setdefault(record["lesion_id"], [])
    for index, record in enumerate(records):
        by_lesion.setdefault(record["lesion_id"], []).append(index)
    for indices in by_lesion.values():
        if len(chosen) + len(indices) > limit:
            break
        chosen.extend(indices)
    return np.array(sorted(chosen), dtype=np.int64)


def class_weights(labels: np.ndarray, mode: str | dict = "balanced") -> dict[int, float]:
    """Loss weights per class: ``"balanced"`` = n / (2 * n_class) from the training labels,
    ``"reference"`` = the reference report's 0.5 / 28.5 (``"seed"``, its old name, still
    read from configs written before the rename), or an explicit ``{0: w0, 1: w1}``."""
    if isinstance(mode, dict):
        return {int(k): float(v) for k, v in mode.items()}
    if mode in ("reference", "seed"):
        return {0: 0.5, 1: 28.5}
    if mode == "balanced":
        counts = np.bincount(labels.astype(np.int64), minlength=2)
        if counts.min() == 0:
            raise ValueError(
                f"training labels hold one class only ({counts.tolist()}): cannot weight classes"
            )
        return {k: float(len(labels) / (2 * counts[k])) for k in (0, 1)}
    if mode == "none":
        return {0: 1.0, 1: 1.0}
    raise ValueError(f"unknown class weight mode {mode!r} (balanced, reference, none or a dict)")


def target_class_weights(binary: dict[int, float], target: str) -> dict[int, float]:
    """Loss weight per training class: the binary weights as they are (melanoma), or for
    "dx" the melanoma weight on "mel" and the non-melanoma weight on every other diagnosis,
    so the loss balances melanoma against the rest exactly as the binary model's does."""
    if target == "melanoma":
        return dict(binary)
    if target == "dx":
        return {i: binary[1 if name == "mel" else 0] for i, name in enumerate(DX_CLASSES)}
    raise ValueError(f"unknown training target {target!r}; expected one of {TARGETS}")


def shard_dataset(
    storage: Storage,
    manifest: dict,
    splits: list[str],
    *,
    augmented: bool,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    target: str = "melanoma",
    flip: int = 0,
):
    """A tf.data pipeline over shards: parallel shard reads, shuffle, batch, prefetch.

    Yields (images uint8 (B,224,224,3), labels (B,)): float32 0/1 for ``target="melanoma"``,
    int32 indices into :data:`DX_CLASSES` for ``"dx"``. Shards are read (and checked against
    the manifest) lazily, several at once, so the whole training set never needs to sit in
    memory at once. ``flip``: 0 as stored, 1 left-right, 2 up-down, 3 both (every image).
    """
    # Lazy: only streamed training needs TensorFlow; the config (TARGETS) and array loading do not.
    import tensorflow as tf

    entries = select_shards(manifest, splits, ("original", "augmented") if augmented else ("original",))
    if not entries:
        raise ValueError(f"no shards for splits {splits} in manifest version {manifest.get('version')}")
    by_key = {e["key"]: e for e in entries}

    def read(key):
        shard = read_verified_shard(storage, by_key[key.decode() if isinstance(key, bytes) else key])
        for image, label in zip(shard.images, record_targets(shard.records, target)):
            yield image, label

    label_dtype = tf.float32 if target == "melanoma" else tf.int32
    record_targets([], target)  # rejects an unknown target now, not inside the pipeline
    signature = (tf.TensorSpec((IMAGE_SIZE, IMAGE_SIZE, 3), tf.uint8), tf.TensorSpec((), label_dtype))
    keys = tf.data.Dataset.from_tensor_slices(sorted(by_key))
    if shuffle:
        keys = keys.shuffle(len(by_key), seed=seed, reshuffle_each_iteration=True)
    dataset = keys.interleave(
        lambda key: tf.data.Dataset.from_generator(read, args=(key,), output_signature=signature),
        cycle_length=min(4, len(by_key)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle,
    )
    if shuffle:
        dataset = dataset.shuffle(2048, seed=seed, reshuffle_each_iteration=True)
    axes = {0: [], 1: [1], 2: [0], 3: [0, 1]}[flip]
    if axes:
        dataset = dataset.map(
            lambda image, label: (tf.reverse(image, axes), label), num_parallel_calls=tf.data.AUTOTUNE
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
