"""Interactive-segmentation metrics (RITM / SimpleClick conventions, as used in the SAM paper).

An IoU curve ``ious (N, K)`` holds, per object, the IoU of the prediction after clicks 1..K
(column ``k - 1`` is the IoU after ``k`` clicks). From it:

- NoC@t (number of clicks): the first click count at which IoU >= t; an object that never gets
  there within K clicks counts K.
- NoF@t (number of failures): the objects that never reach IoU >= t within K clicks.
- mIoU@k: the mean IoU after k clicks.

The pure functions below compute these on tensors; :class:`InteractiveMetrics` accumulates the
per-object values across batches (and DDP ranks) and reports them under flat names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "COCO_AREA_RANGES",
    "InteractiveMetrics",
    "boundary_iou",
    "coco_size",
    "failures",
    "iou_calibration_error",
    "mask_boundary",
    "miou_at_clicks",
    "number_of_clicks",
    "protocol_summary",
    "ritm_failures",
    "threshold_name",
]


def _check_curves(ious: torch.Tensor) -> None:
    if ious.ndim != 2 or ious.shape[1] == 0:
        raise ValueError(f"ious must have shape (N, K) with K >= 1, got shape {tuple(ious.shape)}")


def number_of_clicks(ious: torch.Tensor, threshold: float) -> torch.Tensor:
    """Clicks needed to reach ``IoU >= threshold`` (1-based).

    Args:
        ious: ``(N, K) float`` IoU after clicks 1..K.
        threshold: IoU to reach, e.g. 0.9.

    Returns:
        ``(N,) int64`` in ``[1, K]``; objects that never reach the threshold count ``K``.
    """
    _check_curves(ious)
    reached = ious >= threshold
    first = reached.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum
    return torch.where(reached.any(dim=1), first + 1, ious.shape[1]).to(torch.int64)


def failures(ious: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Objects that never reach ``IoU >= threshold`` within the K clicks.

    Args:
        ious: ``(N, K) float``.

    Returns:
        ``(N,) bool``.
    """
    _check_curves(ious)
    return ~(ious >= threshold).any(dim=1)


def miou_at_clicks(ious: torch.Tensor, clicks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Mean IoU after k clicks, for each k in ``clicks`` (1-based, each ``<= K``).

    Args:
        ious: ``(N, K) float``.
        clicks: click counts k.

    Returns:
        ``{k: 0-dim float tensor}``.
    """
    _check_curves(ious)
    num_clicks = ious.shape[1]
    bad = [k for k in clicks if not 1 <= k <= num_clicks]
    if bad:
        raise ValueError(f"clicks must lie in [1, K={num_clicks}], got {bad}")
    return {int(k): ious[:, k - 1].float().mean() for k in clicks}


def iou_calibration_error(pred_iou: torch.Tensor, true_iou: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the IoU head's prediction and the actual IoU.

    Args:
        pred_iou, true_iou: ``(N,) float``.

    Returns:
        0-dim float tensor.
    """
    if pred_iou.shape != true_iou.shape:
        raise ValueError(
            f"pred_iou and true_iou must have the same shape, got {tuple(pred_iou.shape)} "
            f"and {tuple(true_iou.shape)}"
        )
    return (pred_iou.float() - true_iou.float()).abs().mean()


def threshold_name(threshold: float) -> str:
    """0.9 -> "90", 0.85 -> "85" (the suffix of "NoC@90")."""
    return f"{round(threshold * 100):d}"


class InteractiveMetrics(Metric):
    """Accumulates per-object IoU curves, box IoUs and (predicted, true) IoU pairs.

    ``compute()`` returns a flat dict of 0-dim tensors, only for inputs that were given:

    - curves: ``"mIoU@k"`` for each k in ``clicks`` with ``k <= K``; ``"NoC@t"`` (mean NoC) for each
      t in ``noc_thresholds``; ``"NoF@t"`` (number of failing objects, a count) for each t in
      ``nof_thresholds``; t is written as a percentage ("NoC@90").
    - box IoUs: ``"box_mIoU"``.
    - IoU pairs: ``"iou_calibration"`` (mean absolute error of the IoU head).

    All states are concatenated lists, so DDP sync gathers every object.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        *,
        clicks: Sequence[int] = (1, 3, 5, 9),
        noc_thresholds: Sequence[float] = (0.85, 0.9),
        nof_thresholds: Sequence[float] = (0.9,),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.clicks = tuple(int(k) for k in clicks)
        self.noc_thresholds = tuple(float(t) for t in noc_thresholds)
        self.nof_thresholds = tuple(float(t) for t in nof_thresholds)
        for name in ("curves", "box_ious", "pred_ious", "true_ious"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        curves: torch.Tensor | None = None,
        *,
        box_ious: torch.Tensor | None = None,
        pred_ious: torch.Tensor | None = None,
        true_ious: torch.Tensor | None = None,
    ) -> None:
        """Add objects.

        Args:
            curves: ``(N, K) float`` IoU after clicks 1..K (K the same in every update).
            box_ious: ``(M,) float`` IoU of box-prompted predictions.
            pred_ious, true_ious: ``(P,) float`` IoU-head predictions and the actual IoUs; when
                ``true_ious`` is None it defaults to the first-click IoU ``curves[:, 0]``.
        """
        if curves is not None:
            self._add_curves(curves)
        if box_ious is not None:
            self.box_ious.append(box_ious.detach().float().flatten())
        if pred_ious is not None:
            self._add_iou_pairs(pred_ious, true_ious, curves)

    def _add_curves(self, curves: torch.Tensor) -> None:
        _check_curves(curves)
        if self.curves and self.curves[0].shape[1] != curves.shape[1]:
            raise ValueError(
                f"curves have K={curves.shape[1]} clicks, earlier ones K={self.curves[0].shape[1]}"
            )
        self.curves.append(curves.detach().float())

    def _add_iou_pairs(
        self, pred_ious: torch.Tensor, true_ious: torch.Tensor | None, curves: torch.Tensor | None
    ) -> None:
        if true_ious is None:
            if curves is None:
                raise ValueError("pred_ious needs true_ious (or curves, whose first click gives them)")
            true_ious = curves[:, 0]
        if pred_ious.shape != true_ious.shape:
            raise ValueError(
                f"pred_ious and true_ious must have the same shape, got {tuple(pred_ious.shape)} "
                f"and {tuple(true_ious.shape)}"
            )
        self.pred_ious.append(pred_ious.detach().float().flatten())
        self.true_ious.append(true_ious.detach().float().flatten())

    @staticmethod
    def _gathered(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor | None:
        if isinstance(state, list) and not state:
            return None
        return dim_zero_cat(state)

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        curves = self._gathered(self.curves)
        if curves is not None:
            out.update(self._curve_metrics(curves))
        box_ious = self._gathered(self.box_ious)
        if box_ious is not None:
            out["box_mIoU"] = box_ious.mean()
        pred_ious = self._gathered(self.pred_ious)
        if pred_ious is not None:
            out["iou_calibration"] = iou_calibration_error(pred_ious, self._gathered(self.true_ious))
        return out

    def _curve_metrics(self, curves: torch.Tensor) -> dict[str, torch.Tensor]:
        clicks = [k for k in self.clicks if k <= curves.shape[1]]
        out = {f"mIoU@{k}": v for k, v in miou_at_clicks(curves, clicks).items()}
        for t in self.noc_thresholds:
            out[f"NoC@{threshold_name(t)}"] = number_of_clicks(curves, t).float().mean()
        for t in self.nof_thresholds:
            out[f"NoF@{threshold_name(t)}"] = failures(curves, t).sum().float()
        return out


def mask_boundary(masks: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The inner boundary band of Boundary IoU (Cheng et al. 2021): each mask minus its erosion by
    a 3 x 3 kernel applied d times, d = round(ratio x image diagonal) (at least 1), the image
    border counting as background.

    Args:
        masks: ``(N, H, W) bool``.

    Returns:
        ``(N, H, W) bool``.
    """
    height, width = masks.shape[-2:]
    steps = max(round(dilation_ratio * math.hypot(height, width)), 1)
    kernel = np.ones((3, 3), dtype=np.uint8)
    out = np.zeros(masks.shape, dtype=bool)
    for i, mask in enumerate(masks):
        padded = np.pad(mask.astype(np.uint8), 1)
        eroded = cv2.erode(padded, kernel, iterations=steps)[1:-1, 1:-1]
        out[i] = mask & (eroded == 0)
    return out


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Boundary IoU of each prediction with its ground truth: the IoU of their boundary bands
    (:func:`mask_boundary`); 1 where both bands are empty.

    Args:
        pred, gt: ``(N, H, W) bool``.

    Returns:
        ``(N,) float64``.
    """
    pb, gb = mask_boundary(pred, dilation_ratio), mask_boundary(gt, dilation_ratio)
    inter = (pb & gb).reshape(len(pb), -1).sum(1).astype(np.float64)
    union = (pb | gb).reshape(len(pb), -1).sum(1).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def ritm_failures(ious: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """RITM's NoF: objects whose NoC@threshold equals the click limit K (those that reach the
    threshold only at click K count too; :func:`failures` is the other definition).

    Args:
        ious: ``(N, K) float``.

    Returns:
        ``(N,) bool``.
    """
    return number_of_clicks(ious, threshold) == ious.shape[1]


COCO_AREA_RANGES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, math.inf)}


def coco_size(areas: np.ndarray) -> np.ndarray:
    """``(N,)`` mask areas in pixels -> ``(N,)`` str "small" (< 32^2), "medium" (< 96^2) or "large"."""
    areas = np.asarray(areas)
    return np.where(areas < 32**2, "small", np.where(areas < 96**2, "medium", "large"))


def protocol_summary(
    ious: np.ndarray,
    *,
    clicks: Sequence[int] = (1, 3, 5, 9),
    noc_thresholds: Sequence[float] = (0.85, 0.9),
    nof_definition: str = "ritm",
    box_ious: np.ndarray | None = None,
    areas: np.ndarray | None = None,
    oracle_ious: np.ndarray | None = None,
    pred_ious: np.ndarray | None = None,
    boundary_ious: dict[int, np.ndarray] | None = None,
) -> dict[str, float]:
    """The field's numbers over the objects of a benchmark.

    Args:
        ious: ``(N, K)`` IoU after clicks 1..K.
        clicks: k of ``mIoU@k`` (those <= K).
        noc_thresholds: t of ``NoC@t`` and ``NoF@t``.
        nof_definition: ``"ritm"`` (NoC equal to K, RITM's code) or ``"never_reached"``.
        box_ious: ``(N,)`` box-prompt IoUs: ``box_mIoU`` and, with ``areas`` ``(N,)`` (mask pixels),
            ``box_mIoU_small|medium|large`` (COCO's areas; absent for a size with no object).
        oracle_ious: ``(N,)`` best multimask IoU at click 1: ``oracle_mIoU@1``.
        pred_ious: ``(N,)`` the IoU head's value at click 1: ``iou_calibration`` (mean |pred - IoU@1|).
        boundary_ious: ``{k: (N,)}``: ``boundary_mIoU@k``.
    """
    if nof_definition not in ("ritm", "never_reached"):
        raise ValueError(f"nof_definition must be 'ritm' or 'never_reached', got {nof_definition!r}")
    curves = torch.from_numpy(np.asarray(ious, dtype=np.float64))
    _check_curves(curves)
    out = {f"mIoU@{k}": float(curves[:, k - 1].mean()) for k in clicks if k <= curves.shape[1]}
    for t in noc_thresholds:
        name = threshold_name(t)
        out[f"NoC@{name}"] = float(number_of_clicks(curves, t).double().mean())
        fails = ritm_failures(curves, t) if nof_definition == "ritm" else failures(curves, t)
        out[f"NoF@{name}"] = float(fails.sum())
    if box_ious is not None:
        out["box_mIoU"] = float(np.mean(box_ious))
        if areas is not None:
            sizes = coco_size(areas)
            for size in COCO_AREA_RANGES:
                if (sizes == size).any():
                    out[f"box_mIoU_{size}"] = float(np.mean(np.asarray(box_ious)[sizes == size]))
    if oracle_ious is not None:
        out["oracle_mIoU@1"] = float(np.mean(oracle_ious))
    if pred_ious is not None:
        out["iou_calibration"] = float(np.mean(np.abs(np.asarray(pred_ious) - curves[:, 0].numpy())))
    for k, values in (boundary_ious or {}).items():
        out[f"boundary_mIoU@{k}"] = float(np.mean(values))
    return out
