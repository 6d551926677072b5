"""AutomaticMaskGenerator: segment everything in an image by prompting SAM with a grid of points.

The official ``SamAutomaticMaskGenerator``'s semantics and record format, for any samtrain model
(every variant and image size, with LoRA layers or merged). Per crop of the image, the encoder runs
once and the grid points go through the decoder ``points_per_batch`` at a time; each point gives
its three multimask outputs. A mask is kept when its predicted IoU exceeds ``pred_iou_thresh``,
its stability score (the IoU of the masks thresholded at ``±stability_score_offset`` around the
mask threshold) reaches ``stability_score_thresh``, and (in a crop smaller than the image) its box
keeps away from the crop's inner edges; box NMS removes duplicates within a crop (by predicted
IoU) and between crops (smaller crops first). Unlike the official code, only the masks that pass
the IoU filter are upsampled to full resolution, and masks are kept as pycocotools RLE from the
moment they are thresholded.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms, box_area

from samtrain.inference.predictor import SamPredictor
from samtrain.models.sam.model import Sam
from samtrain.models.sam2.model import Sam2

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
CROP_EDGE_TOLERANCE = 20.0  # px: a box this close to a crop's inner edge was cut by the crop


def point_grid(points_per_side: int) -> np.ndarray:
    """(n * n, 2) points (x, y) in [0, 1]: cell centres of an n x n grid, x varying fastest."""
    centres = (np.arange(points_per_side) + 0.5) / points_per_side
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def layer_point_grids(points_per_side: int, crop_n_layers: int, downscale_factor: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has ``int(points_per_side / downscale_factor**i)`` per side."""
    return [point_grid(int(points_per_side / downscale_factor**i)) for i in range(crop_n_layers + 1)]


def crop_boxes(
    image_size: tuple[int, int], crop_n_layers: int, overlap_ratio: float
) -> list[tuple[tuple[int, int, int, int], int]]:
    """(crop box xyxy, layer) pairs: the whole image (layer 0), then for layer i >= 1 a
    2^i x 2^i grid of overlapping crops; the overlap is ``overlap_ratio`` of the short side in
    layer 1 and halves with each layer."""
    height, width = image_size
    crops = [((0, 0, width, height), 0)]
    for layer in range(1, crop_n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * min(height, width) * 2 / per_side)
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in itertools.product(x0s, y0s):
            crops.append(((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)), layer))
    return crops


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) int64 xyxy with inclusive right/bottom pixel; (0, 0, 0, 0) if empty."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    empty = ~rows.any(dim=1)

    def first_last(present: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(length, device=present.device)
        first = torch.where(present, steps, length).amin(dim=1)
        last = torch.where(present, steps, -1).amax(dim=1)
        return first, last

    top, bottom = first_last(rows, h)
    left, right = first_last(cols, w)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def stability_scores(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """(N, H, W) logits -> (N,): |logits > threshold + offset| / |logits > threshold - offset|."""
    high = (logits > threshold + offset).flatten(1).sum(dim=1, dtype=torch.int64)
    low = (logits > threshold - offset).flatten(1).sum(dim=1, dtype=torch.int64)
    return high / low


def near_crop_edge(
    boxes: torch.Tensor, crop_box: tuple[int, ...], image_box: tuple[int, ...]
) -> torch.Tensor:
    """(N, 4) xyxy in the image frame -> (N,) bool: a side within the tolerance of the crop's edge
    where that edge is not also the image's."""
    crop = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.tensor(image_box, dtype=torch.float32, device=boxes.device)
    boxes = boxes.float()
    at_crop = (boxes - crop).abs() <= CROP_EDGE_TOLERANCE
    at_image = (boxes - image).abs() <= CROP_EDGE_TOLERANCE
    return (at_crop & ~at_image).any(dim=1)


def encode_rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(N, H, W) bool -> pycocotools compressed RLEs (``counts`` bytes)."""
    if len(masks) == 0:
        return []
    # (N, W, H) C-contiguous, transposed to (H, W, N), is the Fortran order pycocotools reads.
    columns = masks.permute(0, 2, 1).contiguous().to("cpu", torch.uint8).numpy()
    return mask_utils.encode(columns.transpose(2, 1, 0))


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> ``{"size": [H, W], "counts": [run lengths]}``, column-major, background first."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


@dataclass
class MaskSet:
    """Masks of one image (or crop) in the image frame: RLEs and per-mask tensors on the CPU.

    iou (N,), stability (N,), boxes (N, 4) xyxy int64, points (N, 2) float64, crops (N, 4) xyxy.
    """

    rles: list[dict[str, Any]] = field(default_factory=list)
    iou: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    stability: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))
    points: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64))
    crops: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.rles)

    @staticmethod
    def cat(sets: list[MaskSet]) -> MaskSet:
        if not sets:
            return MaskSet()
        return MaskSet(
            rles=[rle for s in sets for rle in s.rles],
            **{name: torch.cat([getattr(s, name) for s in sets]) for name in MaskSet.TENSORS},
        )

    def select(self, keep: torch.Tensor) -> MaskSet:
        """The masks at the indices ``keep`` (N',) int64, in that order."""
        keep = keep.cpu()
        return MaskSet(
            rles=[self.rles[i] for i in keep.tolist()],
            **{name: getattr(self, name)[keep] for name in MaskSet.TENSORS},
        )

    TENSORS = ("iou", "stability", "boxes", "points", "crops")


class AutomaticMaskGenerator:
    """Masks for everything in an image, as the official ``SamAutomaticMaskGenerator``.

    Args (the official defaults, chosen for vit_h):
        model: a samtrain :class:`Sam` or :class:`Sam2` in eval mode.
        points_per_side: grid points per side of the (first-layer) grid; None with ``point_grids``.
        points_per_batch: grid points per decoder call (each gives 3 masks); larger is faster on a GPU.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 keeps every mask).
        stability_score_thresh: keep masks whose stability score is at least this (0: all).
        stability_score_offset: the logit offset of the stability score's two thresholds.
        box_nms_thresh: box IoU above which NMS drops a duplicate within one crop.
        crop_n_layers: layers of crops after the whole image; layer i has (2^i)^2 crops.
        crop_nms_thresh: box IoU above which NMS drops a duplicate between crops.
        crop_overlap_ratio: overlap of neighbouring crops in layer 1, as a fraction of the short side.
        crop_n_points_downscale_factor: layer i's grid has points_per_side / factor^i points per side.
        point_grids: explicit grids (n_i, 2) in [0, 1], one per layer, instead of points_per_side.
        min_mask_region_area: remove holes and islands smaller than this (pixels), then NMS again.
        output_mode: "binary_mask" (H, W) bool, "uncompressed_rle" or "coco_rle" segmentations.
    """

    def __init__(
        self,
        model: Sam | Sam2,
        *,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if point_grids is not None and len(point_grids) != crop_n_layers + 1:
            raise ValueError(
                f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs "
                f"{crop_n_layers + 1} (one per layer)"
            )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be at least 1, got {points_per_batch}")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        self.point_grids = (
            [np.asarray(g, dtype=np.float64) for g in point_grids]
            if point_grids is not None
            else layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        )
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @property
    def model(self) -> Sam | Sam2:
        return self.predictor.model

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """image: (H, W, 3) uint8 RGB -> one record per mask, the official format:
        ``segmentation`` (per output_mode), ``area`` (px), ``bbox`` XYWH, ``predicted_iou``,
        ``point_coords`` [[x, y]], ``stability_score``, ``crop_box`` XYWH."""
        masks = self.generate_masks(image)
        return self.records(masks)

    def generate_masks(self, image: np.ndarray) -> MaskSet:
        """The kept masks of an image, as a :class:`MaskSet` (before encoding the records)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an (H, W, 3) uint8 array, got {getattr(image, 'shape', image)}")
        size = image.shape[:2]
        crops = crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        masks = MaskSet.cat([self._crop_masks(image, box, layer) for box, layer in crops])
        if len(crops) > 1 and len(masks):
            # Between crops, prefer the mask from the smaller crop.
            scores = 1 / box_area(masks.crops.float())
            masks = masks.select(self._nms(masks.boxes, scores, self.crop_nms_thresh))
        if self.min_mask_region_area > 0 and len(masks):
            masks = self._remove_small_regions(masks)
        return masks

    def records(self, masks: MaskSet) -> list[dict[str, Any]]:
        """A :class:`MaskSet` -> the official records."""
        records = []
        for i, rle in enumerate(masks.rles):
            x0, y0, x1, y1 = masks.boxes[i].tolist()
            cx0, cy0, cx1, cy1 = masks.crops[i].tolist()
            records.append(
                {
                    "segmentation": self._segmentation(rle),
                    "area": int(mask_utils.area(rle)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "predicted_iou": masks.iou[i].item(),
                    "point_coords": [masks.points[i].tolist()],
                    "stability_score": masks.stability[i].item(),
                    "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
                }
            )
        return records

    def _segmentation(self, rle: dict[str, Any]) -> Any:
        if self.output_mode == "coco_rle":
            return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        mask = mask_utils.decode(rle).astype(bool)
        return mask if self.output_mode == "binary_mask" else uncompressed_rle(mask)

    def _crop_masks(self, image: np.ndarray, crop_box: tuple[int, int, int, int], layer: int) -> MaskSet:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        self.predictor.set_image(crop)
        decoder_image = self.model.prepare_image(self.predictor.features)
        crop_size = crop.shape[:2]
        points = self.point_grids[layer] * np.array(crop_size[::-1], dtype=np.float64)
        batches = [
            self._batch_masks(decoder_image, points[i : i + self.points_per_batch], crop_box, image.shape[:2])
            for i in range(0, len(points), self.points_per_batch)
        ]
        self.predictor.reset_image()
        masks = MaskSet.cat(batches)
        if not len(masks):
            return masks
        masks = masks.select(self._nms(masks.boxes, masks.iou, self.box_nms_thresh))
        offset = torch.tensor([x0, y0])
        masks.boxes = masks.boxes + offset.repeat(2)
        masks.points = masks.points + offset
        masks.crops = torch.tensor([crop_box], dtype=torch.int64).expand(len(masks), 4).clone()
        return masks

    def _batch_masks(
        self,
        decoder_image: Any,
        points: np.ndarray,
        crop_box: tuple[int, int, int, int],
        image_size: tuple[int, int],
    ) -> MaskSet:
        """points (P, 2) in the crop's pixels -> the masks of theirs that pass the filters, with
        boxes in the crop frame and RLEs in the image frame."""
        predictor, model = self.predictor, self.model
        coords = model.transform_coords(points, predictor.original_size)
        coords = torch.as_tensor(coords, dtype=torch.float32, device=model.device)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=model.device)
        low_res, iou = model.decode_masks(decoder_image, points=(coords, labels))
        low_res, iou = low_res[:, 1:].flatten(0, 1), iou[:, 1:].flatten(0, 1).float()  # multimask outputs
        point_of_mask = torch.as_tensor(np.repeat(points, 3, axis=0))

        keep = torch.arange(len(iou), device=iou.device)
        if self.pred_iou_thresh > 0.0:
            keep = keep[iou > self.pred_iou_thresh]
        if len(keep) == 0:
            return MaskSet()
        logits = model.postprocess_masks(
            low_res[keep, None].float(), predictor.input_size, predictor.original_size
        )[:, 0]
        stability = stability_scores(logits, model.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            stable = stability >= self.stability_score_thresh
            keep, logits, stability = keep[stable], logits[stable], stability[stable]
        masks = logits > model.mask_threshold
        del logits
        boxes = masks_to_boxes(masks)
        x0, y0, x1, y1 = crop_box
        image_box = (0, 0, image_size[1], image_size[0])
        inside = ~near_crop_edge(boxes + boxes.new_tensor([x0, y0, x0, y0]), crop_box, image_box)
        keep, masks, stability, boxes = keep[inside], masks[inside], stability[inside], boxes[inside]
        masks = F.pad(masks, (x0, image_size[1] - x1, y0, image_size[0] - y1))
        return MaskSet(
            rles=encode_rles(masks),
            iou=iou[keep].cpu(),
            stability=stability.float().cpu(),
            boxes=boxes.cpu(),
            points=point_of_mask[keep.cpu()],
            crops=torch.zeros(len(keep), 4, dtype=torch.int64),
        )

    @staticmethod
    def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return batched_nms(boxes.float(), scores.float(), torch.zeros(len(boxes)), iou_threshold=threshold)

    def _remove_small_regions(self, masks: MaskSet) -> MaskSet:
        """Fill holes and drop islands smaller than min_mask_region_area; NMS then prefers the
        masks that needed no change."""
        cleaned, unchanged = [], []
        for rle in masks.rles:
            mask = mask_utils.decode(rle).astype(bool)
            mask, filled = fill_small_regions(mask, self.min_mask_region_area, holes=True)
            mask, dropped = fill_small_regions(mask, self.min_mask_region_area, holes=False)
            cleaned.append(torch.from_numpy(mask))
            unchanged.append(float(not (filled or dropped)))
        stacked = torch.stack(cleaned)
        boxes = masks_to_boxes(stacked)
        keep = self._nms(boxes, torch.tensor(unchanged), max(self.box_nms_thresh, self.crop_nms_thresh))
        changed = [i for i in keep.tolist() if not unchanged[i]]
        if changed:
            for i, rle in zip(changed, encode_rles(stacked[changed]), strict=True):
                masks.rles[i] = rle
            masks.boxes[changed] = boxes[changed]
        return masks.select(keep)


def fill_small_regions(mask: np.ndarray, min_area: int, *, holes: bool) -> tuple[np.ndarray, bool]:
    """(H, W) bool -> (mask, changed). holes: fill background regions smaller than min_area;
    otherwise drop foreground regions smaller than it (keeping the largest if all are small).
    Regions are 8-connected."""
    target = (~mask if holes else mask).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(target, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    small = np.flatnonzero(areas < min_area) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    large = np.setdiff1d(np.arange(1, count), small)
    if large.size == 0:
        large = np.array([int(np.argmax(areas)) + 1])
    return np.isin(labels, large), True
