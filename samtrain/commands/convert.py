"""``samtrain convert``: any format samtrain reads, written as a COCO instance file.

::

    samtrain convert --from yolo --path data.yaml --to coco --out coco.json     # coco_train.json, coco_val.json
    samtrain convert --from labelme --path annotations/ --to coco --out coco.json --images images/
    samtrain convert --from volume --path Task01/ --to coco --out ct.json --images slices/

Every object becomes one annotation whose ``segmentation`` is the compressed RLE of exactly the
mask samtrain trains on (with ``area``, ``bbox``, ``iscrowd: 0``); classes become ``categories``
(a single ``object`` category for formats without classes). ``file_name`` is the source image
relative to the output file's folder, or, with ``--images DIR``, a PNG written there (needed for
images that are no file of their own: volume slices, labelme's embedded ``imageData``). A source
with several splits (YOLO) gives one file per split, ``<out>_<split>.json``. Samples that cannot
be read are reported with their file and reason and left out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from samtrain.commands.check_data import FORMATS, datasets_from_path
from samtrain.data.check import raw_samples
from samtrain.data.errors import SampleError
from samtrain.data.image_io import IMAGE_EXTENSIONS
from samtrain.data.rle import RleMasks


def annotation(mask: np.ndarray, image_id: int, annotation_id: int, category_id: int) -> dict:
    """One COCO annotation of bool (H, W) ``mask``: compressed RLE, area, bbox."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def categories_of(dataset: Any) -> list[dict]:
    names = getattr(dataset, "categories", None) or ["object"]
    return [{"id": i + 1, "name": str(name)} for i, name in enumerate(names)]


class CocoWriter:
    """Collects images and annotations of one dataset and writes the COCO file."""

    def __init__(self, out: Path, images_dir: Path | None, categories: list[dict]) -> None:
        self.out, self.images_dir = out, images_dir
        self.doc: dict[str, list] = {"images": [], "annotations": [], "categories": categories}

    def file_name(self, name: str, sample: dict) -> str:
        """Where the COCO file finds the image (writing it as PNG under ``images_dir`` when given)."""
        if self.images_dir is not None:
            target = self.images_dir / f"{sample['image_id']}.png"
            cv2.imwrite(str(target), np.ascontiguousarray(sample["image"][..., ::-1]))
            return os.path.relpath(target, self.out.parent)
        source = Path(name)
        if not (source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS):
            raise SampleError(
                name,
                "its image is no file of its own (a volume slice, embedded imageData): pass --images DIR",
            )
        return os.path.relpath(source.resolve(), self.out.parent.resolve())

    def add(self, name: str, sample: dict) -> None:
        masks = sample["masks"]
        masks = masks.decode() if isinstance(masks, RleMasks) else np.asarray(masks, dtype=bool)
        height, width = sample["image"].shape[:2]
        image_id = int(sample["image_id"])
        file_name = self.file_name(name, sample)
        self.doc["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        labels = sample.get("labels")
        for k, mask in enumerate(masks):
            category = 1 if labels is None or labels[k] < 0 else int(labels[k]) + 1
            self.doc["annotations"].append(
                annotation(mask, image_id, len(self.doc["annotations"]) + 1, category)
            )

    def write(self) -> None:
        self.out.write_text(json.dumps(self.doc))


def convert_dataset(dataset: Any, name: str, out: Path, images_dir: Path | None, progress: bool) -> list:
    """Write ``dataset`` as COCO to ``out``; returns the (file, reason) of the samples left out."""
    writer = CocoWriter(out, images_dir, categories_of(dataset))
    items = raw_samples(dataset)
    if progress:
        from rich.console import Console
        from rich.progress import track

        total = len(dataset) if hasattr(dataset, "__len__") else None
        items = track(items, total=total, description=f"converting {name}", console=Console(stderr=True))
    failed = []
    for item_name, result in items:
        try:
            if isinstance(result, SampleError):
                raise result
            writer.add(item_name, result)
        except SampleError as err:
            failed.append((err.path, err.reason))
    writer.write()
    return failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtrain convert",
        description="Write a dataset as a COCO instance file (RLE masks exactly as samtrain reads them).",
    )
    parser.add_argument("--from", dest="format", required=True, choices=FORMATS, help="the format of --path")
    parser.add_argument("--path", required=True, help="the dataset (as for `samtrain check-data --path`)")
    parser.add_argument("--to", choices=("coco",), default="coco", help="the output format")
    parser.add_argument(
        "--out", required=True, help="the COCO JSON to write (<out>_<split>.json for several splits)"
    )
    parser.add_argument(
        "--images", help="write every image as PNG into this folder (volumes, embedded images)"
    )
    parser.add_argument("--image-dir", help="the source's images folder, as for check-data")
    parser.add_argument("--mask-dir", help="the source's masks folder, as for check-data")
    parser.add_argument(
        "--layout", choices=("folder", "suffix"), default="folder", help="binary_masks layout"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the converter; returns the exit status (0 done, 1 samples left out, 2 cannot open)."""
    args = build_parser().parse_args(list(argv))
    try:
        datasets = datasets_from_path(args)
    except Exception as err:  # a missing folder, a malformed file: nothing to convert
        print(f"samtrain convert: cannot open the dataset: {err}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images_dir = None if args.images is None else Path(args.images)
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, dataset in datasets.items():
        target = out if len(datasets) == 1 else out.with_name(f"{out.stem}_{name}{out.suffix}")
        failed += convert_dataset(dataset, name, target, images_dir, progress=not args.no_progress)
        print(f"wrote {target}", flush=True)
    for path, reason in failed:
        print(f"ERROR {path}: {reason}", flush=True)
    if failed:
        print(f"{len(failed)} sample(s) left out", flush=True)
    return 1 if failed else 0
