"""SAM preprocessing and training augmentation (albumentations).

Every dataset returns the sample contract::

    "image":         float32 (3, S, S)  resized (longest side S), normalised, zero-padded
    "masks":         bool (K, S, S)     instance masks aligned with the image, zero-padded
    "input_size":    int64 (2,)         (h, w) after resizing, before padding
    "original_size": int64 (2,)         (h, w) of the original image
    "image_id":      int
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

# albumentations asks PyPI for a newer version at import time; training nodes need no network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

from samtrain import distributed
from samtrain.data.rle import RleMasks
from samtrain.frame import PIXEL_MEAN, PIXEL_STD, resize_longest_side, resize_to_square, resized_shape


def nearest_indices(src: int, dst: int, start: int, length: int) -> np.ndarray:
    """Source index of each destination pixel ``start .. start+length`` when ``src`` pixels are
    resized to ``dst``: pixel centres map to pixel centres (``cv2.INTER_NEAREST_EXACT``). int64 (length,)."""
    centres = (np.arange(start, start + length, dtype=np.float64) + 0.5) * (src / dst)
    return np.minimum(centres.astype(np.int64), src - 1)


FRAMES = ("sam", "square")


class SamResizeCrop(A.DualTransform):
    """Resize the longest side to ``image_size`` (times a random factor when ``scale_range`` is set:
    large-scale jitter), then crop a random window of at most ``image_size x image_size``. With
    ``square`` (SAM 2.1's frame) both sides are resized to ``image_size`` (times the factor), the
    aspect ratio not kept, and the predictor's resize is :func:`samtrain.frame.resize_to_square`.

    Without ``scale_range`` the output size is SAM's (``int(x * scale + 0.5)``) and no crop ever
    happens. The image is resized with cv2, ``INTER_AREA`` when shrinking and ``INTER_LINEAR`` when
    enlarging (fast, for training), or with ``predictor_resize`` by the predictor's own function
    (:func:`samtrain.frame.resize_longest_side`, PIL bilinear like the official SAM code), so the pixels
    are exactly those inference sees. Masks are resized with nearest neighbour, computing only the
    cropped window. Padding is left to the caller.
    """

    def __init__(
        self,
        image_size: int,
        scale_range: tuple[float, float] | None = None,
        predictor_resize: bool = False,
        square: bool = False,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.image_size = int(image_size)
        self.square = bool(square)
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.predictor_resize = bool(predictor_resize)
        if self.predictor_resize and self.scale_range is not None:
            raise ValueError(
                "SamResizeCrop: predictor_resize resizes to image_size only; set scale_range=None"
            )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("image_size", "scale_range", "predictor_resize", "square")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        factor = 1.0 if self.scale_range is None else self.random_generator.uniform(*self.scale_range)
        if self.square:
            new_h = new_w = max(1, int(self.image_size * factor + 0.5))
        else:
            new_h, new_w = resized_shape(height, width, self.image_size * factor)
        crop_h, crop_w = min(new_h, self.image_size), min(new_w, self.image_size)
        y0 = int(self.random_generator.integers(0, new_h - crop_h + 1))
        x0 = int(self.random_generator.integers(0, new_w - crop_w + 1))
        return {"source_hw": (height, width), "resized_hw": (new_h, new_w), "crop": (y0, x0, crop_h, crop_w)}

    def apply(self, img: np.ndarray, resized_hw: tuple, crop: tuple, **params: Any) -> np.ndarray:
        """(H, W, C) -> (crop_h, crop_w, C)."""
        new_h, new_w = resized_hw
        y0, x0, crop_h, crop_w = crop
        if (new_h, new_w) != img.shape[:2]:
            img = self._resize(img, new_h, new_w)
        return img[y0 : y0 + crop_h, x0 : x0 + crop_w]

    def _resize(self, img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
        """uint8 (H, W, C) -> (new_h, new_w, C)."""
        if (
            self.predictor_resize
        ):  # (new_h, new_w) is the frame's shape for image_size: the predictor's resize
            return (
                resize_to_square(img, self.image_size)
                if self.square
                else resize_longest_side(img, self.image_size)
            )
        shrink = new_h * new_w < img.shape[0] * img.shape[1]
        return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    @staticmethod
    def _mask_indices(source_hw: tuple, resized_hw: tuple, crop: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Source rows int64 (crop_h,) and columns int64 (crop_w,) of the output window."""
        y0, x0, crop_h, crop_w = crop
        rows = nearest_indices(source_hw[0], resized_hw[0], y0, crop_h)
        cols = nearest_indices(source_hw[1], resized_hw[1], x0, crop_w)
        return rows, cols

    def apply_to_mask(
        self, mask: np.ndarray, source_hw: tuple, resized_hw: tuple, crop: tuple, **params: Any
    ):
        """(H, W) -> (crop_h, crop_w), nearest neighbour."""
        rows, cols = self._mask_indices(source_hw, resized_hw, crop)
        return mask.take(rows, axis=0).take(cols, axis=1)

    def apply_to_masks(
        self, masks: np.ndarray, source_hw: tuple, resized_hw: tuple, crop: tuple, **params: Any
    ):
        """(K, H, W) -> (K, crop_h, crop_w), nearest neighbour."""
        rows, cols = self._mask_indices(source_hw, resized_hw, crop)
        out = np.empty((len(masks), len(rows), len(cols)), dtype=masks.dtype)
        for k, mask in enumerate(masks):  # per mask: two cache-friendly gathers, C-contiguous result
            out[k] = mask.take(rows, axis=0).take(cols, axis=1)
        return out


def _rng_context() -> tuple[int, int | None]:
    """Identifies the process and DataLoader worker that an RNG belongs to."""
    info = torch.utils.data.get_worker_info()
    return os.getpid(), None if info is None else info.id


def _context_seed() -> list[int]:
    """Seed material for this process: torch's seed (distinct per DataLoader worker and epoch),
    plus the distributed rank in the main process so ranks do not augment in lockstep."""
    seed = [torch.initial_seed()]
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker and distributed.is_initialized():
        seed.append(distributed.rank())
    return seed


class SamTransform:
    """SAM preprocessing (eval) or SAM training augmentation (train) of one raw sample.

    Input: ``{"image": uint8 (H, W, 3) RGB, "masks": (K, H, W) bool/uint8 or a list of (H, W),
    "image_id": int}``. Output: the sample contract of this module.

    Eval: resize longest side to ``image_size`` (``int(x * scale + 0.5)``) with the predictor's
    resize (PIL bilinear, :func:`samtrain.frame.resize_longest_side`: validation scores the pixels
    inference sees), normalise, pad.
    Train: large-scale jitter (rescale by a factor from ``scale_range`` relative to the eval
    size, random crop back to ``image_size``; cv2 resize, faster), horizontal flip, colour jitter.
    In both modes masks that end up with fewer than ``min_mask_area`` pixels, or cover more than
    ``max_mask_fraction`` of the unpadded image, are dropped; then at most ``max_masks`` are kept:
    in training a random subset; in eval a subset that is a function of the image id alone, so
    every epoch, seed, rank and worker scores the same masks of an image.

    Masks may also come run-length encoded (:class:`samtrain.data.rle.RleMasks`, what
    ``SamDataset.load_encoded_sample`` gives): then the image goes through the pipeline alone and
    each mask is decoded straight onto the output grid, only inside its bounding box, never at
    full resolution. The result is identical to passing the decoded masks.

    Randomness (training only): ``__call__(sample, rng=...)`` uses the given numpy Generator;
    otherwise one per process and DataLoader worker, seeded from ``torch.initial_seed()``.
    ``state_dict`` / ``load_state_dict`` save and restore it (a resumed run continues the same
    stream). In eval the output depends on the sample alone: a given ``rng`` is ignored.

    Args:
        image_size: S, the side of the square output.
        train: augment (True) or only preprocess (False).
        max_masks: keep at most this many masks per image (None: all).
        min_mask_area: drop masks with fewer pixels after the transform (>= 1: empty ones always go).
        max_mask_fraction: drop masks covering more than this share of the unpadded image.
        scale_range: large-scale jitter factors (SAM: (0.1, 2.0)); None disables it.
        hflip_prob: probability of a horizontal flip.
        color_jitter: strength c of colour jitter: brightness, contrast and saturation by
            up to c, hue by up to c/4 (0 disables it).
        frame: the model input frame the samples are made in: ``"sam"`` (the longest side resized
            to S, zero-padded) or ``"square"`` (SAM 2.1: both sides resized to S, no padding in
            eval; large-scale jitter scales the square).
    """

    def __init__(
        self,
        *,
        image_size: int,
        train: bool = False,
        max_masks: int | None = 64,
        min_mask_area: int = 1,
        max_mask_fraction: float = 0.9,
        scale_range: Sequence[float] | None = (0.1, 2.0),
        hflip_prob: float = 0.5,
        color_jitter: float = 0.0,
        frame: str = "sam",
    ) -> None:
        self.image_size = int(image_size)
        self.frame = frame
        self.train = bool(train)
        self.max_masks = None if max_masks is None else int(max_masks)
        self.min_mask_area = max(int(min_mask_area), 1)
        self.max_mask_fraction = float(max_mask_fraction)
        self.scale_range = None if scale_range is None else tuple(float(s) for s in scale_range)
        self.hflip_prob = float(hflip_prob)
        self.color_jitter = float(color_jitter)
        self._check_args()
        # The applied parameters (resize/crop window, flip) let RLE masks be decoded onto the output grid.
        self.pipeline = A.Compose(self._steps(), save_applied_params=True)
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple | None = None

    def _check_args(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.max_masks is not None and self.max_masks <= 0:
            raise ValueError(f"max_masks must be positive or None, got {self.max_masks}")
        if not 0.0 < self.max_mask_fraction <= 1.0:
            raise ValueError(f"max_mask_fraction must be in (0, 1], got {self.max_mask_fraction}")
        if self.scale_range is not None and not (
            len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1]
        ):
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")
        if not 0.0 <= self.color_jitter <= 2.0:
            raise ValueError(f"color_jitter must be in [0, 2], got {self.color_jitter}")

    def _steps(self) -> list:
        """The albumentations pipeline: geometry first (resize once), then flip, colour, normalise."""
        square = self.frame == "square"
        if not self.train:
            steps = [SamResizeCrop(self.image_size, predictor_resize=True, square=square)]
        else:
            steps = [SamResizeCrop(self.image_size, scale_range=self.scale_range, square=square)]
            if self.hflip_prob > 0:
                steps.append(A.HorizontalFlip(p=self.hflip_prob))
            if self.color_jitter > 0:
                c = self.color_jitter
                steps.append(
                    A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(c / 4, 0.5), p=1.0)
                )
        steps.append(A.Normalize(mean=PIXEL_MEAN, std=PIXEL_STD, max_pixel_value=1.0))
        return steps

    # -- randomness ---------------------------------------------------------------------------

    def _process_rng(self) -> np.random.Generator:
        """The RNG of this process/worker, created on first use there (forked copies reseed)."""
        key = _rng_context()
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.default_rng(_context_seed())
            self._rng_key = key
        return self._rng

    def state_dict(self) -> dict:
        return {"rng": self._process_rng().bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        self._rng, self._rng_key = rng, _rng_context()

    # -- the transform ------------------------------------------------------------------------

    accepts_rle_masks = True  # SamDataset hands this transform RleMasks (see the class docstring)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        image_id = int(sample["image_id"])
        if isinstance(sample.get("masks"), RleMasks):
            image, masks = _check_image(sample), sample["masks"]
            if masks.shape[1:] != image.shape[:2]:
                raise ValueError(
                    f"image {image_id}: masks {masks.shape} do not match the image {image.shape}"
                )
        else:
            image, masks = _check_sample(sample)
        if not self.train:
            rng = eval_mask_rng(image_id)  # whatever was passed: the same masks every epoch
        elif rng is None:
            rng = self._process_rng()
        if self.train:  # albumentations draws from generators seeded by ours
            seed = int(rng.integers(2**63))
            self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        if isinstance(masks, RleMasks):
            return self._call_rle(image, masks, image_id, rng)
        if len(masks):
            out = self.pipeline(image=image, masks=masks)
            out_image, out_masks = out["image"], out["masks"]
        else:  # some albumentations steps cannot stack zero masks
            out_image = self.pipeline(image=image)["image"]
            out_masks = np.zeros((0, *out_image.shape[:2]), dtype=np.uint8)
        keep = self.select_masks(out_masks, rng)
        return self._pack(out_image, out_masks[keep], image_id, image.shape[:2])

    def _call_rle(self, image: np.ndarray, masks: RleMasks, image_id: int, rng: np.random.Generator) -> dict:
        """The pipeline on the image alone; each mask decoded straight onto the output grid inside
        its bounding box, and only the kept ones written into the padded output. The same random
        draws as the decoded-mask path, so the same result."""
        out = self.pipeline(image=image)
        out_image, applied = out["image"], dict(out["applied_transforms"])
        geometry = applied["SamResizeCrop"]
        rows, cols = SamResizeCrop._mask_indices(
            geometry["source_hw"], geometry["resized_hw"], geometry["crop"]
        )
        windows = masks.resample_windows(rows, cols)
        areas = np.array([np.count_nonzero(w) for _, _, w in windows], dtype=np.int64)
        keep = self._select(areas, out_image.shape[0] * out_image.shape[1], rng)
        sample = self._pack(out_image, np.zeros((0, *out_image.shape[:2]), bool), image_id, image.shape[:2])
        width = out_image.shape[1]
        flipped = "HorizontalFlip" in applied
        out_masks = np.zeros((len(keep), self.image_size, self.image_size), dtype=bool)  # calloc: lazy pages
        for k, index in enumerate(keep):
            i0, j0, window = windows[index]
            if flipped:  # mirror the window and its place
                window, j0 = window[:, ::-1], width - j0 - window.shape[1]
            out_masks[k, i0 : i0 + window.shape[0], j0 : j0 + window.shape[1]] = window
        sample["masks"] = torch.from_numpy(out_masks)
        return sample

    def select_masks(self, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices of the masks to keep, ascending: int64 (k,). masks: (K, h, w) unpadded."""
        areas = np.array([np.count_nonzero(m) for m in masks], dtype=np.int64)
        return self._select(areas, masks.shape[1] * masks.shape[2], rng)

    def _select(self, areas: np.ndarray, image_area: int, rng: np.random.Generator) -> np.ndarray:
        """Indices (ascending, int64 (k,)) of the masks whose ``areas`` (K,) pass the size filters,
        at most ``max_masks`` of them, a random subset. ``image_area``: the unpadded image's pixels."""
        keep = np.flatnonzero((areas >= self.min_mask_area) & (areas <= self.max_mask_fraction * image_area))
        if self.max_masks is not None and len(keep) > self.max_masks:
            keep = np.sort(rng.choice(keep, size=self.max_masks, replace=False))
        return keep

    def _pack(self, image: np.ndarray, masks: np.ndarray, image_id: int, original_hw: tuple) -> dict:
        """Zero-pad image float32 (h, w, 3) and masks (k, h, w) to S x S tensors; build the sample dict."""
        size = self.image_size
        height, width = image.shape[:2]
        image_t = torch.zeros(3, size, size, dtype=torch.float32)
        image_t[:, :height, :width] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        masks_t = _zeros_bool(len(masks), size)
        masks_t[:, :height, :width] = torch.from_numpy(np.ascontiguousarray(masks).view(np.bool_))  # 0/1
        return {
            "image": image_t,
            "masks": masks_t,
            "input_size": torch.tensor([height, width], dtype=torch.int64),
            "original_size": torch.tensor(original_hw, dtype=torch.int64),
            "image_id": image_id,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, train={self.train}, max_masks={self.max_masks}, "
            f"min_mask_area={self.min_mask_area}, max_mask_fraction={self.max_mask_fraction}, "
            f"scale_range={self.scale_range}, hflip_prob={self.hflip_prob}, color_jitter={self.color_jitter}, "
            + ("" if self.frame == "sam" else f"frame={self.frame!r}, ")  # SAM's keys stay as they were
            + f"resize={'cv2' if self.train else 'predictor'})"
        )


def eval_mask_rng(image_id: int) -> np.random.Generator:
    """The generator that picks an eval sample's mask subset: a function of its image id alone
    (numpy's SeedSequence hashes the id; negative ids map to distinct 64-bit seeds)."""
    return np.random.default_rng(int(image_id) % 2**64)


def _zeros_bool(count: int, size: int) -> torch.Tensor:
    """bool (count, size, size) zeros. From numpy's calloc: pages that are never written cost
    nothing, where torch.zeros writes all (64 masks at 1024 px: 64 MB)."""
    return torch.from_numpy(np.zeros((count, size, size), dtype=bool))


def _check_image(sample: dict) -> np.ndarray:
    """The sample's image uint8 (H, W, 3); ValueError when it is something else."""
    image = np.asarray(sample["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image {sample.get('image_id')}: expected uint8 (H, W, 3), got {image.dtype} {image.shape}"
        )
    return image


def _check_sample(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """The sample's image uint8 (H, W, 3) and masks uint8 0/1 (K, H, W); ValueError when malformed."""
    image = _check_image(sample)
    masks = sample.get("masks")
    if masks is None or len(masks) == 0:
        masks = np.zeros((0, *image.shape[:2]), dtype=np.uint8)
    masks = np.asarray(masks) if not isinstance(masks, np.ndarray) else masks
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"image {sample.get('image_id')}: masks {masks.shape} do not match the image {image.shape[:2]}"
        )
    # uint8 holding 0/1 (cv2-based steps do not take bool); a bool input is viewed, not copied.
    return image, (masks if masks.dtype == bool else masks != 0).view(np.uint8)
