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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from samtrain.frame import (
    masks_in_frame,
    valid_regions,
)
from samtrain.interactive.losses import binary_iou
from samtrain.interactive.metrics import boundary_iou
from samtrain.interactive.prompts import masks_to_boxes, sample_error_points

__all__ = [
    "OUTPUT_CHOICES",
    "PROBABILITY_THRESHOLD",
    "ClickTrace",
    "ImagePrompts",
    "ObjectClicks",
    "SampleResult",
    "box_iou",
    "box_prediction",
    "click_curve",
    "embed_image",
    "evaluate_batch",
    "evaluate_sample",
    "masks_iou",
    "original_boxes",
    "ritm_box_protocol",
    "ritm_click_protocol",
    "ritm_next_clicks",
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


def cached_features(model: Any, batch: dict) -> Any:
    """The image features of a batch read from an embedding cache: its ``"image_embedding"``
    (B, C, S/16, S/16) and any ``"high_res_features"`` (SAM 2.1's finer levels) through the model's
    ``features_from_levels``."""
    return model.features_from_levels([batch["image_embedding"], *batch.get("high_res_features", ())])


@torch.no_grad()
def evaluate_batch(
    model: Any, batch: dict[str, torch.Tensor], *, max_clicks: int = 20
) -> dict[str, torch.Tensor]:
    """Run the image encoder once (or take the batch's cached embeddings) and both protocols on a
    collated batch.

    Args:
        model: ``Sam``.
        batch: ``"image"`` ``(B, 3, S, S)`` normalised and padded, or the cached features
            (:func:`cached_features`), ``"masks"`` ``(N, S, S) bool``,
            ``"mask_image_index"`` ``(N,) int64``, ``"input_size"`` ``(B, 2) int64``.
        max_clicks: K.

    Returns:
        ``"ious"`` ``(N, K)``, ``"pred_ious"`` ``(N,)`` (first click), ``"box_ious"`` ``(N,)``,
        ``"box_pred_ious"`` ``(N,)``; all float32. Feed them to
        :class:`samtrain.interactive.metrics.InteractiveMetrics` as
        ``update(ious, box_ious=box_ious, pred_ious=pred_ious)``.
    """
    embeddings = (
        cached_features(model, batch) if "image_embedding" in batch else model.image_encoder(batch["image"])
    )
    kwargs = dict(image_indices=batch["mask_image_index"], input_sizes=batch["input_size"])
    ious, pred_ious = click_curve(model, embeddings, batch["masks"], max_clicks=max_clicks, **kwargs)
    box_ious, box_pred_ious = box_iou(model, embeddings, batch["masks"], **kwargs)
    return {"ious": ious, "pred_ious": pred_ious, "box_ious": box_ious, "box_pred_ious": box_pred_ious}


# ------------------------------------------------------------------------------------------
# The field's protocol at the original resolution (RITM / SimpleClick; SegNext for SAM)

PROBABILITY_THRESHOLD = 0.49  # RITM: a pixel is foreground when its probability is > 0.49
OUTPUT_CHOICES = ("sam", "oracle", "single")


def ritm_next_clicks(
    gt: np.ndarray, pred: np.ndarray, not_clicked: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """RITM's next click for each object, and ``not_clicked`` updated in place.

    The false-negative and false-positive regions (outside ``ignore``) are each padded by one pixel
    and given their exact L2 distance transform; clicked pixels count 0. The click goes to the
    first (row-major) maximum of the region whose maximum is larger, positive when that is the
    false-negative one (a tie is negative; with no error left at all, pixel (0, 0)).

    Equal distances are equal here: RITM compares OpenCV's float32 distances, whose last bit
    varies between equal distances (and between runs), so its ties fall by chance; these are
    OpenCV's distances rounded to exact squared integers (exact below ~1000 px of distance).

    Args:
        gt, pred, not_clicked: ``(N, H, W) bool`` at the original resolution.
        ignore: ``(N, H, W) bool`` pixels that are neither object nor background, or None.

    Returns:
        ``(N, 2) int64`` clicks as (row, column) and ``(N,) bool`` positive.
    """
    rows_cols = np.zeros((gt.shape[0], 2), dtype=np.int64)
    positive = np.zeros(gt.shape[0], dtype=bool)
    for i in range(gt.shape[0]):
        keep = True if ignore is None else ~ignore[i]
        fn = _squared_distance(gt[i] & ~pred[i] & keep) * not_clicked[i]
        fp = _squared_distance(~gt[i] & pred[i] & keep) * not_clicked[i]
        positive[i] = fn.max() > fp.max()
        chosen = fn if positive[i] else fp
        rows_cols[i] = np.unravel_index(int(np.argmax(chosen)), chosen.shape)
        not_clicked[i, rows_cols[i, 0], rows_cols[i, 1]] = False
    return rows_cols, positive


def _squared_distance(region: np.ndarray) -> np.ndarray:
    """``(H, W) bool`` -> ``(H, W) int64``: the squared distance of each region pixel to the nearest
    pixel outside it, the image border counting as outside (padding by 1 px)."""
    padded = np.pad(region.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    return np.rint(np.square(distance, dtype=np.float64)).astype(np.int64)


def masks_iou(pred: torch.Tensor, gt: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """RITM's IoU, ``(..., H, W) bool`` each -> ``(...) float64``, pixels of ``ignore`` left out;
    1 where prediction and truth are both empty."""
    keep = torch.ones_like(gt) if ignore is None else ~ignore
    inter = (pred & gt & keep).flatten(-2).sum(-1).double()
    union = ((pred | gt) & keep).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class ImagePrompts:
    """A SAM or SAM 2 model on one embedded image, prompted in the original image's pixels.

    The model's own frame maps the original image to its input and back (``transform_coords``,
    ``postprocess_masks``, ``low_res_clamp``: SAM's resize of the longest side with padding, SAM 2's
    square resize), as the predictor does.

    Args:
        model: ``Sam`` or ``Sam2`` (anything with ``decode_masks`` and the frame methods above).
        image_embedding: the image encoder's output for the image, batch of one.
        input_size: (h, w) of the resized image inside the model's input.
        original_size: (H, W) of the image.
    """

    def __init__(
        self,
        *,
        model: Any,
        image_embedding: Any,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> None:
        self.model = model
        self.image = (
            model.prepare_image(image_embedding) if hasattr(model, "prepare_image") else image_embedding
        )
        self.input_size = tuple(int(v) for v in input_size)
        self.original_size = tuple(int(v) for v in original_size)
        self.device = next(model.parameters()).device

    def decode(
        self, coords: np.ndarray, labels: np.ndarray, mask_inputs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """coords ``(N, T, 2)`` pixel (x, y) in the original image, labels ``(N, T)`` (1/0),
        mask_inputs ``(N, 1, S/4, S/4)`` or None -> low-res logits ``(N, 4, S/4, S/4)``, IoU
        predictions ``(N, 4)`` (output 0 the single output, 1: the multimask ones; see
        :meth:`as_predicted`)."""
        scaled = self.model.transform_coords(coords, self.original_size)
        points = (
            torch.as_tensor(scaled, dtype=torch.float32, device=self.device),
            torch.as_tensor(labels, dtype=torch.int64, device=self.device),
        )
        return self.as_predicted(*self.model.decode_masks(self.image, points=points, mask_inputs=mask_inputs))

    def decode_boxes(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes ``(N, 4)`` xyxy pixels of the original image -> low-res logits and IoU predictions."""
        corners = self.model.transform_coords(
            np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), self.original_size
        )
        box_t = torch.as_tensor(corners.reshape(-1, 4), dtype=torch.float32, device=self.device)
        return self.as_predicted(*self.model.decode_masks(self.image, boxes=box_t))

    def as_predicted(
        self, low_res: torch.Tensor, iou_pred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output as the model's predictor chooses it: output 0 the single output the decoder
        selects (SAM 2: the most stable, dynamic multimask via stability; a model without a
        ``mask_decoder`` keeps output 0). (N, 4, S/4, S/4), (N, 4) -> the same shapes, float."""
        low_res, iou_pred = low_res.float(), iou_pred.float()
        decoder = getattr(self.model, "mask_decoder", None)
        if decoder is not None:
            single, single_iou = decoder.select_outputs(low_res, iou_pred, False)
            low_res = torch.cat([single, low_res[:, 1:]], dim=1)
            iou_pred = torch.cat([single_iou, iou_pred[:, 1:]], dim=1)
        return low_res, iou_pred

    def feedback(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits as the model's predictor returns them for the next prompt (SAM 2 clamps
        them to +-32; the masks are made from the unclamped ones, as the predictor makes them)."""
        bound = getattr(self.model, "low_res_clamp", None)
        return low_res if bound is None else low_res.clamp(-bound, bound)

    def logits_at_original_size(self, low_res: torch.Tensor) -> torch.Tensor:
        """``(N, M, S/4, S/4)`` -> ``(N, M, H, W)`` float logits, as the predictor brings them there."""
        return self.model.postprocess_masks(low_res.float(), self.input_size, self.original_size)


@dataclass
class ObjectClicks:
    """The click protocol's record per object and click (index k-1: after k clicks)."""

    coords: np.ndarray  # (N, K, 2) int64 (x, y) pixels of the original image
    labels: np.ndarray  # (N, K) int64, 1 positive, 0 negative
    ious: np.ndarray  # (N, K) float64 IoU with the ground truth at the original resolution
    pred_ious: np.ndarray  # (N, K) float32 the IoU head's value for the chosen output
    oracle_iou: np.ndarray  # (N,) float64 best of the three multimask outputs at the first click
    masks: dict[int, np.ndarray] | None = None  # {k: (N, H, W) bool prediction after k clicks} when asked for


def _choose_output(
    click: int, iou_pred: torch.Tensor, candidate_ious: torch.Tensor | None, choice: str
) -> torch.Tensor:
    """``(N,) int64`` the output index used after click ``click`` (0-based) under ``choice``."""
    if choice == "oracle":
        return candidate_ious.argmax(dim=1) + 1
    if choice == "sam" and click == 0:
        return iou_pred[:, 1:].argmax(dim=1) + 1
    return torch.zeros(iou_pred.shape[0], dtype=torch.int64, device=iou_pred.device)


@torch.no_grad()
def ritm_click_protocol(
    prompts: ImagePrompts,
    gt_masks: torch.Tensor,
    *,
    ignore: torch.Tensor | None = None,
    max_clicks: int = 20,
    threshold: float = PROBABILITY_THRESHOLD,
    output_choice: str = "sam",
    mask_feedback: bool = True,
    keep_masks_at: Sequence[int] = (),
) -> ObjectClicks:
    """The RITM click protocol for the objects of one image, all of them in each decoder pass.

    Click 1 and every next click: :func:`ritm_next_clicks` on the current prediction (empty
    before click 1), appended to the object's clicks. The prediction is the chosen output's
    low-res logits brought to the original size, ``sigmoid > threshold``. ``output_choice``:
    ``"sam"`` the multimask output with the highest predicted IoU at click 1, the single-mask
    output after it (SegNext's SAM evaluation); ``"oracle"`` at every click the multimask output
    closest to the ground truth (the SAM paper's oracle); ``"single"`` always the single output.
    With ``mask_feedback`` the chosen low-res logits are the next pass's mask prompt.

    Args:
        prompts: the model on the embedded image.
        gt_masks: ``(N, H, W) bool`` at the original resolution.
        ignore: ``(N, H, W) bool`` pixels left out of clicks and IoU (RITM's ignore label), or None.
        max_clicks: K.
        threshold: probability above which a pixel is predicted foreground.
        keep_masks_at: click counts k whose predictions are returned (``masks``).
    """
    if output_choice not in OUTPUT_CHOICES:
        raise ValueError(f"output_choice must be one of {OUTPUT_CHOICES}, got {output_choice!r}")
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
    if gt_masks.ndim != 3 or tuple(gt_masks.shape[-2:]) != prompts.original_size:
        raise ValueError(
            f"gt_masks must have shape (N, {prompts.original_size}), got {tuple(gt_masks.shape)}"
        )
    gt = gt_masks.to(prompts.device).bool()
    ignore = None if ignore is None else ignore.to(prompts.device).bool()
    gt_np, ignore_np = gt.cpu().numpy(), None if ignore is None else ignore.cpu().numpy()
    not_clicked = np.ones_like(gt_np)
    n = gt.shape[0]
    pred = np.zeros_like(gt_np)
    coords = np.zeros((n, 0, 2), dtype=np.int64)
    labels = np.zeros((n, 0), dtype=np.int64)
    ious, pred_ious, masks, mask_inputs, oracle_iou = [], [], {}, None, None
    rows = torch.arange(n, device=prompts.device)
    for click in range(max_clicks):
        rows_cols, positive = ritm_next_clicks(gt_np, pred, not_clicked, ignore_np)
        coords = np.concatenate((coords, rows_cols[:, None, ::-1]), axis=1)
        labels = np.concatenate((labels, positive[:, None].astype(np.int64)), axis=1)
        low_res, iou_pred = prompts.decode(coords, labels, mask_inputs)
        candidate_ious = None
        if output_choice == "oracle" or click == 0:
            multi = prompts.logits_at_original_size(low_res[:, 1:]).sigmoid() > threshold
            candidate_ious = masks_iou(multi, gt[:, None], None if ignore is None else ignore[:, None])
            if click == 0:
                oracle_iou = candidate_ious.max(dim=1).values.cpu().numpy()
        index = _choose_output(click, iou_pred, candidate_ious, output_choice)
        chosen = low_res[rows, index][:, None]
        mask = prompts.logits_at_original_size(chosen)[:, 0].sigmoid() > threshold
        ious.append(masks_iou(mask, gt, ignore).cpu().numpy())
        pred_ious.append(iou_pred[rows, index].cpu().numpy())
        pred = mask.cpu().numpy()
        if click + 1 in keep_masks_at:
            masks[click + 1] = pred
        mask_inputs = prompts.feedback(chosen) if mask_feedback else None
    return ObjectClicks(
        coords=coords,
        labels=labels,
        ious=np.stack(ious, axis=1),
        pred_ious=np.stack(pred_ious, axis=1).astype(np.float32),
        oracle_iou=oracle_iou,
        masks=masks if keep_masks_at else None,
    )


@torch.no_grad()
def ritm_box_protocol(
    prompts: ImagePrompts,
    boxes: np.ndarray,
    gt_masks: torch.Tensor,
    *,
    threshold: float = PROBABILITY_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """The single-mask output prompted with each object's box, at the original resolution.

    Args:
        boxes: ``(N, 4)`` xyxy pixels of the original image.
        gt_masks: ``(N, H, W) bool``.

    Returns:
        IoU with the ground truth ``(N,) float64`` and the IoU head's value ``(N,) float32``.
    """
    logits, iou_pred = prompts.decode_boxes(boxes)
    mask = prompts.logits_at_original_size(logits[:, :1])[:, 0].sigmoid() > threshold
    gt = gt_masks.to(prompts.device).bool()
    return masks_iou(mask, gt).cpu().numpy(), iou_pred[:, 0].float().cpu().numpy()


def original_boxes(masks: np.ndarray) -> np.ndarray:
    """``(N, H, W) bool`` -> ``(N, 4) float64`` tight boxes xyxy (inclusive pixel extremes; zeros
    for an empty mask), in the original image, as COCO's GT boxes given as corners."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float64)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
    return boxes


def embed_image(model: Any, image: np.ndarray) -> ImagePrompts:
    """Bring ``(H, W, 3) uint8`` RGB into the model's frame as its predictor does, run the image
    encoder once and return the prompts on it. The model's device is used."""
    tensor = model.transform_image(np.ascontiguousarray(image)).float()
    embedding = model.image_encoder(model.preprocess(tensor))
    return ImagePrompts(
        model=model,
        image_embedding=embedding,
        input_size=model.transformed_input_size(tensor, image.shape[:2]),
        original_size=image.shape[:2],
    )


@dataclass
class SampleResult:
    """The protocols' results for the objects of one image (N objects, K clicks)."""

    clicks: ObjectClicks
    box_ious: np.ndarray  # (N,) float64
    box_pred_ious: np.ndarray  # (N,) float32
    boundary_ious: dict[int, np.ndarray]  # {k: (N,) float64 Boundary IoU after k clicks}


def evaluate_sample(
    model: Any,
    image: np.ndarray,
    masks: np.ndarray,
    *,
    ignore: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    max_clicks: int = 20,
    threshold: float = PROBABILITY_THRESHOLD,
    output_choice: str = "sam",
    mask_feedback: bool = True,
    boundary_clicks: Sequence[int] = (),
    max_pixels_per_pass: int = 2**26,
) -> SampleResult:
    """The click protocol and the box protocol on every object of one image at its original size:
    one image embedding, the objects in passes of at most ``max_pixels_per_pass`` mask pixels.

    Args:
        image: ``(H, W, 3) uint8`` RGB.
        masks: ``(N, H, W) bool`` every object of the image.
        ignore: ``(N, H, W) bool`` or ``(H, W) bool`` pixels neither object nor background, or None.
        boxes: ``(N, 4)`` xyxy ground-truth boxes of the box protocol (None: each mask's tight box).
        boundary_clicks: click counts k after which Boundary IoU is also measured.
        The others as :func:`ritm_click_protocol`.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape} do not match the image {image.shape[:2]}")
    if ignore is not None and np.ndim(ignore) == 2:
        ignore = np.broadcast_to(ignore, masks.shape)
    bad = [k for k in boundary_clicks if not 1 <= k <= max_clicks]
    if bad:
        raise ValueError(f"boundary_clicks must lie in [1, max_clicks={max_clicks}], got {bad}")
    prompts = embed_image(model, image)
    step = max(1, max_pixels_per_pass // max(masks.shape[1] * masks.shape[2], 1))
    parts = []
    for start in range(0, len(masks), step):
        part = slice(start, start + step)
        gt = torch.from_numpy(masks[part])
        ign = None if ignore is None else torch.from_numpy(np.array(ignore[part], dtype=bool))
        clicks = ritm_click_protocol(
            prompts,
            gt,
            ignore=ign,
            max_clicks=max_clicks,
            threshold=threshold,
            output_choice=output_choice,
            mask_feedback=mask_feedback,
            keep_masks_at=tuple(boundary_clicks),
        )
        box = original_boxes(masks[part]) if boxes is None else np.asarray(boxes, dtype=np.float64)[part]
        box_ious, box_pred = ritm_box_protocol(prompts, box, gt, threshold=threshold)
        boundary = {k: boundary_iou(clicks.masks[k], masks[part]) for k in boundary_clicks}
        clicks.masks = None
        parts.append((clicks, box_ious, box_pred, boundary))
    return _joined(parts, boundary_clicks)


def _joined(parts: list, boundary_clicks: Sequence[int]) -> SampleResult:
    """The per-pass results of one image as one :class:`SampleResult`."""
    fields = ("coords", "labels", "ious", "pred_ious", "oracle_iou")
    clicks = ObjectClicks(**{f: np.concatenate([getattr(p[0], f) for p in parts]) for f in fields})
    return SampleResult(
        clicks=clicks,
        box_ious=np.concatenate([p[1] for p in parts]),
        box_pred_ious=np.concatenate([p[2] for p in parts]),
        boundary_ious={k: np.concatenate([p[3][k] for p in parts]) for k in boundary_clicks},
    )
