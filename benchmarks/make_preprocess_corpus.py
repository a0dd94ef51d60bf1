"""Build the preprocessing benchmark corpus: HAM10000 at its original 600x450 cost.

The shared HAM10000 copy holds 200x150 thumbnails, far cheaper to decode than the 600x450
originals a real drop carries. This script upscales each one to 600x450 (bilinear), adds
mild Gaussian noise (sigma 8 by default: upscaled thumbnails are too smooth to compress like
photographs) and saves it as a quality-95 4:4:4 JPEG, about 250 KB like the originals, so
decoding the corpus costs what decoding the real data set would. The result is a
HAM10000-layout drop::

    <out>/<drop_id>/HAM10000_metadata.csv
    <out>/<drop_id>/HAM10000_images_part_1/ISIC_*.jpg      (first half)
    <out>/<drop_id>/HAM10000_images_part_2/ISIC_*.jpg      (second half)
    <out>/<drop_id>/HAM10000_segmentations/ISIC_*_segmentation.png   (copied, unless --no-masks)
    <out>/<drop_id>.corpus.json                             (marker, beside the drop)

The marker is written last and records the parameters; a rerun with the same parameters
and every file present does nothing. Noise is seeded per image id, so rebuilding gives the
same bytes.

    python benchmarks/make_preprocess_corpus.py --src ../shared/data/ham10000 --out benchmarks/corpus --limit N
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 600, 450
CORPUS_VERSION = 1


@dataclass(frozen=True)
class Params:
    """Everything that changes the corpus bytes (recorded in the marker)."""

    src: str
    drop_id: str
    limit: int | None
    sigma: float
    quality: int
    masks: bool
    version: int = CORPUS_VERSION


@dataclass(frozen=True)
class Job:
    image_id: str
    src_image: Path
    dst_image: Path
    src_mask: Path | None
    dst_mask: Path | None
    sigma: float
    quality: int


def noisy_upscale(bgr: np.ndarray, image_id: str, sigma: float) -> np.ndarray:
    """(h, w, 3) uint8 -> (450, 600, 3) uint8: bilinear upscale plus noise seeded by the id."""
    big = cv2.resize(bgr, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
    seed = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    noise = np.random.default_rng(seed).normal(0.0, sigma, big.shape).astype(np.float32)
    return np.clip(big.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def encode_jpeg(bgr: np.ndarray, quality: int) -> bytes:
    # 4:4:4 keeps full-resolution chroma, like the HAM10000 originals' ~250 KB files.
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        quality,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ]
    ok, encoded = cv2.imencode(".jpg", bgr, params)
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return encoded.tobytes()


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def build_one(job: Job) -> int:
    """Write one corpus image (and its mask); returns the JPEG's size in bytes."""
    bgr = cv2.imread(str(job.src_image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RuntimeError(f"cannot read {job.src_image}")
    data = encode_jpeg(noisy_upscale(bgr, job.image_id, job.sigma), job.quality)
    write_atomic(job.dst_image, data)
    if job.src_mask is not None and job.dst_mask is not None:
        shutil.copyfile(job.src_mask, job.dst_mask)
    return len(data)


def read_rows(metadata: Path, limit: int | None) -> tuple[list[str], list[list[str]]]:
    with open(metadata, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], [r for r in rows[1:] if r]
    if "image_id" not in header:
        raise SystemExit(f"{metadata} has no image_id column")
    return header, body[:limit] if limit else body


def plan(params: Params, src: Path, drop: Path, header: list[str], rows: list[list[str]]) -> list[Job]:
    """One job per row; the first half goes to part_1, the rest to part_2."""
    id_col = header.index("image_id")
    jobs = []
    for index, row in enumerate(rows):
        image_id = row[id_col]
        part = 1 if index < (len(rows) + 1) // 2 else 2
        src_mask = src / "masks" / f"{image_id}_segmentation.png"
        has_mask = params.masks and src_mask.exists()
        jobs.append(
            Job(
                image_id=image_id,
                src_image=src / "images" / f"{image_id}.jpg",
                dst_image=drop / f"HAM10000_images_part_{part}" / f"{image_id}.jpg",
                src_mask=src_mask if has_mask else None,
                dst_mask=drop / "HAM10000_segmentations" / src_mask.name if has_mask else None,
                sigma=params.sigma,
                quality=params.quality,
            )
        )
    return jobs


def already_built(marker: Path, params: Params, jobs: list[Job]) -> bool:
    if not marker.exists():
        return False
    try:
        recorded = json.loads(marker.read_text()).get("params")
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == asdict(params) and all(job.dst_image.exists() for job in jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", type=Path, required=True, help="HAM10000 folder: HAM10000_metadata.csv, images/, masks/"
    )
    parser.add_argument("--out", type=Path, required=True, help="raw root to write the drop into")
    parser.add_argument(
        "--drop-id", default="ham10000-600x450", help="drop folder name (default: %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N metadata rows only (default: all)")
    parser.add_argument(
        "--sigma", type=float, default=8.0, help="Gaussian noise sigma (default: %(default)s)"
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default: %(default)s)")
    parser.add_argument(
        "--no-masks", dest="masks", action="store_false", help="do not copy segmentation masks"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (default: %(default)s)")
    args = parser.parse_args(argv)

    src = args.src.resolve()
    params = Params(
        src=str(src),
        drop_id=args.drop_id,
        limit=args.limit,
        sigma=args.sigma,
        quality=args.quality,
        masks=args.masks,
    )
    drop = args.out / args.drop_id
    marker = args.out / f"{args.drop_id}.corpus.json"
    header, rows = read_rows(src / "HAM10000_metadata.csv", args.limit)
    jobs = plan(params, src, drop, header, rows)
    if already_built(marker, params, jobs):
        print(f"corpus already built with these parameters: {drop} ({len(jobs)} images); nothing to do")
        return 0

    if drop.exists():
        shutil.rmtree(drop)  # parameters changed or a build was interrupted: start clean
    marker.unlink(missing_ok=True)
    for folder in {job.dst_image.parent for job in jobs} | {
        job.dst_mask.parent for job in jobs if job.dst_mask
    }:
        folder.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    # One OpenCV thread per process: the parallelism is the process pool.
    with multiprocessing.get_context("spawn").Pool(
        args.workers, initializer=cv2.setNumThreads, initargs=(1,)
    ) as pool:
        sizes = []
        for size in pool.imap(build_one, jobs, chunksize=16):
            sizes.append(size)
            if len(sizes) % 1000 == 0:
                print(f"  {len(sizes)}/{len(jobs)} images", flush=True)
    with open(drop / "HAM10000_metadata.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])

    elapsed = time.perf_counter() - started
    summary = {
        "params": asdict(params),
        "images": len(sizes),
        "masks": sum(job.dst_mask is not None for job in jobs),
        "mean_bytes": round(float(np.mean(sizes))) if sizes else 0,
        "total_bytes": int(sum(sizes)),
        "size": [WIDTH, HEIGHT],
    }
    write_atomic(marker, (json.dumps(summary, indent=2) + "\n").encode())
    print(
        f"built {drop}: {len(sizes)} images {WIDTH}x{HEIGHT}, {summary['masks']} masks, "
        f"mean {summary['mean_bytes'] / 1024:.0f} KB per JPEG, {summary['total_bytes'] / 2**20:.1f} MiB, {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
