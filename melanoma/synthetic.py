"""A small SYNTHETIC lesion set for the demo on a machine without real data.

These are drawn pictures, not dermoscopy: a skin-toned background with one elliptical
lesion. "Melanoma" lesions are larger, irregular and multi-coloured (the ABCD cues:
asymmetry, border, colour, diameter), "benign" ones small, round and uniform. They exist so
that the whole pipeline can be run and seen working anywhere; no number measured on them
says anything about melanoma. The drop uses the HAM10000 layout, with lesion masks, and its
id says ``synthetic``.

    python -m melanoma.synthetic --out output/demo/raw --images 240
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np

DROP_ID = "synthetic-2026-01-01"
WIDTH, HEIGHT = 200, 150
SITES = ("back", "trunk", "lower extremity", "upper extremity", "face", "abdomen")


def draw_lesion(rng: np.random.Generator, melanoma: bool) -> tuple[np.ndarray, np.ndarray]:
    """One picture and its mask: RGB uint8 (150,200,3), mask uint8 (150,200) in {0,255}."""
    skin = np.array([rng.uniform(190, 235), rng.uniform(140, 185), rng.uniform(120, 165)])
    image = np.clip(skin + rng.normal(0, 6, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    center = (int(rng.uniform(70, 130)), int(rng.uniform(55, 95)))
    radius = rng.uniform(28, 45) if melanoma else rng.uniform(15, 28)
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = rng.uniform(0.55, 1.35, angles.size) if melanoma else rng.uniform(0.92, 1.08, angles.size)
    stretch = rng.uniform(0.6, 1.0)
    points = np.stack(
        [
            center[0] + radius * wobble * np.cos(angles),
            center[1] + stretch * radius * wobble * np.sin(angles),
        ],
        axis=1,
    )
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.fillPoly(mask, [points.astype(np.int32)], 255)
    base = np.array([rng.uniform(60, 110), rng.uniform(35, 70), rng.uniform(25, 55)])
    lesion = np.clip(base + rng.normal(0, 4, (HEIGHT, WIDTH, 3)), 0, 255)
    if melanoma:
        # Blotches of blue-grey and near-black: the colour variegation benign lesions lack.
        for _ in range(int(rng.integers(3, 7))):
            spot = np.zeros((HEIGHT, WIDTH), np.uint8)
            spot_center = (
                int(center[0] + rng.normal(0, radius / 2)),
                int(center[1] + rng.normal(0, radius / 3)),
            )
            cv2.circle(spot, spot_center, int(rng.uniform(4, radius / 2)), 255, -1)
            colour = np.array([40, 40, 70]) if rng.random() < 0.5 else np.array([25, 15, 15])
            lesion[spot > 0] = colour + rng.normal(0, 6, 3)
    inside = mask > 0
    image[inside] = lesion[inside].astype(np.uint8)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    return image, mask


def write_drop(
    out_root: Path,
    n_images: int = 240,
    melanoma_share: float = 0.3,
    seed: int = 0,
    *,
    drop_id: str = DROP_ID,
    id_prefix: str = "SYN",
) -> Path:
    """Write ``<out_root>/<drop_id>/`` (metadata CSV, images, masks); returns the drop folder.

    Image ids are ``<id_prefix>_00000``...; give each drop its own prefix when several drops
    must not share images (the same id in two drops is quarantined as a duplicate).
    """
    drop = Path(out_root) / drop_id
    (drop / "images").mkdir(parents=True, exist_ok=True)
    (drop / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_images):
        image_id = f"{id_prefix}_{index:05d}"
        # About 1.3 images per lesion, as in HAM10000, so the lesion-grouped split matters here too.
        lesion_index = index if rng.random() > 0.25 or index == 0 else index - 1
        lesion_seed = int(hashlib.sha256(f"{seed}:{lesion_index}".encode()).hexdigest()[:8], 16)
        melanoma = np.random.default_rng(lesion_seed).random() < melanoma_share
        # One picture in five shows the other class's look (dysplastic nevi, featureless
        # melanomas), so the demo task is not trivially separable.
        looks_malignant = melanoma != (rng.random() < 0.2)
        image, mask = draw_lesion(rng, looks_malignant)
        cv2.imwrite(
            str(drop / "images" / f"{image_id}.jpg"),
            cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, 92],
        )
        cv2.imwrite(str(drop / "masks" / f"{image_id}_segmentation.png"), mask)
        rows.append(
            {
                "lesion_id": f"{id_prefix}_L{lesion_index:05d}",
                "image_id": image_id,
                "dx": "mel" if melanoma else ("nv" if rng.random() < 0.8 else "bkl"),
                "dx_type": "synthetic",
                "age": float(rng.integers(20, 85) // 5 * 5),
                "sex": "male" if rng.random() < 0.5 else "female",
                "localization": SITES[int(rng.integers(len(SITES)))],
            }
        )
    with open(drop / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return drop


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write a small synthetic lesion drop (HAM10000 layout) for the demo."
    )
    parser.add_argument("--out", required=True, help="raw root; the drop goes to <out>/<drop id>")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--drop-id", default=DROP_ID, help=f"folder name, with the drop's date in it (default {DROP_ID})"
    )
    parser.add_argument(
        "--id-prefix", default="SYN", help="image id prefix; distinct per drop to avoid duplicate ids"
    )
    args = parser.parse_args()
    drop = write_drop(
        Path(args.out), args.images, seed=args.seed, drop_id=args.drop_id, id_prefix=args.id_prefix
    )
    print(f"synthetic drop written: {drop} ({args.images} images; synthetic, not dermoscopy)")


if __name__ == "__main__":
    main()
