"""Drawing for pictures of predictions: pure functions on numpy arrays.

Images are ``(H, W, 3) uint8`` RGB; masks ``(H, W) bool``; points ``(x, y)`` with x the column and
y the row, in the pixel frame of the image they are drawn on. Every function returns a new array
and leaves its input unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from samtrain.frame import PIXEL_MEAN, PIXEL_STD
from samtrain.models.sam.prompt_encoder import NEGATIVE, POSITIVE

__all__ = [
    "BACKGROUND_COLOR",
    "BOX_COLOR",
    "GT_COLOR",
    "NEGATIVE_COLOR",
    "POSITIVE_COLOR",
    "PRED_COLOR",
    "draw_box",
    "draw_clicks",
    "label_panel",
    "make_grid",
    "overlay_mask",
    "overlay_masks",
    "pad_to",
    "rescale_image",
    "resize_mask",
    "unnormalize_image",
]


POSITIVE_COLOR = (0, 220, 0)  # green: a click on the object
NEGATIVE_COLOR = (230, 0, 0)  # red: a click on the background
OUTLINE_COLOR = (20, 20, 20)  # the dark ring around a click
GT_COLOR = (255, 200, 0)  # gold: ground truth
PRED_COLOR = (30, 144, 255)  # blue: prediction
BOX_COLOR = (255, 0, 255)  # magenta: the box prompt
BACKGROUND_COLOR = (32, 32, 32)  # grid background and label strips
TEXT_COLOR = (255, 255, 255)


def unnormalize_image(
    image: np.ndarray,
    input_size: Sequence[int] | None = None,
    *,
    mean: Sequence[float] = PIXEL_MEAN,
    std: Sequence[float] = PIXEL_STD,
) -> np.ndarray:
    """A SAM-normalised image back to RGB, without its padding.

    Args:
        image: ``(3, S, S)`` float, ``(x - mean) / std`` of 0-255 RGB (a CPU tensor works too).
        input_size: ``(h, w)`` of the unpadded region; None keeps all of it.
        mean, std: the per-channel normalisation.

    Returns:
        ``(h, w, 3) uint8``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {image.shape}")
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        image = image[:, :h, :w]
    rgb = image * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(round(H*scale), round(W*scale), 3) uint8`` (bilinear, area when shrinking)."""
    if scale == 1:
        return image.copy()
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """``(H, W) bool`` -> ``(round(H*scale), round(W*scale)) bool`` (nearest neighbour)."""
    mask = np.asarray(mask, dtype=bool)
    if scale == 1:
        return mask.copy()
    h, w = mask.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


def pad_to(array: np.ndarray, height: int, width: int, value: Sequence[int] | int = 0) -> np.ndarray:
    """Pad an image ``(h, w, 3)`` or a mask ``(h, w)`` at the right and bottom to ``(height, width, ...)``."""
    h, w = array.shape[:2]
    if h > height or w > width:
        raise ValueError(f"cannot pad {array.shape[:2]} to {(height, width)}")
    out = np.empty((height, width, *array.shape[2:]), array.dtype)
    out[:] = value
    out[:h, :w] = array
    return out


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    color: Sequence[int],
    *,
    alpha: float = 0.45,
    fill: bool = True,
    outline: int = 1,
) -> np.ndarray:
    """Blend ``color`` into the mask (``fill``) and draw its contour (``outline`` px thick, 0: none).

    Args:
        image: ``(H, W, 3) uint8``.
        mask: ``(H, W) bool``.
        color: RGB.
        alpha: weight of ``color`` inside the mask.

    Returns:
        ``(H, W, 3) uint8``; pixels outside the mask and its contour are unchanged.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    out = image.copy()
    if fill and mask.any():
        blended = out[mask].astype(np.float32) * (1 - alpha) + np.asarray(color, np.float32) * alpha
        out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outline > 0 and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), outline)
    return out


def overlay_masks(
    image: np.ndarray,
    *,
    gt: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    alpha: float = 0.45,
    outline: int = 1,
) -> np.ndarray:
    """The prediction filled in ``PRED_COLOR``, then the ground truth's contour in ``GT_COLOR``.

    Args:
        image: ``(H, W, 3) uint8``.
        gt, pred: ``(H, W) bool`` or None.

    Returns:
        ``(H, W, 3) uint8``.
    """
    out = image
    if pred is not None:
        out = overlay_mask(out, pred, PRED_COLOR, alpha=alpha, outline=outline)
    if gt is not None:
        out = overlay_mask(out, gt, GT_COLOR, fill=False, outline=max(1, outline))
    return out.copy() if out is image else out


def draw_clicks(
    image: np.ndarray, points: np.ndarray, labels: np.ndarray, *, radius: int | None = None
) -> np.ndarray:
    """Filled circles with a dark ring: ``POSITIVE_COLOR`` for label 1, ``NEGATIVE_COLOR`` for 0.

    Args:
        image: ``(H, W, 3) uint8``.
        points: ``(T, 2)`` float ``(x, y)`` pixel coordinates (rounded to the nearest pixel).
        labels: ``(T,)`` int; other labels (padding -1, box corners 2/3) are not drawn.
        radius: of the circle in pixels (default: 1/40 of the shorter side, at least 3).

    Returns:
        ``(H, W, 3) uint8``; the pixel at each drawn point has the click's colour.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1)
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    if radius is None:
        radius = max(3, round(min(image.shape[:2]) / 40))
    out = image.copy()
    for (x, y), label in zip(points, labels, strict=True):
        if label not in (NEGATIVE, POSITIVE):
            continue
        center = (round(float(x)), round(float(y)))
        color = POSITIVE_COLOR if label == POSITIVE else NEGATIVE_COLOR
        cv2.circle(out, center, radius, OUTLINE_COLOR, -1, cv2.LINE_AA)
        cv2.circle(out, center, max(1, radius - 1), color, -1, cv2.LINE_AA)
    return out


def draw_box(
    image: np.ndarray, box: Sequence[float], *, color: Sequence[int] = BOX_COLOR, thickness: int = 2
) -> np.ndarray:
    """A rectangle ``(x1, y1, x2, y2)`` with inclusive pixel corners.

    Returns:
        ``(H, W, 3) uint8``.
    """
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    out = image.copy()
    cv2.rectangle(out, (x1, y1), (x2, y2), tuple(int(c) for c in color), thickness)
    return out


def label_panel(panel: np.ndarray, text: str, *, height: int = 20, font_scale: float = 0.45) -> np.ndarray:
    """A strip of ``height`` px with ``text`` on top of the panel.

    Args:
        panel: ``(H, W, 3) uint8``.

    Returns:
        ``(H + height, W, 3) uint8``.
    """
    strip = np.empty((height, panel.shape[1], 3), np.uint8)
    strip[:] = BACKGROUND_COLOR
    (_, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    y = (height + text_h) // 2 - max(0, baseline // 2 - 1)
    cv2.putText(strip, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, TEXT_COLOR, 1, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def make_grid(rows: Sequence[Sequence[np.ndarray]], *, pad: int = 4) -> np.ndarray:
    """Panels in rows and columns, each in a cell of the largest panel's size, top-left aligned.

    Args:
        rows: R rows of panels, each ``(h_i, w_i, 3) uint8``; rows may have different lengths.
        pad: pixels of background between cells and around the grid.

    Returns:
        ``(R * (cell_h + pad) + pad, C * (cell_w + pad) + pad, 3) uint8`` with C the longest row.
    """
    panels = [p for row in rows for p in row]
    if not panels:
        raise ValueError("make_grid needs at least one panel")
    cell_h = max(p.shape[0] for p in panels)
    cell_w = max(p.shape[1] for p in panels)
    n_cols = max(len(row) for row in rows)
    grid = np.empty((len(rows) * (cell_h + pad) + pad, n_cols * (cell_w + pad) + pad, 3), np.uint8)
    grid[:] = BACKGROUND_COLOR
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            grid[y : y + panel.shape[0], x : x + panel.shape[1]] = panel
    return grid
