"""SAM 2's mask decoder: SAM's, with high-resolution features in the upscaling, an object-score
token and head, a sigmoid IoU head, and the stability rule for single-mask outputs."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from samtrain.models.common import MLP, batched_mlp
from samtrain.models.sam.mask_decoder import MaskDecoder, OutputUpscaling
from samtrain.models.sam2.image_encoder import Sam2ImageFeatures


class Sam2DecoderImage(NamedTuple):
    """Image features in the form the SAM 2 decoder reads them (:meth:`Sam2MaskDecoder.prepare_image`);
    valid while the weights do not change."""

    embeddings: torch.Tensor  # (B, h, w, C) channels-last, no_mem_embed added
    skips: tuple[torch.Tensor, torch.Tensor]  # (B, h, w, 2, 2, C/4), (B, h, w, 2, 2, 2, 2, C/8)
    positions: tuple[torch.Tensor, ...]  # TwoWayTransformer.project_image_pe, each (1, hw, C')

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeddings, *self.skips, *self.positions]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> Sam2DecoderImage:
        return cls(tensors[0], (tensors[1], tensors[2]), tuple(tensors[3:]))


class Sam2MaskDecoder(MaskDecoder):
    """Predicts 1 + num_multimask_outputs masks, their IoU and an object score.

    Official layout and names (``obj_score_token``, ``pred_obj_score_head``); the output tokens are
    ordered object score, IoU, masks, as in SAM 2. ``conv_s0``/``conv_s1`` belong to the image
    encoder here (:class:`~samtrain.models.sam2.image_encoder.Sam2ImageEncoder`).

    Args:
        iou_prediction_use_sigmoid: IoU predictions through a sigmoid (SAM 2.1: True).
        pred_obj_scores_mlp: a 3-layer MLP object-score head rather than a linear one (2.1: True).
        dynamic_multimask_via_stability: when one output is asked for, outside training, fall back
            to the best multimask output where the single output is unstable (official predictor: True).
        stability_delta, stability_thresh: that rule's threshold offset and minimum stability.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores_mlp: bool = True,
        dynamic_multimask_via_stability: bool = True,
        stability_delta: float = 0.05,
        stability_thresh: float = 0.98,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            activation=activation,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.iou_prediction_head.sigmoid_output = iou_prediction_use_sigmoid
        self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.pred_obj_score_head = (
            MLP(transformer_dim, transformer_dim, 1, 3)
            if pred_obj_scores_mlp
            else nn.Linear(transformer_dim, 1)
        )
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.stability_delta = stability_delta
        self.stability_thresh = stability_thresh

    def prepare_image(self, features: Sam2ImageFeatures, image_pe: torch.Tensor) -> Sam2DecoderImage:
        """features of B images and image_pe (1, C, h, w) -> a :class:`Sam2DecoderImage`."""
        return Sam2DecoderImage(
            features.image_embed.permute(0, 2, 3, 1).contiguous(),
            (
                OutputUpscaling.image_to_blocks(features.high_res_s1, 1),
                OutputUpscaling.image_to_blocks(features.high_res_s0, 2),
            ),
            self.transformer.project_image_pe(image_pe),
        )

    def decode(
        self,
        image: Sam2DecoderImage,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every output at once.

        Args:
            image: B prepared images; B = 1 broadcasts over the N prompts, otherwise image_indices
                (N,) says which image each prompt reads (or B = N).
            sparse_prompt_embeddings: (N, T, C).
            dense_prompt_embeddings: (N, C, h, w).

        Returns:
            masks (N, num_mask_tokens, 4h, 4w) low-res logits, iou_pred (N, num_mask_tokens) and
            object-score logits (N, 1).
        """
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat(
            [self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight]
        )
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        embeddings, skips = image.embeddings, image.skips
        if image_indices is not None:
            embeddings = embeddings[image_indices]
            skips = tuple(s[image_indices] for s in skips)
        src = (embeddings + dense_prompt_embeddings.permute(0, 2, 3, 1)).contiguous()
        b, h, w, c = src.shape
        hs, src = self.transformer(src.permute(0, 3, 1, 2), None, tokens, image_pos=image.positions)
        object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        iou_pred = self.iou_prediction_head(hs[:, 1, :])
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.reshape(b, h, w, c), skips)  # (N, h, w, 2, 2, 2, 2, C / 8)
        hyper_in = batched_mlp(self.output_hypernetworks_mlps, mask_tokens_out)  # (N, M, C / 8)
        masks = upscaled.reshape(b, 16 * h * w, upscaled.shape[-1]) @ hyper_in.transpose(1, 2)
        masks = OutputUpscaling.blocks_to_image(
            masks.view(b, h, w, 2, 2, 2, 2, hyper_in.shape[1]).movedim(-1, 1)
        )
        return masks, iou_pred, object_score_logits

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(..., H, W) logits -> (...): the IoU of the masks thresholded at +delta and -delta (1 where
        both are empty)."""
        flat = mask_logits.flatten(-2)
        inner = (flat > self.stability_delta).sum(-1).float()
        outer = (flat > -self.stability_delta).sum(-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def select_outputs(
        self, masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All outputs (N, 4, H, W), (N, 4) -> the multimask outputs, or one output per prompt:
        output 0, or (dynamic multimask via stability, outside training) the multimask output of
        highest predicted IoU where output 0's stability is below ``stability_thresh``."""
        if multimask_output or not self.dynamic_multimask_via_stability or self.training:
            return super().select_outputs(masks, iou_pred, multimask_output)
        rows = torch.arange(len(masks), device=masks.device)
        best = iou_pred[:, 1:].argmax(dim=-1) + 1
        stable = self.stability_scores(masks[:, 0]) >= self.stability_thresh  # (N,)
        chosen = torch.where(stable, torch.zeros_like(best), best)
        return masks[rows, chosen].unsqueeze(1), iou_pred[rows, chosen].unsqueeze(1)

    def forward(
        self,
        image_embeddings: Sam2ImageFeatures,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks (N, M, 4h, 4w), iou_pred (N, M) (M = 3 or 1, see :meth:`select_outputs`) and
        object-score logits (N, 1)."""
        image = self.prepare_image(image_embeddings, image_pe)
        masks, iou_pred, object_scores = self.decode(
            image, sparse_prompt_embeddings, dense_prompt_embeddings, image_indices
        )
        return (*self.select_outputs(masks, iou_pred, multimask_output), object_scores)
