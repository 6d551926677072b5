"""SamPredictor: prompt a SAM model on one image, with the official predictor's semantics."""

from __future__ import annotations

import numpy as np
import torch

from samtrain.models.sam.model import Sam
from samtrain.models.sam2.model import Sam2


class SamPredictor:
    """Embed an image once with ``set_image``, then ``predict`` masks for any number of prompts.

    Coordinates are pixel (x, y) and boxes xyxy in the original image. Point labels are 1
    (foreground), 0 (background) or -1 (padding: a point to ignore, for batches of prompts with
    different numbers of points), as in the official predictor. Unlike it, points and box corners
    outside the image are refused: they nearly always mean coordinates in another frame (the
    resized image, or (row, column) order).

    A :class:`~samtrain.models.sam2.model.Sam2` works the same, with ``SAM2ImagePredictor``'s
    semantics: the model's own frame (``transform_image``, ``transform_coords``,
    ``postprocess_masks``), its output selection (dynamic multimask via stability for a single
    output) and its clamp of the returned low-res logits.
    """

    def __init__(self, sam_model: Sam | Sam2) -> None:
        self.model = sam_model
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """image: (H, W, 3) uint8 in image_format ("RGB" or "BGR")."""
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
        if min(image.shape[:2]) == 0:
            raise ValueError(f"image is empty: shape {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        self.set_torch_image(self.model.transform_image(image), image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """transformed_image: (1, 3, h, w) 0-255, as the model's ``transform_image`` makes it (SAM: the
        longest side resized to the model's size; SAM 2: any size, resized by its preprocess)."""
        input_size = self.model.transformed_input_size(transformed_image, original_image_size)
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = input_size
        self.features = self.model.image_encoder(self.model.preprocess(transformed_image.float()))
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding (1, 256, S/16, S/16) (SAM 2: its ``Sam2ImageFeatures``)."""
        self._require_image()
        return self.features

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt set: point_coords (T, 2), point_labels (T,), box (4,), mask_input (1, S/4, S/4).

        Returns masks (C, H, W), scores (C,), low_res_logits (C, S/4, S/4); C = 3 or 1.
        """
        batched = [
            None if x is None else np.asarray(x)[None] for x in (point_coords, point_labels, box, mask_input)
        ]
        masks, scores, low_res = self.predict_batch(*batched, multimask_output, return_logits)
        return masks[0], scores[0], low_res[0]

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompt sets on the current image in one decoder pass: point_coords (B, T, 2),
        point_labels (B, T), boxes (B, 4), mask_input (B, 1, S/4, S/4).

        Returns masks (B, C, H, W), scores (B, C), low_res_logits (B, C, S/4, S/4).
        """
        self._require_image()
        coords, labels = self._points_to_torch(point_coords, point_labels)
        box_tensor = self._boxes_to_torch(boxes)
        mask_tensor = self._masks_to_torch(mask_input)
        counts = {len(t) for t in (coords, box_tensor, mask_tensor) if t is not None}
        if len(counts) > 1:
            raise ValueError(f"points, boxes and mask inputs give different batch sizes: {sorted(counts)}")
        points = (coords, labels) if coords is not None else None
        masks, scores, low_res = self.predict_torch(
            points, box_tensor, mask_tensor, multimask_output, return_logits
        )
        return masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts already in the model input frame: coords (B, T, 2), labels (B, T), boxes (B, 4),
        mask_input (B, 1, S/4, S/4). Returns masks (B, C, H, W), scores (B, C), low-res (B, C, S/4, S/4)."""
        self._require_image()
        all_masks, all_scores = self.model.decode_masks(
            self.features, points=points, boxes=boxes, mask_inputs=mask_input
        )
        low_res, scores = self.model.mask_decoder.select_outputs(all_masks, all_scores, multimask_output)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        if self.model.low_res_clamp is not None:
            low_res = low_res.clamp(-self.model.low_res_clamp, self.model.low_res_clamp)
        return masks, scores, low_res

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image(...) before predicting")

    def _check_inside(self, xy: np.ndarray, what: str) -> None:
        h, w = self.original_size
        inside = (xy[..., 0] >= 0) & (xy[..., 0] <= w) & (xy[..., 1] >= 0) & (xy[..., 1] <= h)
        if not inside.all():
            raise ValueError(f"{what} lie outside the {w}x{h} image: {xy[~inside][:4].tolist()}")

    def _points_to_torch(self, coords, labels) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if coords is None and labels is None:
            return None, None
        if coords is None or labels is None:
            raise ValueError("point_coords and point_labels must be given together")
        coords, labels = np.asarray(coords, dtype=np.float64), np.asarray(labels)
        if coords.ndim != 3 or coords.shape[-1] != 2:
            raise ValueError(
                f"point_coords must have shape (T, 2) (or (B, T, 2) batched), got {coords.shape[1:]}"
            )
        if labels.shape != coords.shape[:-1]:
            raise ValueError(
                f"point_labels has shape {labels.shape[1:]}, expected {coords.shape[1:-1]} (one per point)"
            )
        if not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError(
                "point_labels must be 1 (foreground), 0 (background) or -1 (padding), "
                f"got {np.unique(labels).tolist()}"
            )
        self._check_inside(coords[labels != -1], "point_coords")
        coords = self.model.transform_coords(coords, self.original_size)
        return (
            torch.as_tensor(coords, dtype=torch.float32, device=self.device),
            torch.as_tensor(labels, dtype=torch.int64, device=self.device),
        )

    def _boxes_to_torch(self, boxes) -> torch.Tensor | None:
        if boxes is None:
            return None
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(
                f"box must have shape (4,) as x1, y1, x2, y2 (or (B, 4) batched), got {boxes.shape[1:]}"
            )
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise ValueError(
                f"boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1, got {boxes.tolist()[:4]}"
            )
        self._check_inside(boxes.reshape(-1, 2, 2), "box corners")
        boxes = self.model.transform_coords(boxes.reshape(-1, 2, 2), self.original_size).reshape(boxes.shape)
        return torch.as_tensor(boxes, dtype=torch.float32, device=self.device)

    def _masks_to_torch(self, mask_input) -> torch.Tensor | None:
        if mask_input is None:
            return None
        mask_input = np.asarray(mask_input, dtype=np.float32)
        expected = (1, *self.model.prompt_encoder.mask_input_size)
        if mask_input.ndim != 4 or mask_input.shape[1:] != expected:
            raise ValueError(
                f"mask_input must have shape {expected} (low-res logits), got {mask_input.shape[1:]}"
            )
        return torch.as_tensor(mask_input, device=self.device)
