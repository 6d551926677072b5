"""labelme annotations: a folder of labelme JSON files, one per image.

Each file holds ``shapes`` (``label``, ``points``, ``shape_type``, ``group_id``), ``imagePath``
(relative to the JSON file), optionally the image itself base64-encoded in ``imageData`` (used
when present, as labelme does), and ``imageHeight`` / ``imageWidth``. Shapes are drawn as
labelme's ``shape_to_mask`` draws them (PIL, outline and fill):

- ``polygon``: the polygon through ``points``; ``rectangle``: the box of its two corners;
- ``circle``: centre ``points[0]``, radius the distance to ``points[1]``;
- ``mask``: a PNG bitmap (base64 in ``mask``) placed at the box ``points``;
- ``line``, ``linestrip``, ``point``: no area, ignored.

Shapes with the same ``label`` and a non-null ``group_id`` are the parts of one object (as
labelme's COCO export joins them); every other shape is an object of its own. A file that does
not parse, a shape with malformed points (not x, y pairs, too few, outside the image), an
unknown ``shape_type``, an image that is missing or of another size than the file says: the
sample fails with the file and the shape (skipped and counted by the loader).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from samtrain.data.annotated import (
    AnnotatedImageDataset,
    AnnotatedObject,
    ImageEntry,
    Shape,
    outside_problem,
    polygon_problem,
)
from samtrain.data.errors import SampleError
from samtrain.data.image_io import decode_rgb_image, read_rgb_image

AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
LINE_SHAPES = ("line", "linestrip", "point", "points")


def read_labelme_json(path: Path) -> tuple[dict | None, str | None]:
    """(document, None) or (None, problem with the line and column) for one labelme file."""
    try:
        doc = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        return None, f"not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
    except (UnicodeDecodeError, OSError) as err:
        return None, f"cannot read: {err}"
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        return None, "not a labelme file (no 'shapes' list)"
    return doc, None


def _declared_size(doc: dict) -> tuple[int, int] | None:
    height, width = doc.get("imageHeight"), doc.get("imageWidth")
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return height, width
    return None


def _points(shape: dict) -> np.ndarray | None:
    """The shape's points float64 (n, 2), or None when they are not x, y pairs of numbers."""
    points = shape.get("points")
    if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
        return None
    try:
        return np.asarray(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return None


def _mask_bitmap(shape: dict) -> np.ndarray:
    data = base64.b64decode(shape.get("mask") or "", validate=True)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L")) > 0


def shape_part(shape: dict, size: tuple[int, int] | None) -> tuple[Shape | None, str | None]:
    """(part, None), (None, None) for a shape without area, or (None, problem)."""
    kind = shape.get("shape_type") or "polygon"
    if kind in LINE_SHAPES:
        return None, None
    if kind not in AREA_SHAPES:
        return None, f"unknown shape_type {kind!r}"
    points = _points(shape)
    if points is None:
        return None, "points are not a list of [x, y] pairs of numbers"
    height, width = size if size is not None else (np.inf, np.inf)
    if kind == "polygon":
        problem = polygon_problem(points.reshape(-1), width=width, height=height)
        return (None, problem) if problem else (Shape("pil_polygon", tuple(points.reshape(-1))), None)
    if len(points) != 2:
        return None, f"a {kind} needs 2 points, got {len(points)}"
    if not np.isfinite(points).all():
        return None, "a coordinate is not a finite number"
    problem = outside_problem(points.reshape(-1), width=width, height=height)
    if problem is not None:
        return None, problem
    if kind == "circle":
        centre, edge = points
        r = float(np.hypot(*(edge - centre)))
        return Shape("pil_ellipse", (centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r)), None
    if kind == "rectangle":
        return Shape("pil_rectangle", tuple(points.reshape(-1))), None
    try:
        bitmap = _mask_bitmap(shape)
    except (binascii.Error, OSError, ValueError) as err:
        return None, f"mask is not a base64 PNG: {err}"
    x0, y0 = points.min(axis=0)
    return Shape("bitmap", (int(x0), int(y0)), bitmap=bitmap), None


def objects_of(doc: dict, size: tuple[int, int] | None) -> tuple[list[AnnotatedObject], list[str]]:
    """The document's objects (group_id joins parts) and the problems of its shapes."""
    groups: dict[tuple, AnnotatedObject] = {}
    objects, problems = [], []
    for i, shape in enumerate(doc["shapes"]):
        if not isinstance(shape, dict):
            problems.append(f"shapes[{i}] is not an object")
            continue
        label = str(shape.get("label", ""))
        where = f"shapes[{i}] ({label!r})"
        part, problem = shape_part(shape, size)
        if problem is not None:
            problems.append(f"{where}: {problem}")
        if part is None:
            continue
        group = shape.get("group_id")
        if group is None:
            objects.append(AnnotatedObject([part], label, where))
        elif (label, group) in groups:
            groups[(label, group)].shapes.append(part)
        else:
            groups[(label, group)] = AnnotatedObject([part], label, f"{where}, group_id {group}")
            objects.append(groups[(label, group)])
    return objects, problems


class LabelmeDataset(AnnotatedImageDataset):
    """A folder of labelme JSON files (searched recursively; see the module docstring).

    Args:
        root: the folder.
        transform: callable on the raw sample, e.g. ``SamTransform``.
        classes: keep only objects of these labels, in this order as ``categories`` (None: every
            label found, sorted).
        min_mask_area: drop masks with fewer pixels than this (original resolution).
        split, val_fraction, split_seed: optional deterministic train/val split by file name.
    """

    SAMPLE_ARGS = ("root", "classes", "min_mask_area", "split", "val_fraction", "split_seed")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        root: str | Path,
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
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"labelme folder {self.root} does not exist or is not a directory")
        files = sorted(self.root.rglob("*.json"), key=lambda p: p.relative_to(self.root).as_posix())
        if not files:
            raise ValueError(f"labelme folder {self.root} holds no .json files")
        self._embedded: set[str] = set()
        entries = [self._entry(path) for path in files]
        labels = sorted({o.label for e in entries for o in e.objects})
        self._set_entries(entries, labels, self.root)

    def _entry(self, path: Path) -> ImageEntry:
        key = path.relative_to(self.root).with_suffix("").as_posix()
        entry = ImageEntry(key=key, annotation_file=path, image_path=None)
        doc, problem = read_labelme_json(path)
        if problem is not None:
            entry.problems.append(problem)
            return entry
        entry.size = _declared_size(doc)
        if doc.get("imagePath"):
            entry.image_path = path.parent / str(doc["imagePath"])
        if doc.get("imageData"):
            self._embedded.add(key)
        elif entry.image_path is None or not entry.image_path.is_file():
            entry.problems.append(
                f"image {entry.image_path or '(no imagePath)'} does not exist "
                "and the file embeds no imageData"
            )
        entry.objects, problems = objects_of(doc, entry.size)
        entry.problems += problems
        return entry

    def read_image(self, entry: ImageEntry) -> np.ndarray:
        if entry.key not in self._embedded:
            return read_rgb_image(entry.image_path)
        doc, problem = read_labelme_json(entry.annotation_file)
        if problem is not None:
            raise SampleError(entry.annotation_file, problem)
        try:
            data = base64.b64decode(doc["imageData"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise SampleError(entry.annotation_file, f"imageData is not base64: {err}") from err
        return decode_rgb_image(data, f"{entry.annotation_file} (imageData)")

    def source_files(self) -> list[Path]:
        files = {e.annotation_file for e in self.entries}
        files |= {
            e.image_path for e in self.entries if e.image_path is not None and e.key not in self._embedded
        }
        return sorted(files)
