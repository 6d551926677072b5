"""COCO instance-segmentation dataset (polygons, compressed and uncompressed RLE)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from samtrain.data.errors import SampleError


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB: uint8 (H, W, 3). Grayscale and RGBA are converted to RGB.

    Raises SampleError naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise SampleError(path, "image file does not exist")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SampleError(path, "cannot decode image (corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE.

    Same result as pycocotools' ``COCO.annToRLE``.
    """
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise ValueError(f"expected polygons or an RLE dict, got {type(segmentation).__name__}")
    if list(segmentation.get("size", [])) != [height, width]:
        raise ValueError(f"RLE size {segmentation.get('size')} differs from the image size {[height, width]}")
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_segmentations(segmentations: list, height: int, width: int) -> np.ndarray:
    """Decode COCO segmentations to masks: bool (K, height, width), like ``COCO.annToMask``."""
    if not segmentations:
        return np.zeros((0, height, width), dtype=bool)
    rles = [segmentation_to_rle(s, height, width) for s in segmentations]
    # pycocotools returns (H, W, K) in Fortran order; the copy makes (K, H, W) C-contiguous.
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).astype(bool)


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
    known = {c["id"] for c in coco.get("categories", [])}
    unknown = sorted(wanted - known)
    if known and unknown:
        raise ValueError(
            f"COCO annotation file {path}: unknown category ids {unknown}; it has {sorted(known)}"
        )
    return wanted


def _build_records(
    coco: dict, path: Path, category_ids: frozenset[int] | None, include_crowd: bool
) -> list[dict]:
    """One record per image with the segmentations it keeps, in the file's image order."""
    records: dict[int, dict] = {}
    for i, image in enumerate(coco["images"]):
        missing = [k for k in ("id", "file_name", "height", "width") if k not in image]
        if missing:
            raise ValueError(f"COCO annotation file {path}: images[{i}] lacks {missing}")
        records[image["id"]] = {
            "id": int(image["id"]),
            "file_name": image["file_name"],
            "height": int(image["height"]),
            "width": int(image["width"]),
            "annotation_ids": [],
            "segmentations": [],
        }
    for ann in coco["annotations"]:
        record = records.get(ann.get("image_id"))
        if record is None or "segmentation" not in ann:
            raise ValueError(
                f"COCO annotation file {path}: annotation {ann.get('id')} has no segmentation "
                f"or refers to an unknown image id {ann.get('image_id')}"
            )
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        if category_ids is not None and ann.get("category_id") not in category_ids:
            continue
        record["annotation_ids"].append(ann.get("id"))
        record["segmentations"].append(ann["segmentation"])
    return list(records.values())


class CocoInstanceDataset(Dataset):
    """Images and instance masks from a COCO annotation file.

    Each item is ``transform(sample)``, where the raw sample is ``{"image": uint8 (H, W, 3) RGB,
    "masks": bool (K, H, W), "image_id": int}`` (returned as it is when ``transform`` is None).
    Masks are decoded in ``__getitem__``, only for the requested image. Images without masks
    are kept (K = 0).

    Args:
        annotation_file: COCO instance JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder that ``file_name`` of each image is relative to.
        transform: callable on the raw sample, e.g. ``SamTransform``.
        category_ids: keep only annotations of these categories (None: all).
        include_crowd: keep ``iscrowd`` annotations (skipped by default).
        min_mask_area: drop masks with fewer pixels than this (at the original resolution).
    """

    def __init__(
        self,
        *,
        annotation_file: str | Path,
        image_dir: str | Path,
        transform: Callable[[dict], dict] | None = None,
        category_ids: Iterable[int] | None = None,
        include_crowd: bool = False,
        min_mask_area: int = 1,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.min_mask_area = int(min_mask_area)
        coco = _read_coco_json(self.annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} (for {self.annotation_file}) does not exist"
            )
        self.category_ids = _check_category_ids(category_ids, coco, self.annotation_file)
        records = _build_records(coco, self.annotation_file, self.category_ids, include_crowd)
        self.image_ids = np.array([r["id"] for r in records], dtype=np.int64)
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

    def load_sample(self, index: int) -> dict:
        """The untransformed sample: image uint8 (H, W, 3), masks bool (K, H, W), image_id int."""
        record = self.record(index)
        path = self.image_dir / record["file_name"]
        image = read_rgb_image(path)
        height, width = record["height"], record["width"]
        if image.shape[:2] != (height, width):
            raise SampleError(
                path,
                f"image is {image.shape[1]}x{image.shape[0]} but {self.annotation_file} says {width}x{height}",
            )
        try:
            masks = decode_segmentations(record["segmentations"], height, width)
        except Exception as err:  # malformed polygon or RLE: name the annotations and the file
            raise SampleError(
                self.annotation_file, f"cannot decode annotations {record['annotation_ids']} of {path}: {err}"
            ) from err
        if self.min_mask_area > 0 and len(masks):
            masks = masks[np.count_nonzero(masks.reshape(len(masks), -1), axis=1) >= self.min_mask_area]
        return {"image": image, "masks": masks, "image_id": record["id"]}

    def __getitem__(self, index: int) -> dict:
        sample = self.load_sample(index)
        return self.transform(sample) if self.transform is not None else sample

    # torchdata's StatefulDataLoader saves these, so a resumed run continues the augmentation RNG.
    def state_dict(self) -> dict:
        state_fn = getattr(self.transform, "state_dict", None)
        return {"transform": state_fn()} if callable(state_fn) else {}

    def load_state_dict(self, state: dict) -> None:
        if "transform" in state and hasattr(self.transform, "load_state_dict"):
            self.transform.load_state_dict(state["transform"])
