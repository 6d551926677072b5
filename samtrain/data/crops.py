"""Large images in crops: each sample a random window of a set size holding enough objects.

Microscopy, remote-sensing and pathology images are far larger than the model's input and hold
hundreds of small objects; resizing the whole image would shrink them to nothing. As
micro-sam's ``MinInstanceSampler`` does, :class:`ObjectCropDataset` draws a window of
``crop_size`` uniformly inside the image and accepts it when it holds at least ``min_objects``
objects, retrying up to ``max_tries`` times (then keeping the best window seen). An object cut
by the window is kept when at least ``min_visible_fraction`` of its area lies inside, and its
visible part becomes the mask.

Memory stays bounded by the crop, not the image: masks that come run-length encoded (COCO,
SA-1B: :class:`~samtrain.data.rle.RleMasks`) are only decoded inside the window and inside
each object's bounding box, and at most ``max_objects`` visible objects (a random subset) are
materialised, at the crop's size.

Randomness: in training the window comes from the sample seed (``dataset[(index, seed)]``, so
DDP and resume stay exact); in evaluation (``train=False``) from the image id alone, so every
epoch scores the same crops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from samtrain.data.base import SamDataset
from samtrain.data.rle import RleMasks
from samtrain.interactive.keyed_random import mix_seed


def _crop_shape(crop_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if crop_size is None:
        return None
    if isinstance(crop_size, int):
        return int(crop_size), int(crop_size)
    height, width = (int(v) for v in crop_size)
    return height, width


def visible_parts(masks, y0: int, x0: int, height: int, width: int) -> list[tuple[int, int, np.ndarray]]:
    """Each mask's part inside the window: ``(row, column, bool (h_k, w_k))`` in window
    coordinates, only over the mask's bounding box. ``masks``: RleMasks or bool (K, H, W)."""
    if isinstance(masks, RleMasks):
        return masks.resample_windows(np.arange(y0, y0 + height), np.arange(x0, x0 + width))
    return [(0, 0, np.asarray(m[y0 : y0 + height, x0 : x0 + width], dtype=bool)) for m in masks]


def mask_areas(masks) -> np.ndarray:
    if isinstance(masks, RleMasks):
        return masks.areas()
    return np.asarray(masks).reshape(len(masks), -1).sum(axis=1).astype(np.int64)


class ObjectCropDataset(SamDataset):
    """Crops of ``crop_size`` holding at least ``min_objects`` objects (see the module docstring).

    Args:
        dataset: a samtrain dataset built with ``transform=None`` (its raw samples are cropped).
        crop_size: the window, ``S`` or ``(height, width)``; an image smaller than the window is
            taken whole along that side. None: the whole image (for whole-image evaluation of a
            model trained on crops: set the val dataset's ``crop_size`` to the training one to
            evaluate on crops instead).
        min_objects: objects the window must hold (micro-sam's ``min_num_instances``).
        min_visible_fraction: the share of an object's area that must lie inside the window for
            it to stay an object.
        max_tries: windows drawn before settling for the one with the most objects.
        max_objects: at most this many visible objects per crop, a random subset (None: all).
        train: draw windows from the sample seed (True) or from the image id (False: evaluation
            on the same crops every epoch).
        transform: callable on the cropped raw sample, e.g. ``SamTransform``.
    """

    SAMPLE_ARGS = (
        "dataset",
        "crop_size",
        "min_objects",
        "min_visible_fraction",
        "max_tries",
        "max_objects",
        "train",
    )
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        dataset: SamDataset,
        crop_size: int | Sequence[int] | None = 1024,
        min_objects: int = 1,
        min_visible_fraction: float = 0.5,
        max_tries: int = 20,
        max_objects: int | None = 64,
        train: bool = True,
        transform: Callable[..., dict] | None = None,
    ) -> None:
        if getattr(dataset, "transform", None) is not None:
            raise ValueError("ObjectCropDataset crops raw samples: build its dataset with transform=None")
        if not 0.0 < float(min_visible_fraction) <= 1.0:
            raise ValueError(f"min_visible_fraction must be in (0, 1], got {min_visible_fraction}")
        self.dataset = dataset
        self.crop_size = _crop_shape(crop_size)
        self.min_objects, self.max_tries = int(min_objects), max(int(max_tries), 1)
        self.min_visible_fraction = float(min_visible_fraction)
        self.max_objects = None if max_objects is None else int(max_objects)
        self.train = bool(train)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_name(self, index: int) -> str:
        name = getattr(self.dataset, "sample_name", None)
        return name(index) if name is not None else str(index)

    def source_files(self) -> list[Path]:
        return list(getattr(self.dataset, "source_files", list)())

    @property
    def skipped_empty(self) -> int:
        return int(getattr(self.dataset, "skipped_empty", 0))

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.load_sample(int(index), seed=seed)
        if self.transform is None:
            return sample
        if seed is None:
            return self.transform(sample)
        return self.transform(sample, rng=np.random.default_rng(mix_seed("transform", int(seed))))

    def load_encoded_sample(self, index: int) -> dict:
        return self.load_sample(index)

    def load_sample(self, index: int, seed: int | None = None) -> dict:
        """A crop of item ``index``: image uint8 (h, w, 3), masks bool (k, h, w) (see the class)."""
        sample = self.dataset.load_encoded_sample(index)
        image_id = int(sample["image_id"])
        if not self.train or seed is None:
            rng = np.random.default_rng(mix_seed("eval crop", image_id) if not self.train else None)
        else:
            rng = np.random.default_rng(mix_seed("crop", int(seed)))
        height, width = self.window_shape(sample["image"].shape[:2])
        y0, x0, keep, parts = self.choose_window(sample["image"].shape[:2], sample["masks"], rng)
        if self.max_objects is not None and len(keep) > self.max_objects:
            keep = np.sort(rng.choice(keep, size=self.max_objects, replace=False))
        masks = np.zeros((len(keep), height, width), dtype=bool)
        for k, i in enumerate(keep):
            row, col, window = parts[i]
            masks[k, row : row + window.shape[0], col : col + window.shape[1]] = window
        out = {
            "image": np.ascontiguousarray(sample["image"][y0 : y0 + height, x0 : x0 + width]),
            "masks": masks,
            "image_id": image_id,
            "crop_box": (x0, y0, x0 + width, y0 + height),
        }
        if "labels" in sample:
            out["labels"] = np.asarray(sample["labels"])[keep]
        return out

    def window_shape(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the windows of an image of ``image_hw``."""
        if self.crop_size is None:
            return int(image_hw[0]), int(image_hw[1])
        return min(self.crop_size[0], int(image_hw[0])), min(self.crop_size[1], int(image_hw[1]))

    def choose_window(self, image_hw: tuple[int, int], masks, rng: np.random.Generator):
        """(y0, x0, kept object indices int64 (k,), visible parts) of the accepted window: the first
        of ``max_tries`` uniform windows with ``min_objects`` kept objects, else the best one."""
        height, width = self.window_shape(image_hw)
        areas = mask_areas(masks)
        best = None
        for _ in range(self.max_tries):
            y0 = int(rng.integers(0, image_hw[0] - height + 1))
            x0 = int(rng.integers(0, image_hw[1] - width + 1))
            parts = visible_parts(masks, y0, x0, height, width)
            visible = np.array([np.count_nonzero(w) for _, _, w in parts], dtype=np.int64)
            keep = np.flatnonzero((visible > 0) & (visible >= self.min_visible_fraction * areas))
            if best is None or len(keep) > len(best[2]):
                best = (y0, x0, keep, parts)
            if len(keep) >= self.min_objects:
                break
        return best
