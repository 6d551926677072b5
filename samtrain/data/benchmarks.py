"""The standard interactive-segmentation benchmarks, read from their published layouts.

Every sample is at the original resolution (``transform`` is None for evaluation): ``"image"``
``(H, W, 3) uint8``, ``"masks"`` ``(K, H, W) bool`` (every object of the image), ``"image_id"``
(the file's index), and ``"ignore"`` ``(H, W) bool`` where the benchmark marks pixels that are
neither object nor background (RITM's ignore label). Layouts (under ``root``):

- :class:`ImageMaskBenchmark`, one object per image, the mask found by the image's stem:
  GrabCut ``data_GT/`` + ``boundary_GT/`` and Berkeley ``images/`` + ``masks/`` (value 128 ignored,
  above 128 object); DAVIS-345 and COCO-MVal ``img/`` + ``gt/`` (any non-zero channel is object);
  HQSeg-44K val: ``DIS5K/DIS-VD/im`` + ``gt``, ``thin_object_detection/ThinObject5K/images_test`` +
  ``masks_test``, ``thin_object_detection/COIFT/images`` + ``masks``,
  ``thin_object_detection/HRSOD/images`` + ``masks_max255`` (above 127 object);
- :class:`SbdBenchmark`: SBD ``val.txt``, ``img/<name>.jpg``, ``inst/<name>.mat`` (``GTinst``'s
  instance map, every instance one object);
- :class:`PascalVocBenchmark`: VOC ``ImageSets/Segmentation/val.txt``, ``JPEGImages/``,
  ``SegmentationObject/`` (palette index 1..254 an object, 255 the ignored boundary band).

- :class:`CocoBoxBenchmark`: COCO ``instances_val2017.json`` or LVIS ``lvis_v1_val.json`` (whose
  images name their file only by ``coco_url``, from COCO's train2017 and val2017) over the COCO images; each object's annotation
  ``bbox`` is its ground-truth box (``"boxes"`` ``(K, 4)`` xyxy), crowd annotations left out.
A file that is missing or cannot be read raises :class:`SampleError` naming it (evaluation skips
and counts it); a root without the benchmark's folders is refused when the dataset is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from samtrain.data.base import SamDataset
from samtrain.data.coco import decode_segmentations
from samtrain.data.errors import SampleError
from samtrain.data.image_io import IMAGE_EXTENSIONS, decode_rgb_image, read_bytes
from samtrain.data.mask_folder import read_label_png

MASK_RULES = ("nonzero", "grabcut", "threshold")


def _read_image(path: Path) -> np.ndarray:
    return decode_rgb_image(read_bytes(path), path)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: the {what} folder does not exist (is data.root the benchmarks' folder?)"
        )
    return path


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageMaskBenchmark(SamDataset):
    """One object per image: ``root/image_dir/<stem>.*`` and its mask ``root/mask_dir/<stem>.*``
    (the stem up to the first dot, as RITM). ``mask_rule``: ``"nonzero"`` (any non-zero channel),
    ``"grabcut"`` (128 ignored, above 128 object) or ``"threshold"`` (above 127 object)."""

    SAMPLE_ARGS = ("root", "image_dir", "mask_dir", "mask_rule")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        root: str | Path,
        image_dir: str,
        mask_dir: str,
        mask_rule: str = "nonzero",
        transform: Callable[..., dict] | None = None,
    ) -> None:
        if mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {mask_rule!r}")
        self.root = Path(root)
        self.image_dir = _require_dir(self.root / image_dir, "image")
        self.images = _files(self.image_dir)
        masks_folder = _require_dir(self.root / mask_dir, "mask")
        self.masks = {p.name.split(".")[0]: p for p in _files(masks_folder)}
        self.mask_dir, self.mask_rule, self.transform = masks_folder, mask_rule, transform
        if not self.images:
            raise FileNotFoundError(f"{self.image_dir}: no images")

    def source_files(self) -> list[Path]:
        return [*self.images, *self.masks.values()]

    def __len__(self) -> int:
        return len(self.images)

    def sample_name(self, index: int) -> str:
        return str(self.images[index])

    def load_sample(self, index: int) -> dict:
        path = self.images[index]
        mask_path = self.masks.get(path.name.split(".")[0])
        if mask_path is None:
            raise SampleError(path, f"no mask named {path.name.split('.')[0]}.* in {self.mask_dir}")
        image, labels = _read_image(path), read_label_png(mask_path)
        _check_same_size(image, labels, mask_path)
        if self.mask_rule == "grabcut":
            mask, ignore = labels > 128, labels == 128
        else:
            mask, ignore = (labels > 0) if self.mask_rule == "nonzero" else (labels > 127), None
        if not mask.any():
            raise SampleError(mask_path, "mask has no object pixel")
        sample = {"image": image, "masks": mask[None], "image_id": index}
        if ignore is not None:
            sample["ignore"] = ignore
        return sample


def _check_same_size(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    if labels.shape[:2] != image.shape[:2]:
        raise SampleError(
            path, f"mask is {labels.shape[1]}x{labels.shape[0]}, its image {image.shape[1]}x{image.shape[0]}"
        )


def instance_masks(labels: np.ndarray, ids: list[int]) -> np.ndarray:
    """An instance map (H, W) -> one bool mask per id, (K, H, W) (K = 0: no object)."""
    if not ids:
        return np.zeros((0, *labels.shape), bool)
    return np.stack([labels == i for i in ids])


def _split_names(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the split list does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: the split list is empty")
    return names


class SbdBenchmark(SamDataset):
    """SBD: ``root/<split>.txt`` names, ``img/<name>.jpg``, ``inst/<name>.mat`` whose ``GTinst``
    struct holds the instance map ``Segmentation`` (0 background, 1..n instances)."""

    SAMPLE_ARGS = ("root", "split")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self, *, root: str | Path, split: str = "val", transform: Callable[..., dict] | None = None
    ) -> None:
        self.root, self.split = Path(root), split
        self.names = _split_names(self.root / f"{split}.txt")
        self.transform = transform

    def source_files(self) -> list[Path]:
        return [
            self.root / f"{self.split}.txt",
            *(self.root / "img" / f"{n}.jpg" for n in self.names),
            *(self.root / "inst" / f"{n}.mat" for n in self.names),
        ]

    def __len__(self) -> int:
        return len(self.names)

    def sample_name(self, index: int) -> str:
        return str(self.root / "inst" / f"{self.names[index]}.mat")

    def load_sample(self, index: int) -> dict:
        name = self.names[index]
        image = _read_image(self.root / "img" / f"{name}.jpg")
        instances = read_sbd_instances(self.root / "inst" / f"{name}.mat")
        _check_same_size(image, instances, self.root / "inst" / f"{name}.mat")
        masks = instance_masks(instances, [i for i in np.unique(instances) if i > 0])
        return {"image": image, "masks": masks, "image_id": index}


def read_sbd_instances(path: Path) -> np.ndarray:
    """The instance map ``(H, W) int64`` of an SBD ``inst/*.mat`` file; SampleError naming it."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise SampleError(path, "instance file does not exist")
    try:
        struct = loadmat(str(path))["GTinst"]
        instances = np.asarray(struct["Segmentation"][0, 0])
    except (MatReadError, KeyError, ValueError, TypeError, IndexError, OSError) as err:
        raise SampleError(
            path, f"not an SBD instance file (a GTinst struct with Segmentation): {err}"
        ) from err
    if instances.ndim != 2:
        raise SampleError(path, f"GTinst.Segmentation has shape {instances.shape}, expected (H, W)")
    return instances.astype(np.int64)


class PascalVocBenchmark(SamDataset):
    """PASCAL VOC: ``ImageSets/Segmentation/<split>.txt``, ``JPEGImages/<name>.jpg`` and the palette
    PNG ``SegmentationObject/<name>.png`` (index 0 background, 255 the ignored boundary band,
    every other index one object)."""

    SAMPLE_ARGS = ("root", "split")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self, *, root: str | Path, split: str = "val", transform: Callable[..., dict] | None = None
    ) -> None:
        self.root, self.split = Path(root), split
        self.names = _split_names(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        self.transform = transform

    def source_files(self) -> list[Path]:
        return [
            self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt",
            *(self.root / "JPEGImages" / f"{n}.jpg" for n in self.names),
            *(self.root / "SegmentationObject" / f"{n}.png" for n in self.names),
        ]

    def __len__(self) -> int:
        return len(self.names)

    def sample_name(self, index: int) -> str:
        return str(self.root / "SegmentationObject" / f"{self.names[index]}.png")

    def load_sample(self, index: int) -> dict:
        name = self.names[index]
        image = _read_image(self.root / "JPEGImages" / f"{name}.jpg")
        path = self.root / "SegmentationObject" / f"{name}.png"
        labels = read_label_png(path)
        _check_same_size(image, labels, path)
        if labels.ndim != 2:
            raise SampleError(path, "expected a palette (single-channel) PNG")
        masks = instance_masks(labels, [i for i in np.unique(labels) if 0 < i < 255])
        return {"image": image, "masks": masks, "image_id": index, "ignore": labels == 255}


class CocoBoxBenchmark(SamDataset):
    """COCO or LVIS instances with their ground-truth boxes (the annotations' ``bbox``, x y w h,
    given as x1 y1 x2 y2). An image's file is ``image_dir/file_name``, or else (LVIS) the last two
    parts of its ``coco_url`` (``train2017/<file>`` or ``val2017/<file>``) under ``image_dir``; images
    without a kept annotation are left out."""

    SAMPLE_ARGS = ("annotation_file", "image_dir")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        annotation_file: str | Path,
        image_dir: str | Path,
        transform: Callable[..., dict] | None = None,
    ) -> None:
        self.annotation_file, self.image_dir, self.transform = (
            Path(annotation_file),
            Path(image_dir),
            transform,
        )
        data = _read_json(self.annotation_file)
        objects: dict[Any, list[dict]] = {}
        for ann in data["annotations"]:
            if (
                isinstance(ann, dict)
                and not ann.get("iscrowd", 0)
                and "segmentation" in ann
                and "bbox" in ann
            ):
                objects.setdefault(ann.get("image_id"), []).append(ann)
        self.images = [im for im in data["images"] if isinstance(im, dict) and im.get("id") in objects]
        self.objects = objects

    def source_files(self) -> list[Path]:
        return [self.annotation_file, *(self._path(image) for image in self.images)]

    def __len__(self) -> int:
        return len(self.images)

    def _path(self, image: dict) -> Path:
        name = image.get("file_name") or "/".join(str(image.get("coco_url", "")).split("/")[-2:])
        if not name:
            raise SampleError(
                self.annotation_file, f"image {image.get('id')} has neither file_name nor coco_url"
            )
        return self.image_dir / name

    def sample_name(self, index: int) -> str:
        return str(self._path(self.images[index]))

    def load_sample(self, index: int) -> dict:
        image_record = self.images[index]
        path = self._path(image_record)
        image = _read_image(path)
        height, width = image.shape[:2]
        anns = self.objects[image_record["id"]]
        try:
            masks = decode_segmentations([a["segmentation"] for a in anns], height, width)
            boxes = np.array(
                [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float64
            )
        except (ValueError, TypeError) as err:
            raise SampleError(self.annotation_file, f"an annotation of {path} is malformed: {err}") from err
        return {"image": image, "masks": masks, "boxes": boxes, "image_id": int(image_record["id"])}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the annotation file does not exist")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise ValueError(f"{path}: expected an object with 'images' and 'annotations' lists")
    return data


__all__ = [
    "MASK_RULES",
    "CocoBoxBenchmark",
    "ImageMaskBenchmark",
    "PascalVocBenchmark",
    "SbdBenchmark",
    "read_sbd_instances",
]
