"""Sam: image encoder + prompt encoder + mask decoder, with SAM's pre- and postprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from samtrain.frame import (
    PIXEL_MEAN,
    PIXEL_STD,
    logits_at_original_size,
    pad_to_square,
    resize_longest_side,
    scale_coords,
)
from samtrain.models.sam.mask_decoder import DecoderImage, MaskDecoder
from samtrain.models.sam.prompt_encoder import PromptEncoder


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"
    input_frame: str = "sam"  # the longest side resized to S, zero-padded (samtrain.frame)
    low_res_clamp: float | None = None  # the predictor's low-res logits are returned as they are

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        variant: str | None = None,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.variant = variant
        self.compiled = False  # set by compile_parts
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def compiled_parts(self) -> dict[str, nn.Module]:
        """The submodules ``compile_parts`` compiles: the encoder and the decoder's heavy blocks.
        The prompt loop around them stays eager (its prompts are drawn from the data)."""
        return {
            "image_encoder": self.image_encoder,
            "mask_decoder.transformer": self.mask_decoder.transformer,
            "mask_decoder.output_upscaling": self.mask_decoder.output_upscaling,
        }

    def compile_parts(self, **options: Any) -> None:
        """torch.compile each of ``compiled_parts`` in place (``nn.Module.compile``), so parameter
        names and state-dict keys stay as they are; ``options`` go to torch.compile."""
        for module in self.compiled_parts().values():
            module.compile(**options)
        self.compiled = True

    def transform_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, h, w) uint8 on the model's device, the longest side resized
        to S (PIL bilinear, as the official ``ResizeLongestSide``)."""
        resized = np.array(resize_longest_side(np.ascontiguousarray(image), self.image_size))
        return torch.as_tensor(resized, device=self.device).permute(2, 0, 1).unsqueeze(0)

    def transformed_input_size(self, image: torch.Tensor, original_size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) a transformed image (1, 3, h, w) takes in the model input; its longest side must be S."""
        if image.ndim != 4 or image.shape[1] != 3 or max(image.shape[2:]) != self.image_size:
            raise ValueError(
                f"expected a (1, 3, h, w) image with longest side {self.image_size}, got {tuple(image.shape)}"
            )
        return int(image.shape[-2]), int(image.shape[-1])

    def transform_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) pixel (x, y) in the original image -> the model input frame."""
        return scale_coords(coords, original_size, self.image_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resized 0-255 RGB (B, 3, h, w) -> normalised and zero-padded (B, 3, S, S)."""
        return pad_to_square((x - self.pixel_mean) / self.pixel_std, self.image_size)

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits (B, M, S/4, S/4) -> logits at the original image size (B, M, H, W)."""
        return logits_at_original_size(masks, self.image_size, input_size, original_size)

    @staticmethod
    def feature_levels(image_embeddings: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder's output as the tensors an embedding cache stores: [(B, C, h, w)]."""
        return [image_embeddings]

    @staticmethod
    def features_from_levels(levels: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`feature_levels` back into the image encoder's output."""
        (image_embeddings,) = levels
        return image_embeddings

    def prepare_image(self, image_embeddings: torch.Tensor) -> DecoderImage:
        """(B, C, h, w) -> what the decoder reads; give it to :meth:`decode_masks` in place of
        the embeddings when decoding them many times with unchanged weights (the 11 passes of a
        training step): the positional encoding is then projected once, not in every call."""
        return self.mask_decoder.prepare_image(image_embeddings, self.prompt_encoder.get_dense_pe())

    def decode_masks(
        self,
        image_embeddings: torch.Tensor | DecoderImage,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        image_indices: torch.Tensor | None = None,
        pad_points: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for N prompts over B image embeddings, all outputs.

        Args:
            image_embeddings: (B, C, h, w), or :meth:`prepare_image` of them.
            points: coords (N, T, 2) in the model input frame and labels (N, T).
            boxes: (N, 4) xyxy in the model input frame.
            mask_inputs: (N, 1, 4h, 4w) logits fed back as the dense prompt.
            image_indices: (N,) the image each prompt belongs to (None: one image, B = 1).
            pad_points: see :class:`PromptEncoder` (None: pad points when there is no box).

        Returns:
            low-res logits (N, 4, 4h, 4w) and IoU predictions (N, 4); output 0 is the
            single-mask output, 1: the multimask outputs.
        """
        sparse, dense = self.prompt_encoder(
            points=points, boxes=boxes, masks=mask_inputs, pad_points=pad_points
        )
        image = image_embeddings
        if isinstance(image, torch.Tensor):
            image = self.prepare_image(image)
        return self.mask_decoder.decode(image, sparse, dense, image_indices)

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """The official batched inference call: one dict per image with "image" (3, h, w)
        already resized, "original_size" (H, W), and optional "point_coords" (N, T, 2),
        "point_labels" (N, T), "boxes" (N, 4), "mask_inputs" (N, 1, 4h, 4w)."""
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings, strict=True):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou_pred = self.mask_decoder(
                embedding.unsqueeze(0), self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {"masks": masks > self.mask_threshold, "iou_predictions": iou_pred, "low_res_logits": low_res}
            )
        return outputs
