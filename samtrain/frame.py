"""The model-input frame, in one place for data, model, predictor and evaluation.

An image of (H, W) enters a model of input size S resized so its longest side is S (each side
``int(x * S / max(H, W) + 0.5)``, as SAM), normalised with SAM's pixel statistics on 0-255 RGB,
and zero-padded right and bottom to S x S. The unpadded (h, w) is its *valid region*. Points and
boxes scale with the image. The decoder's low-res logits (S/4 x S/4) come back by bilinear
upsampling to S, cropping the padding and, for the original image, resizing to (H, W).
SAM 2.1's frame is a square resize instead (:func:`resize_to_square`): the image fills S x S with
its aspect ratio not kept, and the valid region is all of it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, long_side: float) -> tuple[int, int]:
    """(h, w) after scaling the longest side to long_side: each side becomes ``int(x * scale + 0.5)``
    as in SAM (not round()), and never 0."""
    scale = long_side * 1.0 / max(height, width)
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with the longest side long_side (PIL bilinear, as SAM)."""
    h, w = resized_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """SAM 2's input resize: uint8 (H, W, 3) -> float32 (size, size, 3) 0-255, bilinear and
    antialiased on the float image, the aspect ratio not kept (as ``Sam2.preprocess`` resizes)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, (size, size), mode="bilinear", antialias=True)
    return x[0].permute(1, 2, 0).numpy()


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 2) pixel (x, y) in the original image -> the resized image's frame."""
    old_h, old_w = original_size
    new_h, new_w = resized_shape(old_h, old_w, long_side)
    scaled = np.array(coords, dtype=np.float64, copy=True)
    scaled[..., 0] *= new_w / old_w
    scaled[..., 1] *= new_h / old_h
    return scaled


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 4) xyxy in the original image -> the resized image's frame."""
    corners = scale_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, long_side)
    return corners.reshape(np.shape(boxes))


def pad_to_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, S, S), zeros on the right and at the bottom."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, size - w, 0, size - h))


def valid_regions(input_sizes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 2) int (h, w) of each resized image -> (B, S, S) bool, True on rows < h and columns < w."""
    steps = torch.arange(image_size, device=input_sizes.device)
    rows = steps < input_sizes[:, 0:1]  # (B, S)
    cols = steps < input_sizes[:, 1:2]  # (B, S)
    return rows[:, :, None] & cols[:, None, :]


def upsample_logits(low_res_logits: torch.Tensor, image_size: int) -> torch.Tensor:
    """(..., M, S/4, S/4) -> (..., M, S, S) float: bilinear, ``align_corners=False``."""
    lead = low_res_logits.shape[:-3]
    flat = low_res_logits.reshape(-1, *low_res_logits.shape[-3:]).float()
    up = F.interpolate(flat, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return up.reshape(*lead, *up.shape[-3:])


def masks_in_frame(
    low_res_logits: torch.Tensor, regions: torch.Tensor, threshold: float = 0.0
) -> torch.Tensor:
    """(N, 1, S/4, S/4) logits -> (N, S, S) bool masks in the model-input frame: upsampled logits
    above ``threshold``, False outside each mask's valid region ``regions`` (N, S, S)."""
    logits = upsample_logits(low_res_logits, regions.shape[-1])
    return (logits[:, 0] > threshold) & regions


def logits_at_original_size(
    low_res_logits: torch.Tensor, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """(B, M, S/4, S/4) -> logits at the original image size (B, M, H, W): upsampled to S, the
    padding cropped to ``input_size`` (h, w), resized bilinearly to ``original_size`` (H, W)."""
    up = F.interpolate(low_res_logits, (image_size, image_size), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    return F.interpolate(up, tuple(original_size), mode="bilinear", align_corners=False)
