"""SAM's preprocessing on the host: the resize-longest-side rule for images, points and boxes,
and the pixel normalisation constants (0-255 RGB)."""

from __future__ import annotations

import numpy as np
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def preprocess_shape(height: int, width: int, long_side: float) -> tuple[int, int]:
    """(h, w) after scaling the longest side to long_side: each side becomes ``int(x * scale + 0.5)``
    as in SAM (not round()), and never 0."""
    scale = long_side * 1.0 / max(height, width)
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """HxWx3 uint8 -> hxwx3 uint8 with the longest side long_side (PIL bilinear, as SAM)."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 2) pixel (x, y) in the original image -> the resized image's frame."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    scaled = np.array(coords, dtype=np.float64, copy=True)
    scaled[..., 0] *= new_w / old_w
    scaled[..., 1] *= new_h / old_h
    return scaled


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 4) xyxy in the original image -> the resized image's frame."""
    corners = scale_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, long_side)
    return corners.reshape(np.shape(boxes))
