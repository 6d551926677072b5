"""Pascal VOC instance segmentation: ``SegmentationObject`` palette PNGs, classes from
``SegmentationClass``.

The layout of a VOC year folder (``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationObject/<id>.png     palette indices: 0 background, 1..n the objects, 255 "void"
    SegmentationClass/<id>.png      palette indices: 0 background, 1..20 the class, 255 "void"
    ImageSets/Segmentation/<image_set>.txt    the ids of a split (train, val, trainval)

Each object is the pixels of one index of its ``SegmentationObject`` PNG; 255 (the void border
VOC draws around objects, and unlabelled regions) belongs to no object. Its class is the
``SegmentationClass`` value under it (``classes`` names them, VOC's 20 by default). Both PNGs are
read at construction, so images without objects are known, left out and counted. A PNG whose
image is missing, PNGs and image of different sizes, an object whose class pixels are
background, void or several classes, a PNG that does not decode: the sample fails with the file
(skipped and counted by the loader).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from samtrain.data.annotated import AnnotatedImageDataset, AnnotatedObject, ImageEntry
from samtrain.data.errors import SampleError
from samtrain.data.image_io import read_rgb_image
from samtrain.data.mask_folder import read_label_png

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
VOID = 255


def instance_classes(objects: np.ndarray, classes: np.ndarray) -> tuple[dict[int, int], list[str]]:
    """Each instance index of ``objects`` (H, W) with its class in ``classes`` (H, W), and the
    problems (an instance over background, void only, or several classes)."""
    found, problems = {}, []
    for index in (int(v) for v in np.unique(objects) if v not in (0, VOID)):
        under = np.unique(classes[objects == index])
        under = under[under != VOID]
        if under.size != 1 or under[0] == 0:
            what = "background or void only" if under.size == 0 or under.tolist() == [0] else under.tolist()
            problems.append(f"object {index}: its SegmentationClass pixels are {what}, not one class")
            continue
        found[index] = int(under[0])
    return found, problems


class VocInstanceDataset(AnnotatedImageDataset):
    """Pascal VOC instance segmentation (see the module docstring).

    Args:
        root: the VOC year folder (holding JPEGImages, SegmentationObject, SegmentationClass).
        image_set: the ids of ``ImageSets/Segmentation/<image_set>.txt``; None: every PNG of
            SegmentationObject.
        transform: callable on the raw sample, e.g. ``SamTransform``.
        classes: the names of class values 1, 2, ... (VOC's 20 by default).
        min_mask_area: drop masks with fewer pixels than this (original resolution).
    """

    SAMPLE_ARGS = ("root", "image_set", "classes", "min_mask_area")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        root: str | Path,
        image_set: str | None = "train",
        transform: Callable[..., dict] | None = None,
        classes: Sequence[str] = VOC_CLASSES,
        min_mask_area: int = 1,
    ) -> None:
        self._init_common(
            transform=transform,
            classes=None,
            min_mask_area=min_mask_area,
            split=None,
            val_fraction=0.0,
            split_seed=0,
        )
        self.root, self.image_set = Path(root), image_set
        self.classes = tuple(classes)
        for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
            if not (self.root / folder).is_dir():
                raise FileNotFoundError(f"VOC folder {self.root} has no {folder}/")
        entries = [self._entry(image_id) for image_id in self._ids()]
        self._set_entries(entries, self.classes, self.root, hash_split=False)

    def _ids(self) -> list[str]:
        if self.image_set is None:
            return sorted(p.stem for p in (self.root / "SegmentationObject").glob("*.png"))
        listing = self.root / "ImageSets" / "Segmentation" / f"{self.image_set}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"VOC image set {listing} does not exist")
        return [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]

    def _files(self, image_id: str) -> tuple[Path, Path, Path]:
        return (
            self.root / "JPEGImages" / f"{image_id}.jpg",
            self.root / "SegmentationObject" / f"{image_id}.png",
            self.root / "SegmentationClass" / f"{image_id}.png",
        )

    def _entry(self, image_id: str) -> ImageEntry:
        image, objects_png, classes_png = self._files(image_id)
        entry = ImageEntry(key=image_id, annotation_file=objects_png, image_path=image)
        try:
            objects, classes = read_label_png(objects_png), read_label_png(classes_png)
        except SampleError as err:
            entry.problems.append(f"{err.path}: {err.reason}")
            return entry
        if objects.shape != classes.shape:
            entry.problems.append(
                f"is {objects.shape[1]}x{objects.shape[0]} but {classes_png} is {classes.shape[1]}x{classes.shape[0]}"
            )
            return entry
        if not image.is_file():
            entry.problems.append(f"its image {image} does not exist")
        entry.size = objects.shape
        found, problems = instance_classes(objects, classes)
        entry.problems += problems
        for index, value in found.items():
            if value > len(self.classes):
                entry.problems.append(
                    f"object {index}: class {value} is beyond the {len(self.classes)} classes"
                )
                continue
            entry.objects.append(AnnotatedObject([], self.classes[value - 1], f"object {index}", value=index))
        return entry

    def load_encoded_sample(self, index: int) -> dict:
        """The untransformed sample (dense masks: the label map is the encoding)."""
        entry = self.entries[index]
        if entry.problems:
            raise SampleError(entry.annotation_file, "; ".join(entry.problems))
        image = read_rgb_image(entry.image_path)
        objects = read_label_png(entry.annotation_file)
        if objects.shape != image.shape[:2]:
            raise SampleError(
                entry.annotation_file,
                f"is {objects.shape[1]}x{objects.shape[0]} but its image {entry.image_path} "
                f"is {image.shape[1]}x{image.shape[0]}",
            )
        ids = [o.value for o in entry.objects]
        masks = objects[None] == np.asarray(ids, dtype=objects.dtype).reshape(-1, 1, 1)
        labels = np.array([self._label_index[o.label] for o in entry.objects], dtype=np.int64)
        keep = masks.reshape(len(masks), -1).sum(axis=1) >= self.min_mask_area
        return {
            "image": image,
            "masks": masks[keep],
            "image_id": self.image_id(entry),
            "labels": labels[keep],
        }

    def image_id(self, entry: ImageEntry) -> int:
        """VOC ids are ``YYYY_NNNNNN``: the digits as one integer (2007_000032 -> 2007000032)."""
        digits = entry.key.replace("_", "")
        return int(digits) if digits.isdigit() else super().image_id(entry)

    def source_files(self) -> list[Path]:
        files = []
        for entry in self.entries:
            files += self._files(entry.key)
        return sorted(files)
