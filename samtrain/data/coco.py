"""COCO instance-segmentation dataset (polygons, compressed and uncompressed RLE)."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from samtrain.data.base import SamDataset, decoded
from samtrain.data.errors import SampleError
from samtrain.data.image_io import read_rgb_image
from samtrain.data.rle import RleMasks, segmentation_run_lengths
from samtrain.data.split import select_split

__all__ = ["CocoInstanceDataset", "decode_segmentations", "read_rgb_image"]

log = logging.getLogger(__name__)


def decode_segmentations(segmentations: list, height: int, width: int) -> np.ndarray:
    """Decode COCO segmentations to masks: bool (K, height, width), like ``COCO.annToMask``."""
    return RleMasks.from_segmentations(segmentations, height, width).decode()


def _read_coco_json(path: Path) -> dict:
    """Read and sanity-check a COCO annotation file; errors name the file and the problem."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        with path.open("rb") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(coco, dict):
        raise ValueError(f"COCO annotation file {path}: expected a JSON object at the top level")
    for key in ("images", "annotations"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"COCO annotation file {path}: missing or malformed {key!r} list")
    return coco


def _check_category_ids(category_ids: Iterable[int] | None, coco: dict, path: Path) -> frozenset[int] | None:
    """The requested category ids as a set; unknown ids are an error when the file lists categories."""
    if category_ids is None:
        return None
    wanted = frozenset(int(c) for c in category_ids)
    known = _known_categories(coco)
    unknown = sorted(wanted - known)
    if known and unknown:
        raise ValueError(
            f"COCO annotation file {path}: unknown category ids {unknown}; it has {sorted(known)}"
        )
    return wanted


def _known_categories(coco: dict) -> frozenset:
    categories = coco.get("categories")
    if not isinstance(categories, list):
        return frozenset()
    return frozenset(c["id"] for c in categories if isinstance(c, dict) and "id" in c)


def _image_record(image: Any, i: int) -> tuple[Any, dict | None, str | None]:
    """(image id, record or None, problem or None) of entry ``images[i]``."""
    if not isinstance(image, dict) or "id" not in image:
        return None, None, f"images[{i}] is not an object with an 'id'"
    record = {
        "id": image["id"],
        "file_name": str(image.get("file_name", "")),
        "annotation_ids": [],
        "segmentations": [],
        "problems": [],
    }
    try:
        record["height"], record["width"] = int(image["height"]), int(image["width"])
        if not (record["file_name"] and record["height"] > 0 and record["width"] > 0):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        record["height"] = record["width"] = 0
        record["problems"].append(f"images[{i}] (id {image['id']}) lacks a valid file_name, height or width")
    return image["id"], record, None


def _annotation_problem(ann: dict, known_categories: frozenset) -> str | None:
    """Why annotation ``ann`` (of a known image) cannot be used, or None."""
    if "segmentation" not in ann:
        return f"annotation {ann.get('id')} has no segmentation"
    if known_categories and ann.get("category_id") not in known_categories:
        return f"annotation {ann.get('id')} has category {ann.get('category_id')!r}, not among the file's categories"
    return None


def _build_records(
    coco: dict, path: Path, category_ids: frozenset[int] | None, include_crowd: bool
) -> list[dict]:
    """One record per image with the segmentations it keeps, in the file's image order.

    Malformed entries do not stop the dataset: a record collects its ``problems`` (its sample is
    then skipped and counted when loaded); entries that belong to no image are logged here.
    """
    records: dict[Any, dict] = {}
    for i, image in enumerate(coco["images"]):
        image_id, record, problem = _image_record(image, i)
        if problem is not None or image_id in records:
            log.warning("%s: ignoring %s", path, problem or f"images[{i}]: duplicate image id {image_id}")
            continue
        records[image_id] = record
    known_categories = _known_categories(coco)
    for j, ann in enumerate(coco["annotations"]):
        record = records.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if record is None:
            log.warning("%s: ignoring annotations[%d]: it names no known image", path, j)
            continue
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        if category_ids is not None and ann.get("category_id") not in category_ids:
            continue
        problem = _annotation_problem(ann, known_categories)
        if problem is not None:
            record["problems"].append(problem)
            continue
        record["annotation_ids"].append(ann.get("id"))
        record["segmentations"].append(ann["segmentation"])
    return list(records.values())


class CocoInstanceDataset(SamDataset):
    """Images and instance masks from a COCO annotation file.

    Each item is ``transform(sample)``, where the raw sample is ``{"image": uint8 (H, W, 3) RGB,
    "masks": bool (K, H, W), "image_id": int}`` (returned as it is when ``transform`` is None).
    Masks are decoded per item, only for the requested image (and, with ``SamTransform``, only
    onto the output grid). Images without masks are kept (K = 0).

    A sample whose annotations are unusable (invalid polygon or RLE, a mask of zero area, a
    category not in the file's list, an annotation without segmentation) raises SampleError when
    loaded, naming the file, the annotation and the reason; the loader skips and counts it.

    Args:
        annotation_file: COCO instance JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder that ``file_name`` of each image is relative to.
        transform: callable on the raw sample, e.g. ``SamTransform``.
        category_ids: keep only annotations of these categories (None: all).
        include_crowd: keep ``iscrowd`` annotations (skipped by default).
        min_mask_area: drop masks with fewer pixels than this (at the original resolution).
        split: None (every image), or "train" / "val": a deterministic split of the images by
            their ``file_name`` (see :mod:`samtrain.data.split`).
        val_fraction, split_seed: the split's share of val images and its seed.
    """

    SAMPLE_ARGS = (
        "annotation_file",
        "image_dir",
        "category_ids",
        "include_crowd",
        "min_mask_area",
        "split",
        "val_fraction",
        "split_seed",
    )
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        annotation_file: str | Path,
        image_dir: str | Path,
        transform: Callable[[dict], dict] | None = None,
        category_ids: Iterable[int] | None = None,
        include_crowd: bool = False,
        min_mask_area: int = 1,
        split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.min_mask_area = int(min_mask_area)
        self.include_crowd = bool(include_crowd)
        self.split, self.val_fraction, self.split_seed = split, float(val_fraction), int(split_seed)
        coco = _read_coco_json(self.annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} (for {self.annotation_file}) does not exist"
            )
        self.category_ids = _check_category_ids(category_ids, coco, self.annotation_file)
        records = _build_records(coco, self.annotation_file, self.category_ids, self.include_crowd)
        records = select_split(records, lambda r: r["file_name"], split, val_fraction, split_seed)
        self.image_ids = np.array([_int_id(r["id"], self.annotation_file) for r in records], dtype=np.int64)
        # Records live in one numpy byte buffer rather than many Python objects, so forked
        # DataLoader workers do not copy them page by page through reference counting.
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.image_ids)

    def record(self, index: int) -> dict:
        """The image entry and kept segmentations of item ``index`` (no decoding)."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].tobytes())

    def sample_name(self, index: int) -> str:
        return str(self.image_dir / self.record(index)["file_name"])

    def source_files(self) -> list[Path]:
        """The annotation file and every image of the dataset."""
        return [self.annotation_file] + [f for i in range(len(self)) for f in self.sample_files(i)]

    def sample_files(self, index: int) -> list[Path]:
        return [self.image_dir / self.record(index)["file_name"]]

    def load_encoded_sample(self, index: int) -> dict:
        """The untransformed sample with masks as RleMasks (K, H, W)."""
        record = self.record(index)
        path = self.image_dir / record["file_name"]
        if record["problems"]:
            raise SampleError(self.annotation_file, f"{path}: {'; '.join(record['problems'])}")
        image = read_rgb_image(path)
        height, width = record["height"], record["width"]
        if image.shape[:2] != (height, width):
            raise SampleError(
                path,
                f"image is {image.shape[1]}x{image.shape[0]} but {self.annotation_file} says {width}x{height}",
            )
        masks = self._masks(record, path)
        return {"image": image, "masks": masks, "image_id": int(self.image_ids[index])}

    def _masks(self, record: dict, path: Path) -> RleMasks:
        """The record's segmentations as RleMasks; SampleError naming the bad annotation."""
        height, width = record["height"], record["width"]
        runs = []
        for ann_id, segmentation in zip(record["annotation_ids"], record["segmentations"], strict=True):
            try:
                runs.append(segmentation_run_lengths(segmentation, height, width))
            except (ValueError, TypeError) as err:  # malformed polygon or RLE
                raise SampleError(self.annotation_file, f"annotation {ann_id} of {path}: {err}") from err
        masks = RleMasks(runs, height, width)
        areas = masks.areas()
        empty = np.flatnonzero(areas == 0)
        if empty.size:
            ids = [record["annotation_ids"][k] for k in empty]
            raise SampleError(self.annotation_file, f"annotations {ids} of {path} have zero area")
        return masks.subset(np.flatnonzero(areas >= self.min_mask_area))

    def load_sample(self, index: int) -> dict:
        """The untransformed sample: image uint8 (H, W, 3), masks bool (K, H, W), image_id int."""
        return decoded(self.load_encoded_sample(index))


def _int_id(image_id: Any, path: Path) -> int:
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise ValueError(f"COCO annotation file {path}: image id {image_id!r} is not an integer")
    return image_id
