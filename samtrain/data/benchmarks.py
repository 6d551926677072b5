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

COCO / LVIS val with ground-truth boxes use :class:`samtrain.data.CocoInstanceDataset`.
A file that is missing or cannot be read raises :class:`SampleError` naming it (evaluation skips
and counts it); a root without the benchmark's folders is refused when the dataset is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from samtrain.data.base import SamDataset
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
        self.images = _files(_require_dir(self.root / image_dir, "image"))
        masks_folder = _require_dir(self.root / mask_dir, "mask")
        self.masks = {p.name.split(".")[0]: p for p in _files(masks_folder)}
        self.mask_dir, self.mask_rule, self.transform = masks_folder, mask_rule, transform
        if not self.images:
            raise FileNotFoundError(f"{self.root / image_dir}: no images")

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

    def __init__(
        self, *, root: str | Path, split: str = "val", transform: Callable[..., dict] | None = None
    ) -> None:
        self.root = Path(root)
        self.names = _split_names(self.root / f"{split}.txt")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def sample_name(self, index: int) -> str:
        return str(self.root / "inst" / f"{self.names[index]}.mat")

    def load_sample(self, index: int) -> dict:
        name = self.names[index]
        image = _read_image(self.root / "img" / f"{name}.jpg")
        instances = read_sbd_instances(self.root / "inst" / f"{name}.mat")
        _check_same_size(image, instances, self.root / "inst" / f"{name}.mat")
        ids = [i for i in np.unique(instances) if i > 0]
        masks = np.stack([instances == i for i in ids]) if ids else np.zeros((0, *instances.shape), bool)
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

    def __init__(
        self, *, root: str | Path, split: str = "val", transform: Callable[..., dict] | None = None
    ) -> None:
        self.root = Path(root)
        self.names = _split_names(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        self.transform = transform

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
        ids = [i for i in np.unique(labels) if 0 < i < 255]
        masks = np.stack([labels == i for i in ids]) if ids else np.zeros((0, *labels.shape), bool)
        return {"image": image, "masks": masks, "image_id": index, "ignore": labels == 255}


__all__ = ["MASK_RULES", "ImageMaskBenchmark", "PascalVocBenchmark", "SbdBenchmark", "read_sbd_instances"]
