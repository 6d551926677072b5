"""SAM's mask decoder: output tokens through the two-way transformer, upscaling, hypernetworks."""

from __future__ import annotations

import torch
from torch import nn

from samtrain.models.common import MLP, LayerNorm2d, batched_mlp


class MaskDecoder(nn.Module):
    """Predicts 1 + num_multimask_outputs masks and their IoU from image and prompt embeddings.

    Output 0 is the single-mask output used for ambiguous-free prompts; outputs 1.. are the
    multimask outputs used for a single point.
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
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official signature; returns masks (N, M, 4h, 4w) and iou_pred (N, M), M = 3 or 1."""
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_indices
        )
        outputs = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, outputs], iou_pred[:, outputs]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output at once.

        Args:
            image_embeddings: (B, C, h, w); B = 1 broadcasts over the N prompts, otherwise
                image_indices (N,) says which image each prompt reads (or B = N).
            image_pe: (1, C, h, w) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (N, T, C).
            dense_prompt_embeddings: (N, C, h, w).

        Returns:
            masks (N, num_mask_tokens, 4h, 4w) low-res logits and iou_pred (N, num_mask_tokens).
        """
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        if image_indices is not None:
            image_embeddings = image_embeddings[image_indices]
        src = image_embeddings + dense_prompt_embeddings
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = batched_mlp(self.output_hypernetworks_mlps, mask_tokens_out)  # (N, M, C / 8)
        masks = (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[-2:])
        return masks, self.iou_prediction_head(iou_token_out)
