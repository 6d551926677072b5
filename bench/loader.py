"""Loader benchmark: samples per second on one worker core (`python -m bench.loader`).

Writes synthetic SA-1B samples (a 1500x2250 JPEG of smooth texture and 100 masks of varied size
as COCO RLE, written by pycocotools) to a temporary folder and shard, then times one process on
one thread (what one DataLoader worker does): reading, decoding and transforming to 1024 px
with SamTransform (train: SAM's large-scale jitter 0.1-2.0, flip, max 64 masks; eval: resize
only). Prints a Markdown table.

``--formats``: the same scene (a 640x480 JPEG, 20 polygon objects) written as COCO, YOLO,
labelme, CVAT and VOC, a CT-like NIfTI volume (512x512x32, 20 objects per slice), and a
4000x3000 image with 500 small objects read in 1024 px crops; each format timed in a fresh
process (train transform at 1024 px), with that process's peak RSS (see bench/formats.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from samtrain.data import Sa1bDataset, Sa1bTarStream, SamTransform
from samtrain.data.sa1b import build_sample

HEIGHT, WIDTH, MASKS = 1500, 2250, 100


def synthetic_image(rng: np.random.Generator) -> np.ndarray:
    """A photo-like uint8 (H, W, 3): smooth colour fields plus fine noise (JPEG ~0.5-1 MB)."""
    coarse = rng.integers(0, 256, size=(HEIGHT // 50, WIDTH // 50, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 12, size=(HEIGHT, WIDTH, 1))
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def synthetic_masks(rng: np.random.Generator) -> list[dict]:
    """MASKS compressed RLEs of ellipses and polygons, areas log-uniform from 0.01% to 40% of the image."""
    out = []
    for _ in range(MASKS):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        area = HEIGHT * WIDTH * 10 ** rng.uniform(-4, np.log10(0.4))
        radius = np.sqrt(area / np.pi)
        centre = (int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT)))
        if rng.random() < 0.5:
            aspect = rng.uniform(0.4, 1.0)
            axes = (max(1, int(radius / np.sqrt(aspect))), max(1, int(radius * np.sqrt(aspect))))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
            radii = radius * rng.uniform(0.5, 1.4, 12)
            points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
            cv2.fillPoly(mask, [points.astype(np.int32)], 1)
        if not mask.any():
            mask[centre[1], centre[0]] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        out.append(
            {
                "segmentation": {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()},
                "area": int(mask.sum()),
            }
        )
    return out


def write_samples(root: Path, n: int) -> None:
    """n samples as root/folder/sa_<i>.{jpg,json} and root/shard/sa_000000.tar."""
    import tarfile

    folder = root / "folder"
    folder.mkdir(parents=True)
    (root / "shard").mkdir()
    with tarfile.open(root / "shard" / "sa_000000.tar", "w") as tar:
        for i in range(n):
            rng = np.random.default_rng(i)
            image = synthetic_image(rng)
            cv2.imwrite(str(folder / f"sa_{i}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            doc = {"image": {"image_id": i, "height": HEIGHT, "width": WIDTH, "file_name": f"sa_{i}.jpg"}}
            doc["annotations"] = synthetic_masks(rng)
            (folder / f"sa_{i}.json").write_text(json.dumps(doc))
            tar.add(folder / f"sa_{i}.jpg", arcname=f"sa_{i}.jpg")
            tar.add(folder / f"sa_{i}.json", arcname=f"sa_{i}.json")


def rate(fn, n: int, rounds: int) -> float:
    """Best items per second over ``rounds`` runs of ``fn`` (which handles n items)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--formats", action="store_true", help="time every format (bench/formats.py)")
    args = parser.parse_args()
    if args.formats:
        from bench import formats

        formats.main(samples=args.samples, rounds=args.rounds, image_size=args.image_size)
        return
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    n, size = args.samples, args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_samples(root, n)
        jpeg_mb = np.mean([p.stat().st_size for p in (root / "folder").glob("*.jpg")]) / 1e6
        json_mb = np.mean([p.stat().st_size for p in (root / "folder").glob("*.json")]) / 1e6
        train = SamTransform(image_size=size, train=True, max_masks=64)
        evaluate = SamTransform(image_size=size, train=False, max_masks=64)
        folder_train = Sa1bDataset(root=root / "folder", transform=train)
        folder_eval = Sa1bDataset(root=root / "folder", transform=evaluate)
        stream = Sa1bTarStream(shards=root / "shard", transform=train)
        files = [
            ((root / "folder" / f"sa_{i}.jpg").read_bytes(), (root / "folder" / f"sa_{i}.json").read_bytes())
            for i in range(n)
        ]
        rows = [
            (
                "read + decode JPEG + parse JSON/RLE (no transform)",
                rate(lambda: [build_sample(j, s, "x", "y") for j, s in files], n, args.rounds),
            ),
            (
                "folder, train transform (LSJ 0.1-2.0, flip, 64 masks)",
                rate(lambda: [folder_train[(i, i)] for i in range(n)], n, args.rounds),
            ),
            (
                "folder, eval transform (resize, 64 masks)",
                rate(lambda: [folder_eval[i] for i in range(n)], n, args.rounds),
            ),
            ("tar stream, train transform", rate(lambda: list(stream), n, args.rounds)),
        ]
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; torch {torch.__version__}; 1 thread"
    )
    print(
        f"{n} samples {WIDTH}x{HEIGHT}, {MASKS} masks each; JPEG {jpeg_mb:.2f} MB, JSON {json_mb:.2f} MB; output {size} px"
    )
    print("\n| case | images/s per worker core |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
