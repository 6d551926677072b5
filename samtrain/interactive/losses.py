"""SAM's training losses (SAM paper, arXiv 2304.02643, appendix A).

The per-mask functions reduce over the last two (pixel) dimensions only and keep every leading
dimension, so ``(N, M, H, W)`` logits give ``(N, M)`` values. :func:`sam_loss` composes them the
way SAM trains: the best of the valid outputs takes the mask loss, the IoU head regresses the true
IoU of the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "SamLoss",
    "binary_iou",
    "dice_loss",
    "mask_iou",
    "resize_targets",
    "sam_loss",
    "sigmoid_focal_loss",
]

IOU_SUPERVISION = ("all", "chosen")


def _check_pair(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (..., H, W), got shape {tuple(logits.shape)}")
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )


def _as_float_targets(targets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return targets.to(like.dtype if like.dtype.is_floating_point else torch.float32)


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """RetinaNet focal loss (arXiv 1708.02002) per pixel, averaged over the pixels.

    Args:
        logits: ``(..., H, W) float``.
        targets: ``(..., H, W)`` bool or float in [0, 1].
        alpha: weight of the positive class (``1 - alpha`` for the negative); negative disables it.
        gamma: focusing exponent.

    Returns:
        ``(...) float`` loss per mask.
    """
    _check_pair(logits, targets)
    targets = _as_float_targets(targets, logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = logits.sigmoid()
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss ``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid(logits)``.

    Args:
        logits: ``(..., H, W) float``.
        targets: ``(..., H, W)`` bool or float in [0, 1].

    Returns:
        ``(...) float`` loss per mask, in [0, 1).
    """
    _check_pair(logits, targets)
    targets = _as_float_targets(targets, logits)
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(dim=(-2, -1)) + 1
    denominator = prob.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1)) + 1
    return 1 - numerator / denominator


@torch.no_grad()
def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised prediction ``logits > 0`` with the targets (no gradient).

    Args:
        logits: ``(..., H, W) float``.
        targets: ``(..., H, W)`` bool, or float thresholded at 0.5.

    Returns:
        ``(...) float32`` IoU; the union is clamped to >= 1, so two empty masks give 0.
    """
    _check_pair(logits, targets)
    truth = targets if targets.dtype == torch.bool else targets > 0.5
    return binary_iou(logits > 0, truth)


def binary_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks ``(..., H, W)`` -> ``(...) float32``; the union is clamped to >= 1."""
    intersection = (pred & truth).sum(dim=(-2, -1)).to(torch.float32)
    union = (pred | truth).sum(dim=(-2, -1)).to(torch.float32)
    return intersection / union.clamp(min=1)


@dataclass
class SamLoss:
    """Result of :func:`sam_loss`.

    ``loss`` carries the gradient. ``focal``, ``dice`` and ``iou`` are the unweighted components,
    reduced like ``loss`` and detached (for logging). ``chosen`` ``(N,) int64`` is the output that
    took the mask loss, ``true_iou`` ``(N, M) float32`` the IoU of every output with its target.
    """

    loss: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    chosen: torch.Tensor
    true_iou: torch.Tensor


def resize_targets(targets: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize masks with bilinear interpolation (no antialiasing), thresholded at 0.5.

    Args:
        targets: ``(N, H, W)`` bool or float.
        size: ``(h, w)``.

    Returns:
        ``(N, h, w) bool``.
    """
    if tuple(targets.shape[-2:]) == tuple(size):
        return targets if targets.dtype == torch.bool else targets > 0.5
    resized = F.interpolate(
        targets[:, None].to(torch.float32), size=size, mode="bilinear", align_corners=False, antialias=False
    )
    return resized[:, 0] > 0.5


def _check_sam_inputs(
    mask_logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None
) -> None:
    if mask_logits.ndim != 4:
        raise ValueError(f"mask_logits must have shape (N, M, h, w), got shape {tuple(mask_logits.shape)}")
    n, m = mask_logits.shape[:2]
    if tuple(iou_pred.shape) != (n, m):
        raise ValueError(f"iou_pred must have shape (N, M) = {(n, m)}, got shape {tuple(iou_pred.shape)}")
    if targets.ndim != 3 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape (N={n}, H, W), got shape {tuple(targets.shape)}")
    if valid is not None and tuple(valid.shape) != (n, m):
        raise ValueError(f"valid must have shape (N, M) = {(n, m)}, got shape {tuple(valid.shape)}")


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values (N, M)``, ``index (N,) int64`` -> ``(N,)``; gradient flows to the picked entries only."""
    return values.gather(1, index[:, None]).squeeze(1)


def sam_loss(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    iou_supervision: str = "all",
    num_masks: float | torch.Tensor | None = None,
) -> SamLoss:
    """SAM's loss for one decoder pass.

    Per row, the mask loss ``focal_weight * focal + dice_weight * dice`` is taken from the valid
    output where it is lowest (only that output gets mask-loss gradient); the IoU loss is the MSE
    between ``iou_pred`` and the true IoU of the binarised outputs, averaged over the valid outputs
    (``"all"``) or taken for the chosen output only (``"chosen"``). Rows without any valid output
    contribute nothing. Row values are summed and divided by ``num_masks`` (clamped to >= 1).

    Args:
        mask_logits: ``(N, M, h, w) float`` low-res mask logits.
        iou_pred: ``(N, M) float`` predicted IoUs.
        targets: ``(N, H, W) bool`` (float is thresholded at 0.5); resized to ``(h, w)`` when needed.
        valid: ``(N, M) bool`` outputs that count for each row; None = all.
        num_masks: normaliser (float or 0-dim tensor, e.g. all-reduced across DDP ranks); default the
            number of rows with at least one valid output (N when ``valid`` is None).

    Returns:
        :class:`SamLoss`.
    """
    _check_sam_inputs(mask_logits, iou_pred, targets, valid)
    if iou_supervision not in IOU_SUPERVISION:
        raise ValueError(f"unknown iou_supervision {iou_supervision!r}; expected one of {IOU_SUPERVISION}")
    n, m = mask_logits.shape[:2]
    device = mask_logits.device
    if valid is None:
        valid = torch.ones(n, m, dtype=torch.bool, device=device)
    row_ok = valid.any(dim=1)

    logits = mask_logits.float()  # losses in float32 also under autocast
    truth = resize_targets(targets, tuple(logits.shape[-2:]))[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, truth)  # (N, M)
    dice = dice_loss(logits, truth)  # (N, M)
    true_iou = mask_iou(logits, truth)  # (N, M), no grad

    combined = (focal_weight * focal + dice_weight * dice).detach()
    chosen = combined.masked_fill(~valid, float("inf")).argmin(dim=1)
    focal_row = _gather_rows(focal, chosen)
    dice_row = _gather_rows(dice, chosen)

    iou_se = (iou_pred.float() - true_iou) ** 2  # (N, M)
    if iou_supervision == "chosen":
        iou_row = _gather_rows(iou_se, chosen)
    else:
        weights = valid.to(iou_se.dtype)
        iou_row = (iou_se * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    if num_masks is None:
        num_masks = row_ok.sum()
    denom = torch.as_tensor(num_masks, dtype=torch.float32, device=device).clamp(min=1)

    def reduce(per_row: torch.Tensor) -> torch.Tensor:
        return torch.where(row_ok, per_row, 0).sum() / denom

    focal_red, dice_red, iou_red = reduce(focal_row), reduce(dice_row), reduce(iou_row)
    loss = focal_weight * focal_red + dice_weight * dice_red + iou_weight * iou_red
    return SamLoss(
        loss=loss,
        focal=focal_red.detach(),
        dice=dice_red.detach(),
        iou=iou_red.detach(),
        chosen=chosen,
        true_iou=true_iou,
    )
