"""The common ground of the annotation-file formats (YOLO, labelme, CVAT): images listed with their
objects' shapes at construction, rasterised per sample.

A format's reader parses its files into :class:`ImageEntry` records, each naming its image, the
size its annotation file declares and its objects, an object being one or more :class:`Shape`
parts (``group_id`` in labelme, one polygon per part). Problems found while parsing (a malformed
line, a polygon outside the image, a label file without its image) stay on the entry with the
file and line: loading that sample raises :class:`SampleError`, so the loader skips and counts
it, and ``check-data`` lists it. Entries without objects are left out and counted
(``skipped_empty``), not errors.

Shapes are rasterised by the rule of the tool that drew them: ``coco_polygon`` as pycocotools
fills a COCO polygon (YOLO, CVAT, and what a COCO export of them would give); ``pil_polygon``,
``pil_rectangle``, ``pil_ellipse`` as labelme's ``shape_to_mask`` draws them (PIL ``ImageDraw``
with outline and fill); ``bitmap`` as a boolean patch placed at its top-left corner (CVAT masks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from samtrain.data.base import SamDataset, decoded
from samtrain.data.errors import SampleError
from samtrain.data.image_io import read_rgb_image
from samtrain.data.rle import RleMasks, rle_run_lengths
from samtrain.data.split import select_split, stable_hash

log = logging.getLogger(__name__)

SHAPE_KINDS = ("coco_polygon", "pil_polygon", "pil_rectangle", "pil_ellipse", "bitmap")


@dataclass(frozen=True)
class Shape:
    """One part of an object.

    ``coords``: for polygons the flat ``(x0, y0, x1, y1, ...)`` in pixels (or, with ``normalized``,
    as fractions of the image width and height); for ``pil_rectangle`` / ``pil_ellipse`` the box
    ``(x0, y0, x1, y1)`` PIL draws in. ``bitmap``: bool (h, w) at column ``coords[0]``, row ``coords[1]``.
    """

    kind: str
    coords: tuple[float, ...]
    normalized: bool = False
    bitmap: np.ndarray | None = None


@dataclass
class AnnotatedObject:
    """One object: the union of its shapes (or, in a label map, the pixels of ``value``); ``label``
    its class name; ``where`` its place in the file."""

    shapes: list[Shape]
    label: str
    where: str
    value: int | None = None


@dataclass
class ImageEntry:
    """One image of an annotated dataset (see the module docstring)."""

    key: str  # unique within the dataset, stable across runs: the image's id is its hash
    annotation_file: Path
    image_path: Path | None
    objects: list[AnnotatedObject] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (height, width) the annotation file declares
    problems: list[str] = field(default_factory=list)


def rasterize(shapes: Sequence[Shape], height: int, width: int) -> np.ndarray:
    """The union of ``shapes`` as bool (height, width)."""
    mask = np.zeros((height, width), dtype=bool)
    for shape in shapes:
        mask |= _rasterize_one(shape, height, width)
    return mask


def object_run_lengths(shapes: Sequence[Shape], height: int, width: int) -> np.ndarray:
    """The union of ``shapes`` as COCO run lengths int64 (n,) (see :mod:`samtrain.data.rle`)."""
    if all(shape.kind == "coco_polygon" for shape in shapes):
        polygons = [_pixel_coords(shape, height, width).tolist() for shape in shapes]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        rle = mask_utils.encode(np.asfortranarray(rasterize(shapes, height, width).view(np.uint8)))
    return rle_run_lengths(rle, height, width)


def _pixel_coords(shape: Shape, height: int, width: int) -> np.ndarray:
    coords = np.asarray(shape.coords, dtype=np.float64)
    if shape.normalized:
        coords = coords * np.tile([width, height], len(coords) // 2)
    return coords


def _rasterize_one(shape: Shape, height: int, width: int) -> np.ndarray:
    coords = _pixel_coords(shape, height, width)
    if shape.kind == "coco_polygon":
        rle = mask_utils.frPyObjects([coords.tolist()], height, width)
        return mask_utils.decode(rle)[..., 0].astype(bool)
    if shape.kind == "bitmap":
        mask = np.zeros((height, width), dtype=bool)
        left, top = int(coords[0]), int(coords[1])
        patch = shape.bitmap[: max(height - top, 0), : max(width - left, 0)]
        mask[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
        return mask
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    xy = [tuple(p) for p in coords.reshape(-1, 2).tolist()]
    if shape.kind == "pil_polygon":
        draw.polygon(xy, outline=1, fill=1)
    elif shape.kind == "pil_rectangle":
        draw.rectangle(_ordered_box(xy), outline=1, fill=1)
    elif shape.kind == "pil_ellipse":
        draw.ellipse(_ordered_box(xy), outline=1, fill=1)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPE_KINDS}")
    return np.asarray(canvas, dtype=bool)


def _ordered_box(xy: list[tuple[float, float]]) -> list[float]:
    (x0, y0), (x1, y1) = xy
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def polygon_problem(coords: Sequence[float], *, width: float, height: float) -> str | None:
    """Why flat polygon ``coords`` cannot be an object in a ``width x height`` image, or None.

    An odd count, fewer than 3 points, a non-finite value, or a point more than half a pixel
    outside the image (YOLO's normalised coordinates: pass width = height = 1 and a tolerance is
    not needed beyond rounding, see :data:`NORMALIZED_SLACK`).
    """
    values = np.asarray(coords, dtype=np.float64)
    if values.size % 2:
        return f"odd number of coordinates ({values.size}); a polygon needs x y pairs"
    if values.size < 6:
        return f"{values.size // 2} point(s); a polygon needs at least 3"
    if not np.isfinite(values).all():
        return "a coordinate is not a finite number"
    return outside_problem(values, width=width, height=height)


def outside_problem(coords: Sequence[float], *, width: float, height: float) -> str | None:
    """Why flat points ``(x0, y0, x1, y1, ...)`` lie outside a ``width x height`` image, or None."""
    values = np.asarray(coords, dtype=np.float64)
    xs, ys = values[0::2], values[1::2]
    slack = NORMALIZED_SLACK if width == 1 and height == 1 else 0.5
    if xs.min() < -slack or ys.min() < -slack or xs.max() > width + slack or ys.max() > height + slack:
        return (
            f"points reach outside the image ({width:g}x{height:g}): "
            f"x in [{xs.min():g}, {xs.max():g}], y in [{ys.min():g}, {ys.max():g}]"
        )
    return None


NORMALIZED_SLACK = 1e-3  # normalised coordinates a little past 0 or 1 are rounding, not errors


class AnnotatedImageDataset(SamDataset):
    """Base of the annotation-file datasets: a subclass parses its files into ``ImageEntry``
    records in ``__init__`` and calls :meth:`_set_entries`; each declares its own ``SAMPLE_ARGS`` and
    ``NON_SAMPLE_ARGS`` (:mod:`samtrain.data.base`).

    Each raw sample is ``{"image": uint8 (H, W, 3), "masks": bool (K, H, W), "image_id": int,
    "labels": int64 (K,)}``; ``labels`` index :attr:`categories`.
    """

    def _init_common(
        self,
        *,
        transform: Callable[..., dict] | None,
        classes: Iterable[str] | None,
        min_mask_area: int,
        split: str | None,
        val_fraction: float,
        split_seed: int,
    ) -> None:
        self.transform = transform
        self.classes = None if classes is None else tuple(str(c) for c in classes)
        self.min_mask_area = int(min_mask_area)
        self.split, self.val_fraction, self.split_seed = split, float(val_fraction), int(split_seed)

    def _set_entries(
        self, entries: list[ImageEntry], categories: Sequence[str], source: Path, *, hash_split: bool = True
    ) -> None:
        """Keep the entries with objects (or problems) of the chosen classes and (with ``hash_split``)
        of the deterministic train/val split by key (:mod:`samtrain.data.split`)."""
        self.categories = list(categories) if self.classes is None else list(self.classes)
        known = set(self.categories)
        for entry in entries:
            entry.objects = [o for o in entry.objects if o.label in known or self.classes is None]
        kept = [e for e in entries if e.objects or e.problems]
        self.skipped_empty = len(entries) - len(kept)
        if self.skipped_empty:
            log.info("%s: %d image(s) without objects skipped", source, self.skipped_empty)
        split = self.split if hash_split else None
        self.entries = select_split(kept, lambda e: e.key, split, self.val_fraction, self.split_seed)
        self._label_index = {name: i for i, name in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.entries)

    def sample_name(self, index: int) -> str:
        entry = self.entries[index]
        return str(entry.image_path or entry.annotation_file)

    def source_files(self) -> list[Path]:
        files = {e.annotation_file for e in self.entries}
        files |= {e.image_path for e in self.entries if e.image_path is not None}
        return sorted(files)

    def image_id(self, entry: ImageEntry) -> int:
        """The entry's image id: a stable 63-bit hash of its key."""
        return stable_hash(entry.key)

    def read_image(self, entry: ImageEntry) -> np.ndarray:
        """The entry's image uint8 (H, W, 3); SampleError when missing or unreadable."""
        if entry.image_path is None:
            raise SampleError(entry.annotation_file, "names no image")
        return read_rgb_image(entry.image_path)

    def load_encoded_sample(self, index: int) -> dict:
        """The untransformed sample with masks as RleMasks (K, H, W): polygons go straight to run
        lengths (pycocotools), other shapes are drawn one at a time and encoded, so no sample ever
        holds K full-size masks at once."""
        entry = self.entries[index]
        if entry.problems:
            raise SampleError(entry.annotation_file, "; ".join(entry.problems))
        image = self.read_image(entry)
        height, width = image.shape[:2]
        if entry.size is not None and tuple(entry.size) != (height, width):
            raise SampleError(
                entry.annotation_file,
                f"says the image is {entry.size[1]}x{entry.size[0]} but {entry.image_path or 'its image'} "
                f"is {width}x{height}",
            )
        masks = RleMasks([object_run_lengths(o.shapes, height, width) for o in entry.objects], height, width)
        areas = masks.areas()
        for obj, area in zip(entry.objects, areas, strict=True):
            if area == 0:
                raise SampleError(entry.annotation_file, f"{obj.where}: the object has zero area")
        labels = np.array([self._label_index.get(o.label, -1) for o in entry.objects], dtype=np.int64)
        keep = np.flatnonzero(areas >= self.min_mask_area)
        return {
            "image": image,
            "masks": masks.subset(keep),
            "image_id": self.image_id(entry),
            "labels": labels[keep],
        }

    def load_sample(self, index: int) -> dict:
        """The untransformed sample: image uint8 (H, W, 3), masks bool (K, H, W), image_id, labels."""
        return decoded(self.load_encoded_sample(index))
