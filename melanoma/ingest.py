"""Ingestion logic behind the Spark ``preprocess`` job (importable, Spark-free, testable).

Flow for one run: scan each new drop (metadata only) -> cut its usable inputs into chunks of
``shard_size`` images, sorted by image id -> each chunk, on an executor, reads, validates,
decodes and resizes its images and writes one shard per split -> the driver gathers the small
chunk results, writes the quarantine file and per-drop index, and commits the manifest last.

Chunks depend only on the drop's content, never on the parallelism, so outputs are
byte-identical however many executors run them, and a drop already in the manifest is
skipped: reruns and backfills write nothing new.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from melanoma import drops as drops_mod
from melanoma.imaging import RejectedImage, decode_mask, preprocess_image_bytes
from melanoma.manifest import PROCESSED_PREFIX, latest_manifest
from melanoma.records import IMAGE_SIZE, encode_shard, sha256_hex
from melanoma.splits import DEFAULT_FRACTIONS, SPLITS, assign_split, split_description
from melanoma.storage import Storage, join_key, open_storage

PREPROCESSING_VERSION = "1"
DEFAULT_SHARD_SIZE = 256


@dataclass
class ChunkTask:
    """One unit of executor work: up to ``shard_size`` inputs of one drop."""

    raw_root: str
    processed_root: str
    drop_id: str
    chunk_index: int
    items: list[dict]  # InputItem fields


@dataclass
class ChunkResult:
    drop_id: str
    chunk_index: int
    shards: list[dict] = field(default_factory=list)  # manifest shard entries
    index: list[dict] = field(default_factory=list)  # {image_id, lesion_id, split, label}
    quarantined: list[dict] = field(default_factory=list)  # QuarantineEntry dicts
    conversions: dict[str, int] = field(default_factory=dict)


def shard_key(drop_id: str, split: str, chunk_index: int, kind: str = "original") -> str:
    suffix = "" if kind == "original" else f"-{kind}"
    return f"{PROCESSED_PREFIX}/shards/{drop_id}/{split}-{chunk_index:05d}{suffix}.zip"


def quarantine_key(drop_id: str) -> str:
    return f"{PROCESSED_PREFIX}/quarantine-{drop_id}.jsonl"


def index_key(drop_id: str) -> str:
    return f"{PROCESSED_PREFIX}/index/{drop_id}.json"


def label_counts(records: list[dict]) -> dict[str, int]:
    labels = [int(r["label"]) for r in records]
    return {"0": labels.count(0), "1": labels.count(1)}


def record_for(item: dict, split: str, conversions: list[str], has_mask: bool) -> dict:
    return {
        "image_id": item["image_id"],
        "lesion_id": item["lesion_id"],
        "label": int(item["label"]),
        "dx": item["dx"],
        "split": split,
        "source_drop": item["source_drop"],
        "kind": "original",
        "augment_of": None,
        "age": item.get("age"),
        "sex": item.get("sex"),
        "localization": item.get("localization"),
        "has_mask": has_mask,
        "conversions": conversions,
    }


def _quarantine(drop_id: str, item_id: str, reason: str, detail: str) -> dict:
    return {"drop_id": drop_id, "item": item_id, "reason": reason, "detail": detail}


def process_chunk(task: ChunkTask) -> ChunkResult:
    """Executor side: read, validate, decode, resize and write the shards of one chunk."""
    raw = open_storage(task.raw_root)
    out = open_storage(task.processed_root)
    result = ChunkResult(task.drop_id, task.chunk_index)
    by_split: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    for item in task.items:
        try:
            data = raw.read_bytes(item["image_key"])
            image, notes = preprocess_image_bytes(data, IMAGE_SIZE)
        except RejectedImage as rejected:
            result.quarantined.append(_quarantine(task.drop_id, item["image_id"], rejected.reason, str(rejected)))
            continue
        except FileNotFoundError as missing:
            result.quarantined.append(_quarantine(task.drop_id, item["image_id"], "missing-image", str(missing)))
            continue
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        has_mask = False
        if item.get("mask_key"):
            try:
                mask = decode_mask(raw.read_bytes(item["mask_key"]), IMAGE_SIZE)
                has_mask = True
            except (RejectedImage, FileNotFoundError) as bad_mask:
                # A bad mask costs the image its lesion-focus score, not its place in training.
                notes = [*notes, f"mask-unusable: {getattr(bad_mask, 'reason', 'missing')}"]
        split = assign_split(item["lesion_id"])
        images, masks, records = by_split[split]
        images.append(image)
        masks.append(mask)
        records.append(record_for(item, split, notes, has_mask))
        for note in notes:
            result.conversions[note] = result.conversions.get(note, 0) + 1
    for split, (images, masks, records) in by_split.items():
        if not records:
            continue
        data = encode_shard(np.stack(images), np.stack(masks), records)
        key = shard_key(task.drop_id, split, task.chunk_index)
        out.write_bytes(key, data)
        result.shards.append(
            {
                "key": key,
                "drop": task.drop_id,
                "split": split,
                "kind": "original",
                "count": len(records),
                "sha256": sha256_hex(data),
                "labels": label_counts(records),
            }
        )
        result.index.extend(
            {"image_id": r["image_id"], "lesion_id": r["lesion_id"], "split": split, "label": r["label"]} for r in records
        )
    return result


@dataclass
class DropPlan:
    """Driver side: what one drop contributes before any image is decoded."""

    drop_id: str
    layout: str
    n_inputs: int
    tasks: list[ChunkTask]
    quarantined: list[dict]


def known_image_ids(out: Storage, manifest: dict | None) -> dict[str, str]:
    """image_id -> drop id, over every drop already processed (read from per-drop indexes)."""
    known: dict[str, str] = {}
    for drop_id in (manifest or {}).get("drops", []):
        for entry in json.loads(out.read_bytes(index_key(drop_id))):
            known[entry["image_id"]] = drop_id
    return known


def plan_drop(raw_root: str, processed_root: str, drop_id: str, known: dict[str, str], *, layout: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE) -> DropPlan:
    """Scan a drop and cut it into chunk tasks; ``known`` gains this drop's image ids."""
    scan = drops_mod.scan_drop(open_storage(raw_root), drop_id, layout)
    quarantined = [q if isinstance(q, dict) else q.to_json() for q in scan.quarantined]
    usable = []
    for item in scan.inputs:
        if item.image_id in known:
            quarantined.append(
                _quarantine(drop_id, item.image_id, "duplicate-image-id", f"image id already ingested from drop {known[item.image_id]!r}")
            )
            continue
        known[item.image_id] = drop_id
        usable.append(asdict(item))
    usable.sort(key=lambda item: item["image_id"])
    tasks = [
        ChunkTask(raw_root, processed_root, drop_id, index, usable[start : start + shard_size])
        for index, start in enumerate(range(0, len(usable), shard_size))
    ]
    return DropPlan(drop_id, scan.layout, scan.n_inputs, tasks, quarantined)


def pending_drops(raw: Storage, manifest: dict | None, requested: list[str] | None) -> list[str]:
    """Drops to process now: the requested ones (default: every drop under the raw root), minus those done."""
    done = set((manifest or {}).get("drops", []))
    available = drops_mod.list_drops(raw)
    wanted = requested if requested else available
    missing = [d for d in wanted if d not in available]
    if missing:
        raise FileNotFoundError(f"drop(s) {missing} not found under {raw.root_uri} (found: {available})")
    return sorted(d for d in wanted if d not in done)


def count_by_split(shards: list[dict], kind: str) -> dict[str, dict[str, int]]:
    counts = {s: {"0": 0, "1": 0} for s in SPLITS}
    for shard in shards:
        if shard["kind"] == kind:
            for label, n in shard["labels"].items():
                counts[shard["split"]][label] += n
    return counts


def finish_drops(out: Storage, previous: dict | None, plans: list[DropPlan], results: list[ChunkResult], *, logical_date: str | None) -> dict:
    """Driver side: write quarantine files and indexes, then return the next manifest (not yet committed)."""
    shards = list((previous or {}).get("shards", []))
    accounting = dict((previous or {}).get("accounting", {}))
    by_drop: dict[str, list[ChunkResult]] = {}
    for result in results:
        by_drop.setdefault(result.drop_id, []).append(result)
    for plan in plans:
        chunk_results = sorted(by_drop.get(plan.drop_id, []), key=lambda r: r.chunk_index)
        quarantined = plan.quarantined + [q for r in chunk_results for q in r.quarantined]
        quarantined.sort(key=lambda q: (q["item"], q["reason"]))
        index = sorted((e for r in chunk_results for e in r.index), key=lambda e: e["image_id"])
        written = len(index)
        if plan.n_inputs != written + len(quarantined):
            raise RuntimeError(
                f"accounting broken for drop {plan.drop_id}: {plan.n_inputs} inputs != {written} written + {len(quarantined)} quarantined"
            )
        out.write_bytes(quarantine_key(plan.drop_id), "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantined).encode())
        out.write_bytes(index_key(plan.drop_id), json.dumps(index, sort_keys=True).encode())
        conversions: dict[str, int] = {}
        for r in chunk_results:
            for note, n in r.conversions.items():
                conversions[note] = conversions.get(note, 0) + n
        reasons: dict[str, int] = {}
        for q in quarantined:
            reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        accounting[plan.drop_id] = {
            "layout": plan.layout,
            "inputs": plan.n_inputs,
            "written": written,
            "quarantined": len(quarantined),
            "quarantine_key": quarantine_key(plan.drop_id),
            "quarantine_reasons": dict(sorted(reasons.items())),
            "conversions": dict(sorted(conversions.items())),
        }
        shards.extend(s for r in chunk_results for s in r.shards)
    shards.sort(key=lambda s: s["key"])
    return {
        "logical_date": logical_date,
        "drops": sorted(accounting),
        "preprocessing": {
            "version": PREPROCESSING_VERSION,
            "size": IMAGE_SIZE,
            "interpolation": "bilinear (cv2.INTER_LINEAR), whole image squashed to a square",
            "decode": "OpenCV; JPEG decoded at reduced DCT scale when >= 2x the target size",
            "function": "melanoma.imaging.preprocess_image_bytes",
        },
        "split": split_description(DEFAULT_FRACTIONS),
        "shards": shards,
        "counts": count_by_split(shards, "original"),
        "augmented_counts": count_by_split(shards, "augmented"),
        "accounting": dict(sorted(accounting.items())),
        "augmentation": (previous or {}).get("augmentation"),
    }


def describe(manifest: dict) -> str:
    """One line for logs: drops, images per split, quarantined."""
    counts = manifest["counts"]
    per_split = ", ".join(f"{s} {c['0'] + c['1']} ({c['1']} mel)" for s, c in counts.items())
    quarantined = sum(a["quarantined"] for a in manifest["accounting"].values())
    return f"drops {manifest['drops']}: {per_split}; quarantined {quarantined}"


# --- augmentation (the Spark ``augment`` job) -------------------------------------------------

COPIES_PER_MELANOMA = 2


@dataclass
class AugmentTask:
    """Augment the melanoma images of one original training shard."""

    processed_root: str
    source: dict  # the manifest entry of the original shard
    copies: int = COPIES_PER_MELANOMA


def augmented_key(source_key: str) -> str:
    return source_key.removesuffix(".zip") + "-augmented.zip"


def augment_tasks(processed_root: str, manifest: dict, copies: int = COPIES_PER_MELANOMA) -> list[AugmentTask]:
    """Training shards with melanoma images whose augmented shard is not in the manifest yet."""
    done = {s.get("augment_of") for s in manifest["shards"] if s["kind"] == "augmented"}
    return [
        AugmentTask(processed_root, s, copies)
        for s in manifest["shards"]
        if s["kind"] == "original" and s["split"] == "train" and s["labels"]["1"] > 0 and s["key"] not in done
    ]


def augment_shard(task: AugmentTask) -> dict:
    """Executor side: write ``copies`` augmented versions of each melanoma image; returns the shard entry."""
    from melanoma.augment import augment_pair, augmented_image_id
    from melanoma.manifest import read_verified_shard

    out = open_storage(task.processed_root)
    shard = read_verified_shard(out, task.source)
    images, masks, records = [], [], []
    for image, mask, record in zip(shard.images, shard.masks, shard.records):
        if record["label"] != 1:
            continue
        for copy_index in range(1, task.copies + 1):
            new_image, new_mask = augment_pair(image, mask, record["image_id"], copy_index)
            images.append(new_image)
            masks.append(new_mask)
            records.append(
                dict(record, image_id=augmented_image_id(record["image_id"], copy_index), kind="augmented", augment_of=record["image_id"])
            )
    data = encode_shard(np.stack(images), np.stack(masks), records)
    key = augmented_key(task.source["key"])
    out.write_bytes(key, data)
    return {
        "key": key,
        "drop": task.source["drop"],
        "split": "train",
        "kind": "augmented",
        "augment_of": task.source["key"],
        "count": len(records),
        "sha256": sha256_hex(data),
        "labels": label_counts(records),
    }


def finish_augment(previous: dict, new_shards: list[dict], *, logical_date: str | None, copies: int) -> dict:
    """The next manifest: the previous one plus the augmented shards."""
    from melanoma.augment import AUGMENT_PARAMS

    shards = sorted([*previous["shards"], *new_shards], key=lambda s: s["key"])
    return dict(
        previous,
        logical_date=logical_date,
        shards=shards,
        augmented_counts=count_by_split(shards, "augmented"),
        augmentation={"copies_per_melanoma": copies, "applies_to": "train split, label 1", "params": AUGMENT_PARAMS},
    )
