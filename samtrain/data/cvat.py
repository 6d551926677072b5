"""CVAT's "CVAT for images 1.1" XML export: polygons and masks.

The file lists ``<image id name width height>`` elements; inside each, the shapes read here::

    <polygon label="cat" points="x0,y0;x1,y1;..." group_id="3"/>      pixel coordinates
    <mask label="cat" rle="c0, c1, ..." left="x" top="y" width="w" height="h"/>

A mask's ``rle`` is CVAT's own run-length code: alternating background and foreground run
lengths, background first, over its ``w x h`` box in row-major order. Shapes with the same label
and ``group_id`` are one object (as CVAT's COCO export merges them); ``box``, ``polyline``,
``points``, ``ellipse`` and the rest are no masks and are ignored. Class names come from the
file's ``<meta>`` labels (or, without them, the labels used, sorted). Images are ``image_dir /
name``.

A polygon with an odd number of coordinates, fewer than 3 points or points outside the image,
an RLE that does not cover its box or a box outside the image, an image that is missing or of
another size than the file says: the sample fails with the XML file and line of the shape
(skipped and counted by the loader). A file that does not parse fails at construction with its
line.
"""

from __future__ import annotations

import xml.parsers.expat
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from samtrain.data.annotated import (
    AnnotatedImageDataset,
    AnnotatedObject,
    ImageEntry,
    Shape,
    polygon_problem,
)

MASK_SHAPES = ("polygon", "mask")


def cvat_rle_bitmap(rle: str, width: int, height: int) -> np.ndarray:
    """CVAT's mask RLE over a ``width x height`` box as bool (height, width); ValueError when it is
    not a list of non-negative integers covering the box exactly."""
    try:
        counts = np.array([int(c) for c in rle.replace(",", " ").split()], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"rle is not a list of integers: {err}") from err
    if counts.size and counts.min() < 0:
        raise ValueError("rle has a negative run length")
    if int(counts.sum()) != width * height:
        raise ValueError(f"rle covers {int(counts.sum())} pixels but the box is {width}x{height}")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(height, width)


def polygon_coords(points: str) -> tuple[list[float] | None, str | None]:
    """``"x0,y0;x1,y1;..."`` as flat coordinates, or (None, problem)."""
    coords = []
    for pair in filter(None, (p.strip() for p in points.split(";"))):
        values = pair.split(",")
        try:
            coords += [float(v) for v in values]
        except ValueError:
            return None, f"point {pair!r} is not a pair of numbers"
    return coords, None


class _CvatParser:
    """Collects images, shapes and meta labels with their line numbers (expat knows the lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.images: list[dict] = []
        self.meta_labels: list[str] = []
        self._stack: list[str] = []
        self._text: list[str] = []
        self._parser = xml.parsers.expat.ParserCreate()
        self._parser.StartElementHandler = self._start
        self._parser.EndElementHandler = self._end
        self._parser.CharacterDataHandler = self._text.append

    def parse(self) -> _CvatParser:
        try:
            with self.path.open("rb") as f:
                self._parser.ParseFile(f)
        except xml.parsers.expat.ExpatError as err:
            raise ValueError(
                f"CVAT file {self.path} is not valid XML (line {err.lineno}, column {err.offset}): "
                f"{xml.parsers.expat.ErrorString(err.code)}"
            ) from err
        return self

    def _start(self, name: str, attrs: dict) -> None:
        line = self._parser.CurrentLineNumber
        if name == "image":
            self.images.append({"attrs": attrs, "line": line, "shapes": []})
        elif self._stack and self._stack[-1] == "image" and self.images:
            self.images[-1]["shapes"].append((name, attrs, line))
        self._stack.append(name)
        self._text.clear()

    def _end(self, name: str) -> None:
        if name == "name" and self._stack[-3:-1] == ["labels", "label"] and "meta" in self._stack:
            self.meta_labels.append("".join(self._text).strip())
        self._stack.pop()


def _shape_part(kind: str, attrs: dict, size: tuple[int, int]) -> tuple[Shape | None, str | None]:
    height, width = size
    if kind == "polygon":
        coords, problem = polygon_coords(attrs.get("points", ""))
        problem = problem or polygon_problem(coords, width=width, height=height)
        return (None, problem) if problem else (Shape("coco_polygon", tuple(coords)), None)
    try:
        left, top, w, h = (int(float(attrs[k])) for k in ("left", "top", "width", "height"))
        bitmap = cvat_rle_bitmap(attrs.get("rle", ""), w, h)
    except KeyError as err:
        return None, f"mask lacks the attribute {err}"
    except ValueError as err:
        return None, f"mask {err}"
    if left < 0 or top < 0 or left + w > width or top + h > height:
        return None, f"mask box {w}x{h} at ({left}, {top}) reaches outside the image ({width}x{height})"
    return Shape("bitmap", (left, top), bitmap=bitmap), None


class CvatImagesDataset(AnnotatedImageDataset):
    """Images and masks of a "CVAT for images 1.1" XML file (see the module docstring).

    Args:
        annotation_file: the XML file (``annotations.xml`` of a CVAT export).
        image_dir: folder that each image's ``name`` is relative to.
        transform: callable on the raw sample, e.g. ``SamTransform``.
        classes: keep only objects of these labels (None: all).
        min_mask_area: drop masks with fewer pixels than this (original resolution).
        split, val_fraction, split_seed: optional deterministic train/val split by image name.
    """

    SAMPLE_ARGS = (
        "annotation_file",
        "image_dir",
        "classes",
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
        transform: Callable[..., dict] | None = None,
        classes: Iterable[str] | None = None,
        min_mask_area: int = 1,
        split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        self._init_common(
            transform=transform,
            classes=classes,
            min_mask_area=min_mask_area,
            split=split,
            val_fraction=val_fraction,
            split_seed=split_seed,
        )
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"CVAT file {self.annotation_file} does not exist")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} (for {self.annotation_file}) does not exist"
            )
        parsed = _CvatParser(self.annotation_file).parse()
        entries = [self._entry(image) for image in parsed.images]
        used = sorted({o.label for e in entries for o in e.objects})
        self._set_entries(entries, parsed.meta_labels or used, self.annotation_file)

    def _entry(self, image: dict) -> ImageEntry:
        attrs, line = image["attrs"], image["line"]
        name = attrs.get("name", "")
        entry = ImageEntry(key=name, annotation_file=self.annotation_file, image_path=self.image_dir / name)
        try:
            entry.size = (int(attrs["height"]), int(attrs["width"]))
        except (KeyError, ValueError):
            entry.problems.append(f"line {line}: <image name={name!r}> lacks a valid width and height")
            return entry
        if not name or not entry.image_path.is_file():
            entry.problems.append(f"line {line}: image {entry.image_path} does not exist")
        groups: dict[tuple, AnnotatedObject] = {}
        for kind, shape_attrs, shape_line in image["shapes"]:
            if kind not in MASK_SHAPES:
                continue
            label, where = (
                shape_attrs.get("label", ""),
                f"line {shape_line} (<{kind}> {shape_attrs.get('label')!r})",
            )
            part, problem = _shape_part(kind, shape_attrs, entry.size)
            if problem is not None:
                entry.problems.append(f"{where}: {problem}")
                continue
            group = shape_attrs.get("group_id")
            if group is not None and (label, group) in groups:
                groups[(label, group)].shapes.append(part)
                continue
            obj = AnnotatedObject([part], label, where)
            entry.objects.append(obj)
            if group is not None:
                groups[(label, group)] = obj
        return entry
