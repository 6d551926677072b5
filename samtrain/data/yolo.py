"""Ultralytics YOLO segmentation datasets: a ``data.yaml`` and one label text file per image.

The layout (what Ultralytics and Roboflow export)::

    data.yaml            path: <root>   train: images/train   val: images/val   names: [cat, dog]
    images/train/a.jpg   labels/train/a.txt   (one object per line: "class x1 y1 x2 y2 ...",
                                               coordinates normalised by the image width and height)

``path`` is the dataset root (relative to the YAML's folder; the folder itself when absent);
``train`` / ``val`` / ``test`` are image folders (searched recursively), ``.txt`` lists of image
paths, or lists of either, relative to the root (a leading ``../`` that leads nowhere is dropped,
as Ultralytics does for Roboflow exports). An image's labels are at the same place with the last
``images`` folder replaced by ``labels`` and the extension by ``.txt``; an image without a label
file, or with an empty one, has no objects (skipped and counted). ``names`` is a list or a
``{id: name}`` mapping.

Polygons are filled as pycocotools fills COCO polygons. A line with an odd number of coordinates,
fewer than 3 points, a coordinate that is not a number or lies outside [0, 1], or a class id
that ``names`` lacks, and a label file whose image is missing, make the sample fail with the
file and line (skipped and counted by the loader, listed by ``check-data``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from samtrain.data.annotated import AnnotatedImageDataset, AnnotatedObject, ImageEntry, Shape, polygon_problem
from samtrain.data.image_io import IMAGE_EXTENSIONS

SPLITS = ("train", "val", "test")


def read_data_yaml(path: str | Path) -> tuple[Path, dict]:
    """The ``data.yaml`` of ``path`` (the file or its folder) as (file, mapping); errors name the file."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("data.yaml", "data.yml", "dataset.yaml") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"YOLO dataset folder {path} holds no data.yaml")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"YOLO data file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"YOLO data file {path} is not valid YAML: {err}") from err
    if not isinstance(doc, dict):
        raise ValueError(f"YOLO data file {path}: expected a mapping with path/train/val/names")
    return path, doc


def class_names(doc: dict, path: Path) -> list[str]:
    """``names`` of a data.yaml as a list indexed by class id."""
    names = doc.get("names")
    if isinstance(names, dict):
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            raise ValueError(f"YOLO data file {path}: names ids {ids} are not 0..{len(ids) - 1}")
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ValueError(f"YOLO data file {path}: 'names' must be a list or a mapping of class names")


def _resolve(root: Path, entry: str) -> Path:
    candidate = (root / entry).resolve()
    if not candidate.exists() and entry.startswith("../"):
        candidate = (root / entry[3:]).resolve()
    return candidate


def split_images(root: Path, value: str | list, yaml_path: Path) -> tuple[list[Path], list[Path]]:
    """(images, image folders) that a split's ``value`` names; errors name the YAML file."""
    images, folders = [], []
    for item in value if isinstance(value, list) else [value]:
        source = _resolve(root, str(item))
        if source.is_dir():
            folders.append(source)
            images += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif source.is_file() and source.suffix == ".txt":
            lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
            images += [
                (source.parent / line).resolve() if line.startswith("./") else _resolve(root, line)
                for line in lines
            ]
        else:
            raise FileNotFoundError(f"YOLO data file {yaml_path}: split source {source} does not exist")
    return images, folders


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    at = max((i for i, p in enumerate(parts[:-1]) if p == "images"), default=None)
    if at is None:
        return image.with_suffix(".txt")
    parts[at] = "labels"
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, names: list[str]) -> tuple[list[AnnotatedObject], list[str]]:
    """The objects of one label file and the problems of its lines (``"<file> line N: ..."``)."""
    objects, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {number}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append(f"{where}: not a list of numbers: {line.strip()[:60]!r}")
            continue
        class_id, coords = values[0], values[1:]
        if class_id != int(class_id) or not 0 <= class_id < len(names):
            problems.append(f"{where}: class {fields[0]} is not among the {len(names)} names")
            continue
        problem = polygon_problem(coords, width=1, height=1)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        shape = Shape("coco_polygon", tuple(coords), normalized=True)
        objects.append(AnnotatedObject([shape], names[int(class_id)], where))
    return objects, problems


class YoloSegmentationDataset(AnnotatedImageDataset):
    """One split of an Ultralytics YOLO segmentation dataset (see the module docstring).

    Args:
        data_yaml: the ``data.yaml`` or the folder holding it.
        split: "train", "val" or "test": the YAML's entry to read.
        transform: callable on the raw sample, e.g. ``SamTransform``.
        classes: keep only objects of these class names (None: all).
        min_mask_area: drop masks with fewer pixels than this (original resolution).
    """

    SAMPLE_ARGS = ("data_yaml", "split", "classes", "min_mask_area")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        data_yaml: str | Path,
        split: str = "train",
        transform: Callable[..., dict] | None = None,
        classes: Iterable[str] | None = None,
        min_mask_area: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self._init_common(
            transform=transform,
            classes=classes,
            min_mask_area=min_mask_area,
            split=split,
            val_fraction=0.0,
            split_seed=0,
        )
        self.yaml_file, doc = read_data_yaml(data_yaml)
        self.data_yaml = Path(data_yaml)
        if not doc.get(split):
            raise ValueError(f"YOLO data file {self.yaml_file} has no {split!r} entry")
        root = Path(doc.get("path") or ".")
        self.root = root if root.is_absolute() else (self.yaml_file.parent / root).resolve()
        names = class_names(doc, self.yaml_file)
        images, folders = split_images(self.root, doc[split], self.yaml_file)
        entries = [self._entry(image, names) for image in images]
        entries += self._orphan_labels(images, folders)
        self._set_entries(entries, names, self.yaml_file, hash_split=False)

    def _entry(self, image: Path, names: list[str]) -> ImageEntry:
        labels = label_path(image)
        entry = ImageEntry(key=_key(image, self.root), annotation_file=labels, image_path=image)
        if labels.is_file():
            entry.objects, problems = parse_label_file(labels, names)
            entry.problems += problems
        return entry

    def _orphan_labels(self, images: list[Path], folders: list[Path]) -> list[ImageEntry]:
        """Entries (each a problem) for label files in the split's label folders without an image."""
        have = {label_path(image) for image in images}
        orphans = []
        for folder in folders:
            label_folder = label_path(folder / "x").parent
            for labels in sorted(label_folder.rglob("*.txt")) if label_folder.is_dir() else []:
                if labels not in have:
                    entry = ImageEntry(key=_key(labels, self.root), annotation_file=labels, image_path=None)
                    entry.problems.append(
                        f"label file without an image (looked for {labels.stem}.* "
                        f"in {folder / labels.parent.relative_to(label_folder)})"
                    )
                    orphans.append(entry)
        return orphans

    def source_files(self) -> list[Path]:
        return sorted({self.yaml_file, *super().source_files()})


def _key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
