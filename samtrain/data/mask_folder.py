"""Datasets from an image folder and a mask folder beside it, in three layouts.

Images are every ``.jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp`` under ``image_dir`` (recursive); the
masks of ``image_dir/a/b.jpg`` are looked up by its key ``a/b``:

- :class:`InstanceMaskFolder`: ``mask_dir/a/b.png``, an instance-id map (8 or 16 bit, or a
  palette PNG): 0 is background, every other value one object.
- :class:`BinaryMaskFolder`: one binary PNG per object (any non-zero pixel is the object), either
  ``mask_dir/a/b/*.png`` (``layout="folder"``) or ``mask_dir/a/b_<k>.png`` (``layout="suffix"``).
  An image without mask files has no objects (K = 0).
- :class:`SemanticMaskFolder`: ``mask_dir/a/b.png``, a class-id map; every connected component
  of every class (other than background and ignore) is one object.

Every image gets ``image_id`` = a stable 63-bit hash of its key (the same in every process and
run). A missing or damaged mask file, a mask of another size than its image, a mask of zero area
or a class id out of range raises SampleError naming the file (the loader skips and counts the
sample); a missing ``image_dir`` or ``mask_dir`` fails at construction.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from samtrain.data.base import SamDataset
from samtrain.data.errors import SampleError
from samtrain.data.image_io import find_images, read_bytes, read_rgb_image, truncation_reason
from samtrain.data.split import select_split, stable_hash


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label or mask image: integer (H, W) of its raw values (palette indices for
    palette PNGs, 16-bit values kept), EXIF orientation applied. SampleError naming the file."""
    data = read_bytes(path, what="mask")
    reason = truncation_reason(data)
    if reason is not None:
        raise SampleError(path, reason)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            labels = np.array(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise SampleError(path, f"cannot decode mask image: {err}") from err
    if labels.ndim == 3:  # RGB(A) saved binary masks: any colour is foreground
        labels = labels[..., :3].max(axis=-1)
    return labels


class _MaskFolderDataset(SamDataset):
    """Pairs images with masks by key; subclasses implement ``mask_files`` and ``read_masks``."""

    SAMPLE_ARGS = ("image_dir", "mask_dir", "min_mask_area", "split", "val_fraction", "split_seed")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        image_dir: str | Path,
        mask_dir: str | Path,
        transform: Callable[..., dict] | None = None,
        min_mask_area: int = 1,
        split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.transform = transform
        self.min_mask_area = int(min_mask_area)
        self.split, self.val_fraction, self.split_seed = split, float(val_fraction), int(split_seed)
        files = [p.relative_to(self.image_dir).as_posix() for p in find_images(self.image_dir)]
        if not self.mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder {self.mask_dir} does not exist or is not a directory")
        files = select_split(files, str, split, val_fraction, split_seed)
        self.files = np.array(files)
        self.image_ids = np.array([stable_hash(self.key(i)) for i in range(len(files))], dtype=np.int64)
        if len(np.unique(self.image_ids)) != len(self.image_ids):  # 63-bit hashes: practically never
            raise ValueError(f"image folder {self.image_dir}: two image keys hash to the same image_id")

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        """The image's path relative to image_dir, without extension: ``a/b``."""
        return str(self.files[index]).rsplit(".", 1)[0]

    def sample_name(self, index: int) -> str:
        return str(self.image_dir / str(self.files[index]))

    def mask_files(self, index: int) -> list[Path]:
        """The mask files item ``index`` reads (a missing one is an error when it is loaded)."""
        raise NotImplementedError

    def read_masks(self, index: int) -> list[tuple[np.ndarray, Path]]:
        """The masks of item ``index``, each bool (H, W) with the file it came from."""
        raise NotImplementedError

    def sample_files(self, index: int) -> list[Path]:
        return [self.image_dir / str(self.files[index]), *self.mask_files(index)]

    def source_files(self) -> list[Path]:
        """Every image and every mask file of the dataset."""
        return [f for i in range(len(self)) for f in self.sample_files(i)]

    def load_sample(self, index: int) -> dict:
        image = read_rgb_image(self.image_dir / str(self.files[index]))
        height, width = image.shape[:2]
        masks = np.zeros((0, height, width), dtype=bool)
        found = self.read_masks(index)
        for mask, path in found:
            if mask.shape != (height, width):
                raise SampleError(
                    path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}"
                )
            if not mask.any():
                raise SampleError(path, "mask has zero area")
        if found:
            masks = np.stack([mask for mask, _ in found])
            masks = masks[np.count_nonzero(masks.reshape(len(masks), -1), axis=1) >= self.min_mask_area]
        return {"image": image, "masks": masks, "image_id": int(self.image_ids[index])}


class InstanceMaskFolder(_MaskFolderDataset):
    """Instance-id PNGs: ``mask_dir/<key><mask_suffix>``; 0 background, each other value one object.

    Args (besides ``image_dir, mask_dir, transform, min_mask_area, split, val_fraction, split_seed``):
        mask_suffix: file name ending of the id maps.
        ignore_values: ids that are not objects (e.g. 255 for "void").
    """

    SAMPLE_ARGS = (*_MaskFolderDataset.SAMPLE_ARGS, "mask_suffix", "ignore_values")

    def __init__(self, *, mask_suffix: str = ".png", ignore_values: Iterable[int] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_suffix = mask_suffix
        self.ignore_values = tuple(int(v) for v in ignore_values)

    def mask_files(self, index: int) -> list[Path]:
        return [self.mask_dir / f"{self.key(index)}{self.mask_suffix}"]

    def read_masks(self, index: int) -> list[tuple[np.ndarray, Path]]:
        (path,) = self.mask_files(index)
        ids = read_label_png(path)
        values = np.unique(ids)
        values = values[(values != 0) & ~np.isin(values, self.ignore_values)]
        return [(ids == value, path) for value in values]


class SemanticMaskFolder(_MaskFolderDataset):
    """Class-id PNGs split into objects: every connected component of every class.

    Args (besides those of :class:`InstanceMaskFolder` but ``ignore_values``):
        background: the class id that is not an object.
        ignore_index: the class id of unlabeled pixels (not an object); None: none.
        num_classes: when set, a class id >= num_classes (other than ignore_index) is an error.
        class_ids: make objects only of these classes (None: all but background and ignore).
        connectivity: 4 or 8, the neighbourhood of connected components.
    """

    SAMPLE_ARGS = (
        *_MaskFolderDataset.SAMPLE_ARGS,
        "mask_suffix",
        "background",
        "ignore_index",
        "num_classes",
        "class_ids",
        "connectivity",
    )

    def __init__(
        self,
        *,
        mask_suffix: str = ".png",
        background: int = 0,
        ignore_index: int | None = 255,
        num_classes: int | None = None,
        class_ids: Iterable[int] | None = None,
        connectivity: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        self.mask_suffix = mask_suffix
        self.background, self.ignore_index = int(background), ignore_index
        self.num_classes = None if num_classes is None else int(num_classes)
        self.class_ids = None if class_ids is None else frozenset(int(c) for c in class_ids)
        self.connectivity = connectivity

    def _classes(self, labels: np.ndarray, path: Path) -> list[int]:
        """The classes of a label map that make objects; SampleError for ids out of range."""
        values = [int(v) for v in np.unique(labels) if v != self.background and v != self.ignore_index]
        if self.num_classes is not None and values and max(values) >= self.num_classes:
            raise SampleError(
                path, f"class id {max(values)} is out of range (num_classes={self.num_classes})"
            )
        return [v for v in values if self.class_ids is None or v in self.class_ids]

    def mask_files(self, index: int) -> list[Path]:
        return [self.mask_dir / f"{self.key(index)}{self.mask_suffix}"]

    def read_masks(self, index: int) -> list[tuple[np.ndarray, Path]]:
        (path,) = self.mask_files(index)
        labels = read_label_png(path)
        masks = []
        for value in self._classes(labels, path):
            count, components = cv2.connectedComponents(
                (labels == value).astype(np.uint8), connectivity=self.connectivity
            )
            masks.extend((components == c, path) for c in range(1, count))
        return masks


_SUFFIX_MASK = re.compile(r"^(?P<key>.+)_(?P<k>\d+)\.png$", re.IGNORECASE)


class BinaryMaskFolder(_MaskFolderDataset):
    """One binary PNG per object: ``mask_dir/<key>/*.png`` (``layout="folder"``) or
    ``mask_dir/<key>_<k>.png`` (``layout="suffix"``, ordered by k). Non-zero pixels are the object.

    Args: those of :class:`InstanceMaskFolder` but ``mask_suffix``/``ignore_values``, and ``layout``.
    """

    SAMPLE_ARGS = (*_MaskFolderDataset.SAMPLE_ARGS, "layout")

    def __init__(self, *, layout: str = "folder", **kwargs) -> None:
        if layout not in ("folder", "suffix"):
            raise ValueError(f"layout must be 'folder' or 'suffix', got {layout!r}")
        super().__init__(**kwargs)
        self.layout = layout
        self._by_key = self._index_suffix_layout() if layout == "suffix" else None

    def _index_suffix_layout(self) -> dict[str, list[str]]:
        """key -> its mask files (relative to mask_dir), ordered by k."""
        found: dict[str, list[tuple[int, str]]] = {}
        for path in self.mask_dir.rglob("*"):
            match = _SUFFIX_MASK.match(path.relative_to(self.mask_dir).as_posix())
            if match and path.is_file():
                found.setdefault(match["key"], []).append((int(match["k"]), match.string))
        return {key: [name for _, name in sorted(items)] for key, items in found.items()}

    def mask_files(self, index: int) -> list[Path]:
        key = self.key(index)
        if self._by_key is not None:
            return [self.mask_dir / name for name in self._by_key.get(key, [])]
        folder = self.mask_dir / key
        return sorted(p for p in folder.glob("*") if p.suffix.lower() == ".png") if folder.is_dir() else []

    def read_masks(self, index: int) -> list[tuple[np.ndarray, Path]]:
        return [(read_label_png(path) != 0, path) for path in self.mask_files(index)]
