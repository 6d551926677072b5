"""SAM's prompt encoder: sparse (points, boxes) and dense (mask) prompt embeddings."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from samtrain.models.common import LayerNorm2d

# Point labels. A box is carried as two points labelled BOX_TOP_LEFT and BOX_BOTTOM_RIGHT, so
# point-first and box-first prompts of one batch fit in one (N, T, 2) tensor.
PADDING, NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al., Fourier features)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 2) normalised to [0, 1] -> (..., 2 * num_pos_feats), float32.

        Always computed in float32, autocast or not: the phases reach tens of radians, where
        bfloat16's 8-bit mantissa would misplace a point by several pixels.
        """
        device_type = coords.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            coords = (2 * coords.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
            coords = 2 * math.pi * coords
            return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """The encoding of every cell centre of an (h, w) grid -> (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (B, N, 2) as (x, y) in an image of image_size (h, w) -> (B, N, C)."""
        scale = coords_input.new_tensor([image_size[1], image_size[0]], dtype=torch.float32)
        return self._pe_encoding(coords_input.float() / scale)


class MaskDownscaling(nn.Sequential):
    """SAM's mask-prompt downscaler (official layout: 2x2 stride-2 conv, LayerNorm2d, activation,
    2x2 stride-2 conv, LayerNorm2d, activation, 1x1 conv), computed channels-last.

    A 2x2 stride-2 convolution reads each 2x2 block of pixels once, so it is a matmul over the
    block's pixels and channels, and the LayerNorms over channels are ``F.layer_norm`` on the last
    dimension. The output is channels-last in memory: the decoder adds it to its channels-last
    image tokens without a transposed copy, and the gradient comes back in the same layout.
    """

    def __init__(self, embed_dim: int, mask_in_chans: int, activation: type[nn.Module]) -> None:
        super().__init__(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, 1, 4h, 4w) -> (N, C, h, w), channels-last in memory."""
        down1, norm1, act1, down2, norm2, act2, project = self
        x = masks.permute(0, 2, 3, 1)
        x = act1(_channel_norm(_conv2x2(x, down1), norm1))
        x = act2(_channel_norm(_conv2x2(x, down2), norm2))
        x = F.linear(x, project.weight.flatten(1), project.bias)
        return x.permute(0, 3, 1, 2)


def _conv2x2(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 2x2 stride-2 convolution of channels-last x (N, H, W, C) -> (N, H/2, W/2, C')."""
    n, h, w, c = x.shape
    blocks = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(2, 3).reshape(n, h // 2, w // 2, 4 * c)
    return F.linear(blocks, conv.weight.permute(0, 2, 3, 1).flatten(1), conv.bias)


def _channel_norm(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


class PromptEncoder(nn.Module):
    """Embeds points, boxes and mask prompts for the mask decoder.

    Args:
        embed_dim: prompt embedding width (256 in SAM).
        image_embedding_size: (h, w) of the image embedding, S/16.
        input_image_size: (H, W) of the padded model input, S.
        mask_in_chans: hidden channels of the mask-prompt downscaler.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # negative, positive, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = MaskDownscaling(embed_dim, mask_in_chans, activation)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid -> (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _label_table(self) -> torch.Tensor:
        """(5, C): the learned embedding of labels -1 (padding), 0, 1, 2, 3, in that order."""
        return torch.cat([self.not_a_point_embed.weight, *(e.weight for e in self.point_embeddings)])

    def embed_labelled_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """coords (N, T, 2) pixel (x, y), labels (N, T) in {-1, 0, 1, 2, 3} -> (N, T, C).

        One table lookup for every label, so every prompt embedding is part of the graph on
        every step (DDP sees no unused parameters whatever the prompt mix).
        """
        pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)
        pe = torch.where((labels == PADDING).unsqueeze(-1), torch.zeros_like(pe), pe)
        return pe + self._label_table()[labels + 1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PADDING)], dim=1)
        return self.embed_labelled_points(points, labels)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=boxes.device).expand(len(corners), 2)
        return self.embed_labelled_points(corners, labels)

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Mask prompts (N, 1, 4h, 4w) logits -> dense embeddings (N, C, h, w), channels-last in memory."""
        return self.mask_downscaling(masks)

    def no_mask_dense(self, batch_size: int) -> torch.Tensor:
        """The dense embedding used when no mask prompt is given -> (N, C, h, w), a broadcast view."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, h, w)

    @staticmethod
    def _batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        *,
        pad_points: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official signature.

        Args:
            points: coords (N, T, 2) as pixel (x, y) in the model input frame, labels (N, T).
            boxes: (N, 4) xyxy in the model input frame.
            masks: (N, 1, 4h, 4w) mask logits.
            pad_points: append a padding point to the points (None: the official rule, when
                there is no box; False for points that carry their own padding or box corners).

        Returns:
            sparse (N, T', C) and dense (N, C, h, w) embeddings.
        """
        n = self._batch_size(points, boxes, masks)
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((n, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            pad = boxes is None if pad_points is None else pad_points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=pad)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        dense = self.embed_masks(masks) if masks is not None else self.no_mask_dense(n)
        return sparse, dense
