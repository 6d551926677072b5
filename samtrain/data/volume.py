"""Medical volumes: NIfTI (nibabel) and multi-page TIFF (tifffile) image and label volumes, sliced
into 2-D samples.

Image and label volumes are paired by name: ``image_dir/<case><image_suffix>.<ext>`` with
``label_dir/<case>.<ext>`` (``.nii.gz``, ``.nii``, ``.tif``, ``.tiff``; nnU-Net's
``imagesTr/case_0000.nii.gz`` + ``labelsTr/case.nii.gz`` is ``image_suffix="_0000"``). Each slice
along ``axis`` (default: NIfTI's last array axis, the axial one of RAS/LPS scans; a TIFF's
pages) is a sample: the array with that axis taken out, not reoriented. Every connected
component of every label value in a slice is an object; slices without labels are left out
and counted (``skipped_empty``).

Intensities become uint8 grey (as RGB) through a window: a CT preset (``ct_abdomen`` W400/L40,
``ct_soft_tissue`` W350/L50, ``ct_liver`` W150/L60, ``ct_lung`` W1500/L-600, ``ct_bone``
W1800/L400, ``ct_brain`` W80/L40, in Hounsfield units), an explicit ``[low, high]``, or, by
default, the ``percentiles`` of the whole volume (MR, microscopy: a function of the volume
alone, the same for all its slices).

A label volume without its image, image and label volumes of different shapes, a label volume
holding non-integer values, a file that nibabel/tifffile cannot read: the case's sample fails
with the file (skipped and counted by the loader). nibabel and tifffile are the optional extra
``samtrain[medical]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from samtrain.data.base import SamDataset
from samtrain.data.errors import SampleError
from samtrain.data.split import select_split, stable_hash

log = logging.getLogger(__name__)

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".tiff", ".tif")
CT_WINDOWS = {  # name: (level, width) in Hounsfield units
    "ct_abdomen": (40.0, 400.0),
    "ct_soft_tissue": (50.0, 350.0),
    "ct_liver": (60.0, 150.0),
    "ct_lung": (-600.0, 1500.0),
    "ct_bone": (400.0, 1800.0),
    "ct_brain": (40.0, 80.0),
}


def volume_key(path: Path, suffix: str = "") -> str | None:
    """The case name of a volume file (extension and ``suffix`` removed), None when it is no volume."""
    name = path.name
    for ext in VOLUME_EXTENSIONS:
        if name.lower().endswith(ext):
            stem = name[: -len(ext)]
            return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else (None if suffix else stem)
    return None


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_volume(path: Path) -> np.ndarray:
    """The whole volume as an array (3-D); SampleError naming the file when it cannot be read."""
    try:
        if is_nifti(path):
            import nibabel

            volume = np.asarray(nibabel.load(str(path)).dataobj)
        else:
            import tifffile

            volume = tifffile.imread(str(path))
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs the extra samtrain[medical] (nibabel, tifffile): {err}"
        ) from err
    except Exception as err:  # nibabel and tifffile raise many types for damaged files
        raise SampleError(path, f"cannot read volume: {type(err).__name__}: {err}") from err
    volume = np.squeeze(volume)
    if volume.ndim != 3:
        raise SampleError(path, f"expected a 3-D volume, got shape {volume.shape}")
    return volume


def read_slice(path: Path, axis: int, index: int) -> np.ndarray:
    """One 2-D slice, reading no more of the file than the format allows (NIfTI: its array proxy;
    TIFF: one page along axis 0)."""
    try:
        if is_nifti(path):
            import nibabel

            proxy = nibabel.load(str(path)).dataobj
            slicer = [slice(None)] * len(proxy.shape)
            slicer[axis] = index
            return np.squeeze(np.asarray(proxy[tuple(slicer)]))
        if axis == 0:
            import tifffile

            return tifffile.imread(str(path), key=index)
    except ImportError:
        raise
    except Exception as err:
        raise SampleError(path, f"cannot read slice {index}: {type(err).__name__}: {err}") from err
    return np.take(read_volume(path), index, axis=axis)


def window_bounds(volume: np.ndarray, window: str | Sequence[float] | None, percentiles: Sequence[float]):
    """(low, high) of the intensity window (see the module docstring)."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown window {window!r}; presets: {sorted(CT_WINDOWS)} or [low, high]")
        level, width = CT_WINDOWS[window]
        return level - width / 2, level + width / 2
    if window is not None:
        low, high = (float(v) for v in window)
        return low, high
    low, high = np.percentile(volume, [float(p) for p in percentiles])
    return float(low), float(high)


def to_rgb(slice_2d: np.ndarray, low: float, high: float) -> np.ndarray:
    """Intensities clipped to [low, high] and scaled to uint8, grey as RGB: (H, W, 3)."""
    span = max(high - low, 1e-12)
    grey = np.clip((slice_2d.astype(np.float64) - low) / span * 255.0, 0, 255)
    return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=2)


def components(labels: np.ndarray, values: Iterable[int], connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Every connected component of every label value: masks bool (K, H, W), values int64 (K,)."""
    masks, kinds = [], []
    for value in values:
        count, comp = cv2.connectedComponents((labels == value).astype(np.uint8), connectivity=connectivity)
        masks += [comp == c for c in range(1, count)]
        kinds += [value] * (count - 1)
    if not masks:
        return np.zeros((0, *labels.shape), dtype=bool), np.zeros(0, dtype=np.int64)
    return np.stack(masks), np.asarray(kinds, dtype=np.int64)


class VolumeSliceDataset(SamDataset):
    """2-D slices of paired image and label volumes (see the module docstring).

    Raw samples: ``{"image": uint8 (H, W, 3), "masks": bool (K, H, W), "image_id": int,
    "labels": int64 (K,)}``; ``labels`` index :attr:`categories` (``"label <value>"`` for each
    label value found, ascending; :attr:`label_value_list` holds the values).

    Args:
        image_dir, label_dir: the image and label volumes.
        image_suffix: what image names add to the case name (nnU-Net: ``"_0000"``).
        axis: the slicing axis of the arrays (None: last for NIfTI, 0 for TIFF).
        window: a CT preset name, ``[low, high]``, or None for ``percentiles`` of each volume.
        percentiles: the (low, high) percentiles of the default window.
        label_values: the label values that make objects (None: every non-zero value).
        connectivity: 4 or 8, the neighbourhood of the connected components.
        min_mask_area: drop objects with fewer pixels than this.
        split, val_fraction, split_seed: optional deterministic train/val split by case (never
            by slice: a case's slices stay together).
        transform: callable on the raw sample, e.g. ``SamTransform``.
    """

    SAMPLE_ARGS = (
        "image_dir",
        "label_dir",
        "image_suffix",
        "axis",
        "window",
        "percentiles",
        "label_values",
        "connectivity",
        "min_mask_area",
        "split",
        "val_fraction",
        "split_seed",
    )
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        image_dir: str | Path,
        label_dir: str | Path,
        transform: Callable[..., dict] | None = None,
        image_suffix: str = "",
        axis: int | None = None,
        window: str | Sequence[float] | None = None,
        percentiles: Sequence[float] = (0.5, 99.5),
        label_values: Iterable[int] | None = None,
        connectivity: int = 8,
        min_mask_area: int = 1,
        split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        if isinstance(window, str) and window not in CT_WINDOWS:
            raise ValueError(f"unknown window {window!r}; presets: {sorted(CT_WINDOWS)} or [low, high]")
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.transform = transform
        self.image_suffix, self.axis = image_suffix, axis
        self.window = window if window is None or isinstance(window, str) else tuple(float(v) for v in window)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.label_values = None if label_values is None else tuple(int(v) for v in label_values)
        self.connectivity, self.min_mask_area = connectivity, int(min_mask_area)
        self.split, self.val_fraction, self.split_seed = split, float(val_fraction), int(split_seed)
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"volume folder {folder} does not exist or is not a directory")
        cases = select_split(self._pairs(), lambda c: c[0], split, val_fraction, split_seed)
        self.cases: list[dict] = []
        self.items: list[tuple[int, int]] = []  # (case, slice index; -1: the case's problem)
        self.skipped_empty = 0
        self._values: set[int] = set()
        for case in cases:
            self._add_case(*case)
        self.label_value_list = sorted(self._values)
        self.categories = [f"label {v}" for v in self.label_value_list]
        if self.skipped_empty:
            log.info("%s: %d slice(s) without labels skipped", self.label_dir, self.skipped_empty)

    def _pairs(self) -> list[tuple[str, Path | None, Path]]:
        """(case, image volume or None, label volume) for every label volume."""
        images = {}
        for path in self.image_dir.iterdir():
            key = volume_key(path, self.image_suffix)
            if key is not None:
                images[key] = path
        pairs = []
        for path in sorted(self.label_dir.iterdir()):
            key = volume_key(path)
            if key is not None:
                pairs.append((key, images.get(key), path))
        if not pairs:
            raise ValueError(
                f"label folder {self.label_dir} holds no volumes ({', '.join(VOLUME_EXTENSIONS)})"
            )
        return pairs

    def _case_axis(self, label_path: Path) -> int:
        return self.axis if self.axis is not None else (2 if is_nifti(label_path) else 0)

    def _add_case(self, key: str, image_path: Path | None, label_path: Path) -> None:
        case = {"key": key, "image": image_path, "label": label_path, "axis": self._case_axis(label_path)}
        self.cases.append(case)
        try:
            slices = self._inspect(case)
        except SampleError as err:
            case["problem"] = (err.path, err.reason)
            self.items.append((len(self.cases) - 1, -1))
            return
        self.items += [(len(self.cases) - 1, int(k)) for k in slices]

    def _inspect(self, case: dict) -> np.ndarray:
        """The case's labelled slice indices (and its window); SampleError for a faulty case."""
        if case["image"] is None:
            raise SampleError(case["label"], f"label volume without an image volume in {self.image_dir}")
        labels = read_volume(case["label"])
        image = read_volume(case["image"])
        if image.shape != labels.shape:
            raise SampleError(
                case["label"], f"label volume is {labels.shape} but {case['image']} is {image.shape}"
            )
        if case["axis"] not in range(3):
            raise ValueError(f"axis must be 0, 1 or 2 (or None), got {case['axis']}")
        if np.issubdtype(labels.dtype, np.floating) and not np.array_equal(labels, np.round(labels)):
            raise SampleError(case["label"], "label volume holds non-integer values")
        case["window"] = window_bounds(image, self.window, self.percentiles)
        objects = self._object_voxels(labels)
        self._values.update(int(v) for v in np.unique(labels[objects]))
        other = tuple(a for a in range(3) if a != case["axis"])
        labelled = np.flatnonzero(objects.any(axis=other))
        self.skipped_empty += labels.shape[case["axis"]] - len(labelled)
        return labelled

    def _object_voxels(self, labels: np.ndarray) -> np.ndarray:
        if self.label_values is None:
            return labels != 0
        return np.isin(labels, self.label_values)

    def __len__(self) -> int:
        return len(self.items)

    def sample_name(self, index: int) -> str:
        case_index, k = self.items[index]
        case = self.cases[case_index]
        return str(case["label"]) if k < 0 else f"{case['image']} [axis {case['axis']}, slice {k}]"

    def source_files(self) -> list[Path]:
        files = {c["label"] for c in self.cases} | {c["image"] for c in self.cases if c["image"] is not None}
        return sorted(files)

    def load_sample(self, index: int) -> dict:
        case_index, k = self.items[index]
        case = self.cases[case_index]
        if k < 0:
            raise SampleError(*case["problem"])
        image = read_slice(case["image"], case["axis"], k)
        labels = np.rint(read_slice(case["label"], case["axis"], k)).astype(np.int64)
        values = [int(v) for v in np.unique(labels[self._object_voxels(labels)])]
        masks, kinds = components(labels, values, self.connectivity)
        kinds = np.searchsorted(self.label_value_list, kinds).astype(np.int64)
        keep = masks.reshape(len(masks), -1).sum(axis=1) >= self.min_mask_area
        return {
            "image": to_rgb(image, *case["window"]),
            "masks": masks[keep],
            "image_id": stable_hash(f"{case['key']}:{case['axis']}:{k}"),
            "labels": kinds[keep],
        }
