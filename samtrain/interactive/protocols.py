"""Interactive evaluation protocols: the RITM/SimpleClick click protocol (as in the SAM paper) and
the box protocol.

Everything happens in the model input frame: the image resized so its longest side is S and
zero-padded right/bottom to S x S. A mask prediction is the low-res logits upsampled bilinearly
(``align_corners=False``) to S x S and thresholded at 0, with the padding (outside the image's
``input_size``) set False; the ground truth is False there too. IoUs are computed on that frame.

Click protocol, per object and batched over all objects:

1. The first click is the RITM centre click of the object (``sample_error_points`` on an empty
   prediction, method ``"center"``); the prediction is the multimask output with the highest
   predicted IoU.
2. Each next click is the RITM centre click of the current error, appended to all previous clicks;
   the previously chosen low-res logits are fed back as the mask prompt; the prediction is the
   single-mask output (index 0).

The model is anything with ``image_size`` and ``decode_masks`` (see :class:`samtrain.models.Sam`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from samtrain.frame import masks_in_frame, valid_regions
from samtrain.interactive.losses import binary_iou
from samtrain.interactive.prompts import masks_to_boxes, sample_error_points

__all__ = [
    "ClickTrace",
    "box_iou",
    "box_prediction",
    "click_curve",
    "evaluate_batch",
    "trace_clicks",
    "trace_interaction",
]

SINGLE_MASK_OUTPUT = 0


def _pick_output(
    logits: torch.Tensor, iou_pred: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits (N, 4, h, w)``, ``iou_pred (N, 4)``, ``index (N,) int64`` -> ``(N, 1, h, w)``, ``(N,)``."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, index][:, None], iou_pred[rows, index]


def _best_multimask_output(iou_pred: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` -> ``(N,) int64`` index in 1..3 of the multimask output with the highest predicted IoU."""
    return iou_pred[:, 1:].argmax(dim=1) + 1


def _prepare(
    model: Any, gt_masks: torch.Tensor, image_indices: torch.Tensor, input_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return the per-mask regions and the GT restricted to them, both ``(N, S, S) bool``."""
    size = model.image_size
    if gt_masks.ndim != 3 or tuple(gt_masks.shape[-2:]) != (size, size):
        raise ValueError(f"gt_masks must have shape (N, {size}, {size}), got {tuple(gt_masks.shape)}")
    if image_indices.shape != gt_masks.shape[:1]:
        raise ValueError(
            f"image_indices must have shape (N,) = {tuple(gt_masks.shape[:1])}, got {tuple(image_indices.shape)}"
        )
    device = gt_masks.device
    regions = valid_regions(input_sizes.to(device), size)[image_indices.to(device)]
    return regions, gt_masks.bool() & regions


def _centre_click(
    gt: torch.Tensor, pred: torch.Tensor, regions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RITM centre click per mask, ``(N, S, S) bool`` each -> ``(N, 1, 2) float32``, ``(N, 1) int64``.

    The padding is neither error nor background (``valid=regions``): the clicks are those on the
    unpadded image, and the negative click that follows a perfect prediction lands inside it too.
    """
    return sample_error_points(gt, pred, method="center", valid=regions)


@dataclass
class ClickTrace:
    """What happened in the click protocol, per mask and click (index k-1: after k clicks)."""

    ious: torch.Tensor  # (N, K) float32
    first_pred_iou: torch.Tensor  # (N,) float32, the IoU head's value for the first click's choice
    coords: torch.Tensor  # (N, K, 2) float32 (x, y)
    labels: torch.Tensor  # (N, K) int64, 1 positive, 0 negative
    masks: torch.Tensor | None  # (N, K, S, S) bool when asked for


@torch.no_grad()
def trace_clicks(
    model: Any,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    image_indices: torch.Tensor,
    input_sizes: torch.Tensor,
    max_clicks: int = 20,
    keep_masks: bool = False,
) -> ClickTrace:
    """The RITM click protocol (see the module docstring), all masks of a batch at once.

    Args:
        model: ``Sam`` (or any object with ``image_size`` and ``decode_masks``).
        image_embeddings: ``(B, C, h, w)`` image-encoder output.
        gt_masks: ``(N, S, S) bool`` in the padded model input frame.
        image_indices: ``(N,) int64`` the image of each mask.
        input_sizes: ``(B, 2) int64`` ``(h, w)`` of each image's unpadded region.
        max_clicks: K.
        keep_masks: also return every prediction (memory: N x K x S x S bools; for pictures).
    """
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
    regions, gt = _prepare(model, gt_masks, image_indices, input_sizes)
    n = gt.shape[0]
    pred = torch.zeros_like(gt)
    coords = gt.new_zeros((n, 0, 2), dtype=torch.float32)
    labels = gt.new_zeros((n, 0), dtype=torch.int64)
    mask_inputs, first_pred_iou, ious, masks = None, None, [], []
    for click in range(max_clicks):
        point, label = _centre_click(gt, pred, regions)
        coords, labels = torch.cat((coords, point), dim=1), torch.cat((labels, label), dim=1)
        logits, iou_pred = model.decode_masks(
            image_embeddings, points=(coords, labels), mask_inputs=mask_inputs, image_indices=image_indices
        )
        if click == 0:
            mask_inputs, first_pred_iou = _pick_output(logits, iou_pred, _best_multimask_output(iou_pred))
        else:
            mask_inputs = logits[:, SINGLE_MASK_OUTPUT : SINGLE_MASK_OUTPUT + 1]
        pred = masks_in_frame(mask_inputs, regions)
        ious.append(binary_iou(pred, gt))
        if keep_masks:
            masks.append(pred)
    return ClickTrace(
        ious=torch.stack(ious, dim=1),
        first_pred_iou=first_pred_iou.float(),
        coords=coords,
        labels=labels,
        masks=torch.stack(masks, dim=1) if keep_masks else None,
    )


def click_curve(
    model: Any,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    image_indices: torch.Tensor,
    input_sizes: torch.Tensor,
    max_clicks: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU after each click of the RITM click protocol: ious ``(N, K) float32`` (column k-1: after
    k clicks) and pred_ious ``(N,) float32``, the IoU head's prediction for the output chosen at the
    first click. Arguments as :func:`trace_clicks`."""
    trace = trace_clicks(
        model,
        image_embeddings,
        gt_masks,
        image_indices=image_indices,
        input_sizes=input_sizes,
        max_clicks=max_clicks,
    )
    return trace.ious, trace.first_pred_iou


@torch.no_grad()
def box_prediction(
    model: Any,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    image_indices: torch.Tensor,
    input_sizes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The single-mask output prompted with each GT mask's tight box (xyxy, inclusive pixel
    extremes, x = column, in the model input frame).

    Returns:
        boxes ``(N, 4) float32``, masks ``(N, S, S) bool``, their IoU with the ground truth ``(N,)``
        and the IoU head's predictions ``(N,)``.
    """
    regions, gt = _prepare(model, gt_masks, image_indices, input_sizes)
    boxes = masks_to_boxes(gt).float()
    logits, iou_pred = model.decode_masks(image_embeddings, boxes=boxes, image_indices=image_indices)
    pred = masks_in_frame(logits[:, SINGLE_MASK_OUTPUT : SINGLE_MASK_OUTPUT + 1], regions)
    return boxes, pred, binary_iou(pred, gt), iou_pred[:, SINGLE_MASK_OUTPUT].float()


def box_iou(
    model: Any,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    image_indices: torch.Tensor,
    input_sizes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU of the box-prompted prediction ``(N,) float32`` and the IoU head's prediction ``(N,)``.
    Arguments as :func:`click_curve`."""
    _, _, ious, pred_ious = box_prediction(
        model, image_embeddings, gt_masks, image_indices=image_indices, input_sizes=input_sizes
    )
    return ious, pred_ious


@torch.no_grad()
def trace_interaction(
    model: Any,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    image_indices: torch.Tensor,
    input_sizes: torch.Tensor,
    num_clicks: int,
) -> dict[str, torch.Tensor]:
    """The box and click protocols, keeping every prompt and prediction (for pictures).

    The same rules as :func:`click_curve` and :func:`box_iou` (centre clicks; the best multimask
    output at the first click, the single-mask output and the fed-back logits after it), for the
    few masks of a picture.

    Args:
        model: ``Sam`` (anything with ``image_size`` and ``decode_masks``).
        image_embeddings: ``(B, C, h, w)``.
        gt_masks: ``(N, S, S) bool`` in the padded model input frame.
        image_indices: ``(N,) int64``.
        input_sizes: ``(B, 2) int64`` ``(h, w)`` of each image's unpadded region.
        num_clicks: K >= 1.

    Returns:
        ``"boxes"`` ``(N, 4) float32`` xyxy with inclusive pixel corners, ``"box_masks"``
        ``(N, S, S) bool``, ``"box_ious"`` ``(N,) float32``; ``"click_coords"`` ``(N, K, 2) float32``
        ``(x, y)``, ``"click_labels"`` ``(N, K) int64`` (1 positive, 0 negative), ``"click_masks"``
        ``(N, K, S, S) bool`` (index k-1: after k clicks), ``"click_ious"`` ``(N, K) float32``.
    """
    kwargs = dict(image_indices=image_indices, input_sizes=input_sizes)
    clicks = trace_clicks(model, image_embeddings, gt_masks, max_clicks=num_clicks, keep_masks=True, **kwargs)
    boxes, box_masks, box_ious, _ = box_prediction(model, image_embeddings, gt_masks, **kwargs)
    return {
        "boxes": boxes,
        "box_masks": box_masks,
        "box_ious": box_ious,
        "click_coords": clicks.coords,
        "click_labels": clicks.labels,
        "click_masks": clicks.masks,
        "click_ious": clicks.ious,
    }


@torch.no_grad()
def evaluate_batch(
    model: Any, batch: dict[str, torch.Tensor], *, max_clicks: int = 20
) -> dict[str, torch.Tensor]:
    """Run the image encoder once (or take the batch's cached embeddings) and both protocols on a
    collated batch.

    Args:
        model: ``Sam``.
        batch: ``"image"`` ``(B, 3, S, S)`` normalised and padded, or ``"image_embedding"``
            ``(B, C, S/16, S/16)`` (cached-embedding mode), ``"masks"`` ``(N, S, S) bool``,
            ``"mask_image_index"`` ``(N,) int64``, ``"input_size"`` ``(B, 2) int64``.
        max_clicks: K.

    Returns:
        ``"ious"`` ``(N, K)``, ``"pred_ious"`` ``(N,)`` (first click), ``"box_ious"`` ``(N,)``,
        ``"box_pred_ious"`` ``(N,)``; all float32. Feed them to
        :class:`samtrain.interactive.metrics.InteractiveMetrics` as
        ``update(ious, box_ious=box_ious, pred_ious=pred_ious)``.
    """
    embeddings = (
        batch["image_embedding"] if "image_embedding" in batch else model.image_encoder(batch["image"])
    )
    kwargs = dict(image_indices=batch["mask_image_index"], input_sizes=batch["input_size"])
    ious, pred_ious = click_curve(model, embeddings, batch["masks"], max_clicks=max_clicks, **kwargs)
    box_ious, box_pred_ious = box_iou(model, embeddings, batch["masks"], **kwargs)
    return {"ious": ious, "pred_ious": pred_ious, "box_ious": box_ious, "box_pred_ious": box_pred_ious}
