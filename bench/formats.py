"""Loader speed and peak memory of every format on one worker core (`python -m bench.loader --formats`).

One scene, written in each format's own layout: a 640x480 JPEG with 20 hexagons (COCO polygons,
YOLO, labelme, CVAT, VOC palette PNGs); a 512x512x32 NIfTI volume (int16 CT-like values, 20
disks per slice, gzip); a 4000x3000 JPEG with 500 small squares as COCO polygons, read in
1024 px crops holding at least 5 objects. Each case runs in a fresh process on one thread:
``dataset[(i, seed)]`` with SamTransform(train, 1024 px, 64 masks), best of the rounds, and the
process's peak RSS (VmHWM) with its RSS once the dataset is built.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import proc_status_bytes

H, W, OBJECTS = 480, 640, 20
CASES = ("coco", "yolo", "labelme", "cvat", "voc", "volume", "coco_crops_4000x3000")


def hexagons(rng: np.random.Generator, n: int, height: int, width: int, radius=(8, 40)) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        r = rng.uniform(*radius)
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        angles = np.arange(6) * np.pi / 3 + rng.uniform(0, np.pi)
        out.append(np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1))
    return out


def scene_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(image + rng.normal(0, 8, (height, width, 1)), 0, 255).astype(np.uint8)


def write_scenes(root: Path, n: int) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    scenes = []
    (root / "jpg").mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        image, polygons = scene_image(rng, H, W), hexagons(rng, OBJECTS, H, W)
        cv2.imwrite(str(root / "jpg" / f"im{i}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        scenes.append((f"im{i}", image, polygons))
    return scenes


def write_coco(root: Path, scenes, image_dir: Path, height=H, width=W) -> Path:
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "shape"}]}
    for i, (name, _, polygons) in enumerate(scenes):
        doc["images"].append({"id": i + 1, "file_name": f"{name}.jpg", "height": height, "width": width})
        doc["annotations"] += [
            {"id": len(doc["annotations"]) + k + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [p.reshape(-1).tolist()]}
            for k, p in enumerate(polygons)
        ]  # fmt: skip
    path = root / "coco.json"
    path.write_text(json.dumps(doc))
    return path


def write_yolo(root: Path, scenes) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for name, _, polygons in scenes:
        (root / "images" / "train" / f"{name}.jpg").write_bytes(
            (root.parent / "jpg" / f"{name}.jpg").read_bytes()
        )
        lines = ["0 " + " ".join(f"{v:.6f}" for v in (p / [W, H]).reshape(-1)) for p in polygons]
        (root / "labels" / "train" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [shape]\n")
    return root / "data.yaml"


def write_labelme(root: Path, scenes) -> None:
    root.mkdir()
    for name, _, polygons in scenes:
        shapes = [
            {"label": "shape", "points": p.tolist(), "group_id": None, "shape_type": "polygon"}
            for p in polygons
        ]
        doc = {
            "shapes": shapes,
            "imagePath": f"../jpg/{name}.jpg",
            "imageData": None,
            "imageHeight": H,
            "imageWidth": W,
        }
        (root / f"{name}.json").write_text(json.dumps(doc))


def write_cvat(root: Path, scenes) -> Path:
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations><version>1.1</version>"]
    for i, (name, _, polygons) in enumerate(scenes):
        lines.append(f'<image id="{i}" name="{name}.jpg" width="{W}" height="{H}">')
        for p in polygons:
            points = ";".join(f"{x:.2f},{y:.2f}" for x, y in p)
            lines.append(f'<polygon label="shape" occluded="0" points="{points}" z_order="0"/>')
        lines.append("</image>")
    lines.append("</annotations>")
    root.mkdir()
    (root / "annotations.xml").write_text("\n".join(lines))
    return root / "annotations.xml"


def write_voc(root: Path, scenes) -> None:
    from PIL import Image

    for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        (root / folder).mkdir(parents=True)
    for name, _, polygons in scenes:
        (root / "JPEGImages" / f"{name}.jpg").write_bytes((root.parent / "jpg" / f"{name}.jpg").read_bytes())
        objects = np.zeros((H, W), np.uint8)
        for k, p in enumerate(polygons):
            cv2.fillPoly(objects, [np.rint(p).astype(np.int32)], k + 1)
        for path, values in (("SegmentationObject", objects), ("SegmentationClass", (objects > 0) * 1)):
            image = Image.fromarray(values.astype(np.uint8), mode="P")
            image.putpalette(list(range(256)) * 3)
            image.save(root / path / f"{name}.png")


def write_volume(root: Path, depth: int = 32, size: int = 512) -> None:
    import nibabel

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    image = rng.normal(40, 300, (size, size, depth)).astype(np.int16)
    labels = np.zeros((depth, size, size), np.uint8)
    for k in range(depth):
        for j in range(OBJECTS):
            cv2.circle(labels[k], (int(rng.integers(20, size - 20)), int(rng.integers(20, size - 20))),
                       int(rng.integers(4, 20)), 1 + j % 3, -1)  # fmt: skip
    nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), str(root / "images" / "ct.nii.gz"))
    labels = np.ascontiguousarray(np.moveaxis(labels, 0, 2))
    nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), str(root / "labels" / "ct.nii.gz"))


def write_large(root: Path, n: int) -> Path:
    root.mkdir()
    scenes = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        image = scene_image(rng, 3000, 4000)
        cv2.imwrite(str(root / f"big{i}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        squares = []
        for _ in range(500):
            s, x, y = rng.uniform(8, 30), rng.uniform(0, 3960), rng.uniform(0, 2960)
            squares.append(np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]]))
        scenes.append((f"big{i}", None, squares))
    return write_coco(root, scenes, root, height=3000, width=4000)


def build(case: str, root: Path):
    """The dataset of ``case`` over the files under root, with the train transform."""
    from samtrain import data
    from samtrain.data.crops import ObjectCropDataset

    transform = data.SamTransform(image_size=1024, train=True, max_masks=64)
    if case == "coco":
        return data.CocoInstanceDataset(
            annotation_file=root / "coco.json", image_dir=root / "jpg", transform=transform
        )
    if case == "yolo":
        return data.YoloSegmentationDataset(data_yaml=root / "yolo", split="train", transform=transform)
    if case == "labelme":
        return data.LabelmeDataset(root=root / "labelme", transform=transform)
    if case == "cvat":
        return data.CvatImagesDataset(annotation_file=root / "cvat" / "annotations.xml", image_dir=root / "jpg",
                                      transform=transform)  # fmt: skip
    if case == "voc":
        return data.VocInstanceDataset(root=root / "voc", image_set=None, transform=transform)
    if case == "volume":
        return data.VolumeSliceDataset(image_dir=root / "volume" / "images", label_dir=root / "volume" / "labels",
                                       window="ct_abdomen", transform=transform)  # fmt: skip
    raw = data.CocoInstanceDataset(annotation_file=root / "large" / "coco.json", image_dir=root / "large")
    return ObjectCropDataset(dataset=raw, crop_size=1024, min_objects=5, transform=transform)


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set in MB (``proc_status_bytes``)."""
    value = proc_status_bytes(field)
    return value / 2**20 if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, root: Path, samples: int, rounds: int) -> dict:
    """Time one case in this process (meant to be a fresh one): images/s and RSS in MB."""
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    dataset = build(case, root)
    before = rss_mb("VmRSS")
    n = min(samples, len(dataset))
    best = float("inf")
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(n):
            dataset[(i, 1000 * r + i)]
        best = min(best, time.perf_counter() - start)
    return {
        "case": case,
        "images_per_s": n / best,
        "rss_after_build_mb": before,
        "peak_rss_mb": rss_mb(),
        "n": n,
    }


def main(*, samples: int, rounds: int, image_size: int) -> None:
    if image_size != 1024:
        raise SystemExit("bench.loader --formats measures at 1024 px")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scenes = write_scenes(root, samples)
        write_coco(root, scenes, root / "jpg")
        write_yolo(root / "yolo", scenes)
        write_labelme(root / "labelme", scenes)
        write_cvat(root / "cvat", scenes)
        write_voc(root / "voc", scenes)
        write_volume(root / "volume")
        write_large(root / "large", max(1, samples // 4))
        rows = []
        for case in CASES:
            code = (
                "import json, sys; from pathlib import Path; from bench.formats import run_case; "
                f"print(json.dumps(run_case({case!r}, Path({str(root)!r}), {samples}, {rounds})))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{samples} samples per case (crops: {max(1, samples // 4)} images), best of {rounds}; "
          "train transform at 1024 px, 64 masks; 1 thread, a fresh process per case")  # fmt: skip
    print("\n| format | images/s per worker core | peak RSS (MB) | RSS after building the dataset (MB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['images_per_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['rss_after_build_mb']:.0f} |"
        )
