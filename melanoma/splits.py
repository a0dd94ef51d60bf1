"""Train/validation/test assignment by lesion, stable across data drops.

Several HAM10000 images show the same lesion, so a split by image would leak a lesion into
both train and test. Each lesion is assigned by a hash of its id, which makes the
assignment a pure function of the lesion: a lesion keeps its split when later drops arrive,
and backfills never move an image between splits.

Stratification: a hash is independent of the label, so each class is split 70/15/15 in
expectation on its own (about +-1.4 points of test share for HAM10000's 614 melanoma
lesions). Exact per-class quotas would need ranks over all lesions, which change when a drop
arrives and would move lesions between splits; stability wins. The label is deliberately
not part of the hash: a lesion must never be split even if its images disagree. The
manifest records the realised counts per split and class.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
SPLIT_SALT = "melanoma-split-v1"


def unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from ``text`` (first 8 bytes of its sha256)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(lesion_id: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split of a lesion: ``"train"``, ``"val"`` or ``"test"``."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    point = unit_hash(f"{SPLIT_SALT}:{lesion_id}")
    if point < fractions[0]:
        return "train"
    if point < fractions[0] + fractions[1]:
        return "val"
    return "test"


def split_description(fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict:
    """What the manifest records about how splits were made."""
    return {
        "method": "sha256(salt:lesion_id) cut at cumulative fractions",
        "salt": SPLIT_SALT,
        "fractions": dict(zip(SPLITS, fractions)),
        "grouped_by": "lesion_id",
    }
