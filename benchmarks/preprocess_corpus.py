"""The corpus bench_preprocess.py times: built (or reused) by ``make_preprocess_corpus.py``,
its files listed, described for preprocess.json, and read into the page cache before a pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.preprocess_contention import cpu_lock

ROOT = Path(__file__).resolve().parents[1]


def build_corpus(
    src: Path, corpus: Path, drop_id: str, limit: int | None, lock: Path, lock_wait: float
) -> None:
    """Run make_preprocess_corpus.py (it reuses a corpus already built) under the shared CPU lock."""
    builder = [
        sys.executable,
        str(ROOT / "benchmarks" / "make_preprocess_corpus.py"),
        "--src",
        str(src),
        "--out",
        str(corpus),
        "--drop-id",
        drop_id,
    ]
    builder += [] if limit is None else ["--limit", str(limit)]
    with cpu_lock(lock, exclusive=False, wait_s=lock_wait):
        subprocess.run(builder, check=True)


def corpus_files(drop: Path) -> tuple[list[Path], list[Path | None]]:
    images = sorted(drop.glob("HAM10000_images_part_*/*.jpg"), key=lambda p: p.name)
    mask_dir = drop / "HAM10000_segmentations"
    masks = [mask_dir / f"{p.stem}_segmentation.png" for p in images]
    return images, [m if m.exists() else None for m in masks]


def warm_page_cache(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                total += len(chunk)
    return total


def describe_corpus(
    corpus: Path, drop_id: str, images: list[Path], masks: list[Path | None], all_files: list[Path]
) -> dict:
    """The corpus block of preprocess.json."""
    drop = corpus / drop_id
    described = {
        "path": str(drop),
        "images": len(images),
        "masks": sum(m is not None for m in masks),
        "jpeg_bytes": sum(p.stat().st_size for p in images),
        "bytes": sum(p.stat().st_size for p in all_files),
        "size": [600, 450],
        "built_by": "benchmarks/make_preprocess_corpus.py (marker: "
        + str(corpus / f"{drop_id}.corpus.json")
        + ")",
    }
    described["mean_jpeg_bytes"] = round(described["jpeg_bytes"] / max(1, len(images)))
    return described
