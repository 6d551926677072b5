"""Sam2: SAM 2.1's image model (Hiera encoder, prompt encoder, SAM 2 mask decoder), duck-type
compatible with :class:`samtrain.models.sam.model.Sam`, with SAM 2's pre- and postprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samtrain.models.sam.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, PromptEncoder
from samtrain.models.sam2.image_encoder import Sam2ImageEncoder, Sam2ImageFeatures
from samtrain.models.sam2.mask_decoder import Sam2DecoderImage, Sam2MaskDecoder

# SAM2Transforms' normalisation of 0-1 values: SAM's statistics / 255, written as SAM 2 does so the
# float32 values are its own.
PIXEL_MEAN_01 = (0.485, 0.456, 0.406)
PIXEL_STD_01 = (0.229, 0.224, 0.225)


class Sam2(nn.Module):
    """SAM 2.1 on images.

    The model-input frame differs from SAM's: an image of any (H, W) is resized to S x S (bilinear,
    antialiased, on 0-1 values as ``SAM2Transforms``), without padding; point (x, y) scale by
    (S / W, S / H); low-res logits go straight to (H, W) by one bilinear resize. Prompts are
    tokenised as SAM 2 does: box corners first, then the points, then one padding point.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    input_frame: str = "square"  # both sides resized to S, no padding (samtrain.frame.resize_to_square)
    low_res_clamp: float | None = 32.0  # SAM2ImagePredictor clamps the low-res logits it returns

    def __init__(
        self,
        *,
        image_encoder: Sam2ImageEncoder,
        prompt_encoder: PromptEncoder,
        mask_decoder: Sam2MaskDecoder,
        image_size: int,
        variant: str | None = None,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN_01,
        pixel_std: tuple[float, float, float] = PIXEL_STD_01,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.variant = variant
        self.compiled = False
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def compiled_parts(self) -> dict[str, nn.Module]:
        """The submodules ``compile_parts`` compiles: the image encoder and the decoder's heavy blocks."""
        return {
            "image_encoder": self.image_encoder,
            "mask_decoder.transformer": self.mask_decoder.transformer,
            "mask_decoder.output_upscaling": self.mask_decoder.output_upscaling,
        }

    def compile_parts(self, **options: Any) -> None:
        """torch.compile each of ``compiled_parts`` in place (names and keys unchanged)."""
        for module in self.compiled_parts().values():
            module.compile(**options)
        self.compiled = True

    # The model-input frame.

    def transformed_input_size(self, image: torch.Tensor, original_size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) a transformed image (1, 3, H, W) (:meth:`transform_image`) takes in the model
        input: always (S, S)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected a (1, 3, H, W) image, got {tuple(image.shape)}")
        return (self.image_size, self.image_size)

    def transform_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, H, W) float 0-255 on the model's device: :meth:`preprocess`
        resizes it (resizing first would round twice)."""
        image = np.ascontiguousarray(image)  # a BGR flip or a crop is a view torch cannot take
        return torch.as_tensor(image, device=self.device).permute(2, 0, 1).unsqueeze(0).float()

    def transform_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) pixel (x, y) in the original image -> the model input frame."""
        h, w = original_size
        scaled = np.array(coords, dtype=np.float64, copy=True)
        scaled[..., 0] *= self.image_size / w
        scaled[..., 1] *= self.image_size / h
        return scaled

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """0-255 RGB (B, 3, H, W) -> normalised (B, 3, S, S), resized (bilinear, antialiased, on 0-1
        values, as ``SAM2Transforms``) unless it is S x S already."""
        x = x / 255
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits (B, M, S/4, S/4) -> logits at the original size (B, M, H, W): one bilinear
        resize, as ``SAM2Transforms.postprocess_masks`` (input_size is always (S, S) here)."""
        return F.interpolate(masks.float(), tuple(original_size), mode="bilinear", align_corners=False)

    # Decoding.

    @staticmethod
    def feature_levels(features: Sam2ImageFeatures) -> list[torch.Tensor]:
        """The image encoder's output as the tensors an embedding cache stores: the top level
        (B, C, S/16, S/16), then the finer ones (B, C/4, S/8, S/8) and (B, C/8, S/4, S/4)."""
        return features.tensors()

    @staticmethod
    def features_from_levels(levels: list[torch.Tensor]) -> Sam2ImageFeatures:
        """:meth:`feature_levels` back into the image encoder's output."""
        return Sam2ImageFeatures.from_tensors(list(levels))

    def prepare_image(self, features: Sam2ImageFeatures) -> Sam2DecoderImage:
        """Image features -> what the decoder reads, positional encoding projected once; give it to
        :meth:`decode_masks` in place of the features when decoding many times with unchanged weights."""
        return self.mask_decoder.prepare_image(features, self.prompt_encoder.get_dense_pe())

    def prompt_tokens(
        self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Points and boxes as SAM 2's prompt encoder takes them: one (N, T, 2) coords and (N, T) labels,
        the box's corners (labels 2, 3) first."""
        if boxes is None:
            return points
        corners = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=boxes.device).expand(len(corners), 2)
        if points is None:
            return corners, labels
        return torch.cat([corners, points[0]], dim=1), torch.cat([labels, points[1].to(labels.dtype)], dim=1)

    def decode_masks(
        self,
        image: Sam2ImageFeatures | Sam2DecoderImage,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        image_indices: torch.Tensor | None = None,
        pad_points: bool | None = None,
        return_object_scores: bool = False,
    ):
        """Prompt encoder + mask decoder for N prompts over B images, all outputs.

        Args:
            image: features of B images, or :meth:`prepare_image` of them.
            points: coords (N, T, 2) in the model input frame and labels (N, T).
            boxes: (N, 4) xyxy in the model input frame; tokenised before the points.
            mask_inputs: (N, 1, S/4, S/4) logits fed back as the dense prompt.
            image_indices: (N,) the image each prompt belongs to (None: one image, B = 1).
            pad_points: append a padding point (None: always, as SAM 2 does).
            return_object_scores: also return the object-score logits.

        Returns:
            low-res logits (N, 4, S/4, S/4) and IoU predictions (N, 4) (output 0 single-mask,
            1: multimask), and with return_object_scores the object-score logits (N, 1).
        """
        tokens = self.prompt_tokens(points, boxes)
        sparse, dense = self.prompt_encoder(
            points=tokens,
            boxes=None,
            masks=mask_inputs,
            pad_points=True if pad_points is None else pad_points,
        )
        if isinstance(image, Sam2ImageFeatures):
            image = self.prepare_image(image)
        masks, iou_pred, object_scores = self.mask_decoder.decode(image, sparse, dense, image_indices)
        return (masks, iou_pred, object_scores) if return_object_scores else (masks, iou_pred)
