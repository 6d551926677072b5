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
    "Sam2Loss",
    "SamLoss",
    "binary_iou",
    "dice_loss",
    "mask_iou",
    "object_score_loss",
    "resize_targets",
    "sam2_loss",
    "sam_loss",
    "sigmoid_focal_loss",
]

IOU_SUPERVISION = ("all", "chosen")
IOU_ERRORS = ("mse", "l1")


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
    return focal_terms(logits, targets, alpha=alpha, gamma=gamma).mean(dim=(-2, -1))


def focal_terms(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float, gamma: float) -> torch.Tensor:
    """The focal loss of every element: logits and float targets of one shape -> that shape.
    ``gamma=0`` and a negative ``alpha`` give plain binary cross-entropy."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = logits.sigmoid()
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


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


def _checked_valid(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    iou_supervision: str,
) -> torch.Tensor:
    """ValueError on inputs of the wrong shapes or an unknown ``iou_supervision``; else ``valid``,
    all True ``(N, M) bool`` when None."""
    if mask_logits.ndim != 4:
        raise ValueError(f"mask_logits must have shape (N, M, h, w), got shape {tuple(mask_logits.shape)}")
    n, m = mask_logits.shape[:2]
    if tuple(iou_pred.shape) != (n, m):
        raise ValueError(f"iou_pred must have shape (N, M) = {(n, m)}, got shape {tuple(iou_pred.shape)}")
    if targets.ndim != 3 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape (N={n}, H, W), got shape {tuple(targets.shape)}")
    if valid is not None and tuple(valid.shape) != (n, m):
        raise ValueError(f"valid must have shape (N, M) = {(n, m)}, got shape {tuple(valid.shape)}")
    if iou_supervision not in IOU_SUPERVISION:
        raise ValueError(f"unknown iou_supervision {iou_supervision!r}; expected one of {IOU_SUPERVISION}")
    return torch.ones(n, m, dtype=torch.bool, device=mask_logits.device) if valid is None else valid


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values (N, M)``, ``index (N,) int64`` -> ``(N,)``; gradient flows to the picked entries only."""
    return values.gather(1, index[:, None]).squeeze(1)


def _per_output_terms(
    mask_logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    focal_weight: float,
    dice_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """focal, dice, true IoU (each (N, M)) of every output, and (N,) the valid output with the
    lowest ``focal_weight * focal + dice_weight * dice`` (the one that takes the mask loss)."""
    logits = mask_logits.float()  # losses in float32 also under autocast
    truth = resize_targets(targets, tuple(logits.shape[-2:]))[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, truth)  # (N, M)
    dice = dice_loss(logits, truth)  # (N, M)
    true_iou = mask_iou(logits, truth)  # (N, M), no grad
    combined = (focal_weight * focal + dice_weight * dice).detach()
    chosen = combined.masked_fill(~valid, float("inf")).argmin(dim=1)
    return focal, dice, true_iou, chosen


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
    valid = _checked_valid(mask_logits, iou_pred, targets, valid, iou_supervision)
    device = mask_logits.device
    row_ok = valid.any(dim=1)

    focal, dice, true_iou, chosen = _per_output_terms(mask_logits, targets, valid, focal_weight, dice_weight)
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


@dataclass
class Sam2Loss(SamLoss):
    """Result of :func:`sam2_loss`: :class:`SamLoss` and ``object_score``, the unweighted
    object-score loss reduced like ``loss`` (detached; 0 without object scores)."""

    object_score: torch.Tensor


def object_score_loss(
    object_score_logits: torch.Tensor, present: torch.Tensor, *, alpha: float = -1.0, gamma: float = 0.0
) -> torch.Tensor:
    """The focal loss of the object-score logit against whether the target has any pixel (SAM 2's
    class loss; its defaults, ``alpha=-1, gamma=0``, make it binary cross-entropy).

    Args:
        object_score_logits: ``(N, 1) float``.
        present: ``(N,) bool``, True where the target mask is not empty.

    Returns:
        ``(N,) float`` loss per mask.
    """
    if object_score_logits.ndim != 2 or object_score_logits.shape[1] != 1:
        raise ValueError(
            f"object_score_logits must have shape (N, 1), got shape {tuple(object_score_logits.shape)}"
        )
    if tuple(present.shape) != (object_score_logits.shape[0],):
        raise ValueError(
            f"present must have shape (N={object_score_logits.shape[0]},), got shape {tuple(present.shape)}"
        )
    logits = object_score_logits.float()
    return focal_terms(logits, present[:, None].to(logits.dtype), alpha=alpha, gamma=gamma).mean(dim=1)


def iou_error(iou_pred: torch.Tensor, true_iou: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise error of predicted IoUs: ``"mse"`` (squared) or ``"l1"`` (absolute)."""
    if kind == "mse":
        return (iou_pred - true_iou) ** 2
    if kind == "l1":
        return (iou_pred - true_iou).abs()
    raise ValueError(f"unknown iou_error {kind!r}; expected one of {IOU_ERRORS}")


def sam2_loss(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    *,
    object_score_logits: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    object_score_weight: float = 1.0,
    iou_error_kind: str = "l1",
    iou_supervision: str = "all",
    object_score_alpha: float = -1.0,
    object_score_gamma: float = 0.0,
    num_masks: float | torch.Tensor | None = None,
) -> Sam2Loss:
    """SAM 2's loss for one decoder pass (sam2 ``training/loss_fns.py``, one step of
    ``MultiStepMultiMasksAndIous``; defaults: the SAM 2.1 training configs).

    As :func:`sam_loss`, the best valid output (lowest ``focal_weight * focal + dice_weight * dice``)
    takes the mask loss and the IoU head learns the true IoU of the valid outputs (``"all"``: their
    mean, ``supervise_all_iou``) or of the chosen one, with an ``"mse"`` or ``"l1"`` error
    (``iou_use_l1_loss``). With ``object_score_logits`` (``pred_obj_scores``) the object-score
    logit learns whether the target has any pixel (:func:`object_score_loss`), and a mask whose
    target is empty takes no mask, dice or IoU loss. Row values are summed and divided by
    ``num_masks`` (clamped to >= 1; SAM 2 counts every object, empty ones included).

    Args:
        mask_logits: ``(N, M, h, w) float`` mask logits (SAM 2 trains on them upsampled to the input).
        iou_pred: ``(N, M) float`` predicted IoUs.
        targets: ``(N, H, W) bool`` (float is thresholded at 0.5); resized to ``(h, w)`` when needed.
        object_score_logits: ``(N, 1) float`` or None (no object-score loss, every target counts).
        valid: ``(N, M) bool`` outputs that count for each row; None = all.
        num_masks: normaliser (float or 0-dim tensor); default the number of rows with a valid output.

    Returns:
        :class:`Sam2Loss`.
    """
    valid = _checked_valid(mask_logits, iou_pred, targets, valid, iou_supervision)
    n, device = mask_logits.shape[0], mask_logits.device
    row_ok = valid.any(dim=1)
    focal, dice, true_iou, chosen = _per_output_terms(mask_logits, targets, valid, focal_weight, dice_weight)

    errors = iou_error(iou_pred.float(), true_iou, iou_error_kind)  # (N, M)
    if iou_supervision == "chosen":
        iou_row = _gather_rows(errors, chosen)
    else:
        weights = valid.to(errors.dtype)
        iou_row = (errors * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    rows = [_gather_rows(focal, chosen), _gather_rows(dice, chosen), iou_row]
    if object_score_logits is None:
        score_row = torch.zeros(n, device=device)
    else:
        truth = targets if targets.dtype == torch.bool else targets > 0.5
        present = truth.flatten(1).any(dim=1)
        score_row = object_score_loss(
            object_score_logits, present, alpha=object_score_alpha, gamma=object_score_gamma
        )
        rows = [row * present for row in rows]  # no mask loss where there is no object

    if num_masks is None:
        num_masks = row_ok.sum()
    denom = torch.as_tensor(num_masks, dtype=torch.float32, device=device).clamp(min=1)

    def reduce(per_row: torch.Tensor) -> torch.Tensor:
        return torch.where(row_ok, per_row, 0).sum() / denom

    focal_red, dice_red, iou_red = (reduce(row) for row in rows)
    score_red = reduce(score_row)
    loss = focal_weight * focal_red + dice_weight * dice_red + iou_weight * iou_red
    if object_score_logits is not None:
        loss = loss + object_score_weight * score_red
    return Sam2Loss(
        loss=loss,
        focal=focal_red.detach(),
        dice=dice_red.detach(),
        iou=iou_red.detach(),
        chosen=chosen,
        true_iou=true_iou,
        object_score=score_red.detach(),
    )
