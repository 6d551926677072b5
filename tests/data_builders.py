"""Tiny datasets in every supported layout, written inside the tests (pycocotools' own encoder).

Each builder returns the ground truth it wrote, so tests compare loaded masks with it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from tests.data import format_fixtures


def random_boxes_masks(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """k non-empty masks bool (k, h, w): an ellipse each, some overlapping."""
    masks = np.zeros((k, h, w), np.uint8)
    for i in range(k):
        centre = (int(rng.integers(4, w - 4)), int(rng.integers(4, h - 4)))
        axes = (int(rng.integers(3, w // 3)), int(rng.integers(3, h // 3)))
        cv2.ellipse(masks[i], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return masks.astype(bool)


def coco_rle(mask: np.ndarray) -> dict:
    """pycocotools' compressed RLE of bool (H, W), counts as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def sa1b_files(index: int, h: int = 48, w: int = 64, k: int = 3, seed: int = 0) -> tuple[bytes, bytes, dict]:
    """(jpg bytes, json bytes, truth) of SA-1B sample sa_<index>; truth: image_id, image, masks."""
    rng = np.random.default_rng([seed, index])
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    masks = random_boxes_masks(rng, h, w, k)
    annotations = [
        {
            "id": 1000 * index + j,
            "segmentation": coco_rle(m),
            "area": int(m.sum()),
            "bbox": [
                float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
            ],
            "predicted_iou": 0.9,
            "stability_score": 0.95,
            "point_coords": [[1.0, 1.0]],
            "crop_box": [0, 0, w, h],
        }
        for j, m in enumerate(masks)
    ]
    doc = {
        "image": {"image_id": index, "width": w, "height": h, "file_name": f"sa_{index}.jpg"},
        "annotations": annotations,
    }
    return jpeg_bytes(image), json.dumps(doc).encode(), {"image_id": index, "image": image, "masks": masks}


def make_sa1b_folder(root: Path, indices: range | list[int], **kwargs) -> dict[int, dict]:
    """sa_<i>.jpg + sa_<i>.json in root/sub; returns {image_id: truth}."""
    folder = root / "sa_000000"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in indices:
        jpg, js, t = sa1b_files(i, **kwargs)
        (folder / f"sa_{i}.jpg").write_bytes(jpg)
        (folder / f"sa_{i}.json").write_bytes(js)
        truth[i] = t
    return truth


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sa1b_tar(
    path: Path, indices: range | list[int], *, json_first: bool = False, **kwargs
) -> dict[int, dict]:
    """An SA-1B shard (plain tar, members adjacent per sample); returns {image_id: truth}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = {}
    with tarfile.open(path, "w") as tar:
        for i in indices:
            jpg, js, t = sa1b_files(i, **kwargs)
            members = [(f"sa_{i}.jpg", jpg), (f"sa_{i}.json", js)]
            for name, data in reversed(members) if json_first else members:
                add_member(tar, name, data)
            truth[i] = t
    return truth


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_instance_folder(
    root: Path, n: int, *, bits: int = 8, h: int = 40, w: int = 56
) -> dict[str, np.ndarray]:
    """images/img<i>.png + masks/img<i>.png instance ids (8 or 16 bit); returns {key: masks (K, H, W)}."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        rng = np.random.default_rng(i)
        ids = np.zeros((h, w), np.uint16 if bits == 16 else np.uint8)
        values = [1000 + 7 * j for j in range(3)] if bits == 16 else [3, 9, 200]
        masks = []
        for j, value in enumerate(values):
            y, x = 2 + 12 * j, 3 + 15 * j
            ids[y : y + 10, x : x + 12] = value
            m = np.zeros((h, w), bool)
            m[y : y + 10, x : x + 12] = True
            masks.append(m)
        cv2.imwrite(str(root / "images" / f"img{i}.png"), _image(rng, h, w))
        cv2.imwrite(str(root / "masks" / f"img{i}.png"), ids)
        truth[f"img{i}"] = np.stack(masks)
    return truth


def make_binary_folder(root: Path, n: int, *, layout: str, h: int = 40, w: int = 56) -> dict[str, np.ndarray]:
    """images/img<i>.png + one 0/255 PNG per object (masks/img<i>/<k>.png or masks/img<i>_<k>.png)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        masks = random_boxes_masks(rng, h, w, 3)
        cv2.imwrite(str(root / "images" / f"img{i}.png"), _image(rng, h, w))
        for k, m in enumerate(masks):
            path = root / "masks" / (f"img{i}/{k}.png" if layout == "folder" else f"img{i}_{k}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(path)
        truth[f"img{i}"] = masks
    return truth


def make_semantic_folder(root: Path, n: int, *, h: int = 40, w: int = 56) -> dict[str, np.ndarray]:
    """images/img<i>.png + masks/img<i>.png class maps: class 1 twice (two blobs), class 2 once,
    an ignore (255) strip. Returns {key: masks (K, H, W)} ordered by class, then component."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        labels = np.zeros((h, w), np.uint8)
        labels[2:12, 2:12] = 1
        labels[20:30, 30:45] = 1
        labels[15:35, 5:20] = 2
        labels[:, w - 2 :] = 255
        masks = [np.zeros((h, w), bool) for _ in range(3)]
        masks[0][2:12, 2:12] = True
        masks[1][20:30, 30:45] = True
        masks[2][15:35, 5:20] = True
        cv2.imwrite(str(root / "images" / f"img{i}.png"), _image(np.random.default_rng(200 + i), h, w))
        cv2.imwrite(str(root / "masks" / f"img{i}.png"), labels)
        truth[f"img{i}"] = np.stack(masks)
    return truth


def data_overrides(option: str, root: Path) -> list[str]:
    """Build a tiny dataset for Hydra data option ``option`` under root; the overrides pointing at it."""
    if option in format_fixtures.FORMATS:
        return format_fixtures.format_overrides(option, root)
    if option == "coco":
        return [
            f"data.{split}_dataset.{key}=${{paths.data_dir}}/sample/{split}/{name}"
            for split in ("train", "val")
            for key, name in (("annotation_file", "annotations.json"), ("image_dir", ""))
        ]
    if option == "sa1b":
        make_sa1b_folder(root, range(8))
        return [f"data.train_dataset.root={root}", "data.train_dataset.val_fraction=0.4"]
    if option == "sa1b_tar":
        make_sa1b_tar(root / "train" / "sa_000000.tar", range(4))
        make_sa1b_tar(root / "val" / "sa_000001.tar", range(4, 6))
        return [f"data.train_dataset.shards={root / 'train'}", f"data.val_dataset.shards={root / 'val'}"]
    builders = {
        "instance_png": lambda: make_instance_folder(root, 6),
        "binary_masks": lambda: make_binary_folder(root, 6, layout="folder"),
        "semantic_masks": lambda: make_semantic_folder(root, 6),
    }
    if option not in builders:
        return []
    builders[option]()
    return [
        f"data.train_dataset.image_dir={root / 'images'}",
        f"data.train_dataset.mask_dir={root / 'masks'}",
        "data.train_dataset.val_fraction=0.4",
    ]
