"""COCO run-length encoded masks, decoded only where and when needed.

A COCO RLE lists run lengths of alternating background and foreground pixels in column-major
order (``counts``, the first run background), either as a list of ints ("uncompressed") or as
pycocotools' compressed string. :class:`RleMasks` keeps K masks as run lengths and decodes them
in two ways:

- :meth:`RleMasks.decode`: full resolution, bool (K, H, W), equal to pycocotools' ``decode``;
- :meth:`RleMasks.resample`: straight onto a nearest-neighbour output grid (the rows and columns
  a resize+crop keeps), touching only the part of the grid inside each mask's bounding box. This
  is what makes SA-1B cheap: a 1500x2250 mask is never materialised at full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

_MAX_CHARS_PER_VALUE = 12  # 12 x 5 bits: any run length that fits in int64 without overflow


def decode_rle_string(counts: bytes | str) -> np.ndarray:
    """pycocotools' compressed RLE string -> run lengths int64 (n,). ValueError when malformed.

    The format (pycocotools ``rleFrString``): each value is little-endian 5-bit groups, offset by
    48 as ASCII, bit 0x20 meaning "more groups follow", bit 0x10 of the last group the sign; from
    the fourth value on, each value is stored as the difference to the value two places before.
    """
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("compressed RLE has characters outside the encoding's range")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise ValueError("compressed RLE is cut short (its last value is unfinished)")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHARS_PER_VALUE:
        raise ValueError("compressed RLE holds a value too large for a run length")
    shift = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    # Undo the delta coding: value m (m >= 3) was stored as counts[m] - counts[m - 2].
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def rle_run_lengths(rle: dict, height: int, width: int) -> np.ndarray:
    """Run lengths int64 (n,) of a COCO RLE dict (compressed or not), checked against the image
    size; ValueError saying what is wrong."""
    if not isinstance(rle, dict) or "counts" not in rle:
        raise ValueError(f"expected an RLE dict with 'counts', got {type(rle).__name__}")
    size = rle.get("size")
    if size is not None and [int(s) for s in size] != [height, width]:
        raise ValueError(f"RLE size {list(size)} differs from the image size {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = decode_rle_string(counts)
    elif isinstance(counts, (list, tuple, np.ndarray)):
        runs = np.asarray(counts, dtype=np.int64).reshape(-1)
    else:
        raise ValueError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
    if runs.size and runs.min() < 0:
        raise ValueError("RLE has a negative run length")
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE covers {int(runs.sum())} pixels but the image has {height}x{width}")
    return runs


def _polygon_rle(polygons: list, height: int, width: int) -> dict:
    """COCO polygons (a list of flat [x0, y0, x1, y1, ...] parts) as one compressed RLE."""
    parts = []
    for part in polygons:
        coords = np.asarray(part, dtype=np.float64).reshape(-1) if isinstance(part, list) else None
        if coords is None or coords.size < 6 or coords.size % 2 or not np.isfinite(coords).all():
            size = len(part) if isinstance(part, list) else type(part).__name__
            raise ValueError(f"invalid polygon part ({size} coordinates; need an even number >= 6)")
        parts.append(coords.tolist())
    if not parts:
        raise ValueError("empty polygon list")
    return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))


def segmentation_run_lengths(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as run lengths int64 (n,)."""
    if isinstance(segmentation, list):
        return rle_run_lengths(_polygon_rle(segmentation, height, width), height, width)
    return rle_run_lengths(segmentation, height, width)


def _foreground_runs(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) int64 (m,) of the non-empty foreground runs, column-major flat."""
    bounds = np.cumsum(runs)
    starts, ends = bounds[0:-1:2], bounds[1::2]
    keep = ends > starts
    return starts[keep], ends[keep]


def _first_at_or_after(sorted_values: np.ndarray, value: int | np.ndarray, side: str = "left"):
    return np.searchsorted(sorted_values, value, side=side)


class RleMasks:
    """K binary masks of one (height, width) image, held as COCO run lengths.

    Args:
        runs: one int64 run-length array per mask (see :func:`rle_run_lengths`).
        height, width: the image size the runs cover.
    """

    def __init__(self, runs: Sequence[np.ndarray], height: int, width: int) -> None:
        self.runs = list(runs)
        self.height, self.width = int(height), int(width)

    @classmethod
    def from_segmentations(cls, segmentations: Sequence[Any], height: int, width: int) -> RleMasks:
        """From COCO segmentations; ValueError naming the index of the first bad one."""
        runs = []
        for k, segmentation in enumerate(segmentations):
            try:
                runs.append(segmentation_run_lengths(segmentation, height, width))
            except (ValueError, TypeError) as err:
                raise ValueError(f"segmentation {k}: {err}") from err
        return cls(runs, height, width)

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(K, H, W) of the decoded masks."""
        return (len(self.runs), self.height, self.width)

    def subset(self, indices: Sequence[int] | np.ndarray) -> RleMasks:
        return RleMasks([self.runs[int(i)] for i in indices], self.height, self.width)

    def areas(self) -> np.ndarray:
        """Foreground pixels of each mask: int64 (K,)."""
        return np.array([int(r[1::2].sum()) for r in self.runs], dtype=np.int64)

    def _box(self, starts: np.ndarray, ends: np.ndarray) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of foreground runs given as column-major [start, end)."""
        h = self.height
        last = ends - 1
        x0, x1 = int(starts[0] // h), int(last[-1] // h) + 1
        if np.any(starts // h != last // h):  # a run wraps into the next column: every row is touched
            return 0, h, x0, x1
        return int((starts % h).min()), int((last % h).max()) + 1, x0, x1

    def decode(self) -> np.ndarray:
        """All masks at full resolution: bool (K, H, W), equal to pycocotools' ``decode``."""
        out = np.zeros(self.shape, dtype=bool)
        for k, runs in enumerate(self.runs):
            parity = np.arange(runs.size) % 2 == 1
            out[k] = np.repeat(parity, runs).reshape(self.width, self.height).T
        return out

    def resample(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The masks sampled at source ``rows`` int (h,) and ``cols`` int (w,), both non-decreasing:
        bool (K, h, w), equal to ``decode()[:, rows][:, :, cols]`` but computed only inside each
        mask's bounding box."""
        out = np.zeros((len(self.runs), len(rows), len(cols)), dtype=bool)
        for k, (i0, j0, window) in enumerate(self.resample_windows(rows, cols)):
            out[k, i0 : i0 + window.shape[0], j0 : j0 + window.shape[1]] = window
        return out

    def resample_windows(self, rows: np.ndarray, cols: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Like :meth:`resample`, but per mask only the part of the output grid inside its bounding
        box: ``(i0, j0, window bool (h_k, w_k))`` with the window at output rows ``i0:i0+h_k`` and
        columns ``j0:j0+w_k`` (an empty window when the mask misses the grid)."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        return [self._window(runs, rows, cols) for runs in self.runs]

    def _window(self, runs: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, np.ndarray]:
        """One mask sampled at (rows, cols) within its bounding box: (i0, j0, bool (h_k, w_k))."""
        empty = (0, 0, np.zeros((0, 0), dtype=bool))
        starts, ends = _foreground_runs(runs)
        if starts.size == 0:
            return empty
        y0, y1, x0, x1 = self._box(starts, ends)
        i0, i1 = _first_at_or_after(rows, y0), _first_at_or_after(rows, y1)
        j0, j1 = _first_at_or_after(cols, x0), _first_at_or_after(cols, x1)
        if i0 >= i1 or j0 >= j1:
            return empty
        window_rows = rows[i0:i1]
        window_cols = cols[j0:j1]
        unique_cols, col_index = np.unique(window_cols, return_inverse=True)
        # Output pixels in column-major order over (unique column, row) have strictly increasing
        # source positions, so "the pixels before source position t" is a prefix of that order.
        # Each run boundary t flips every pixel from that prefix's length on; the window is then
        # piecewise constant between flips, written with one np.repeat.
        bounds = np.column_stack((starts, ends)).reshape(-1)  # sorted: runs are disjoint, ordered
        x, y = bounds // self.height, bounds % self.height
        col_pos = np.searchsorted(unique_cols, x, side="left")
        same_col = (col_pos < unique_cols.size) & (
            unique_cols[np.minimum(col_pos, unique_cols.size - 1)] == x
        )
        rows_before = np.where(same_col, np.searchsorted(window_rows, y, side="left"), 0)
        n = window_rows.size * unique_cols.size
        flips = col_pos * window_rows.size + rows_before  # non-decreasing
        positions, times = np.unique(flips[flips < n], return_counts=True)
        positions = positions[times % 2 == 1]  # two flips at one pixel cancel
        lengths = np.diff(np.concatenate(([0], positions, [n])))
        values = np.repeat(np.arange(lengths.size) % 2 == 1, lengths)
        by_col = values.reshape(unique_cols.size, window_rows.size)
        if unique_cols.size != window_cols.size:  # enlarging: repeat whole columns
            by_col = by_col[col_index]
        window = cv2.transpose(by_col.view(np.uint8)).reshape(window_rows.size, window_cols.size)
        return int(i0), int(j0), window.view(bool)
