"""SAM's mask decoder: output tokens through the two-way transformer, upscaling, hypernetworks."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samtrain.models.common import MLP, LayerNorm2d, batched_mlp


def _deconv2x2_as_linear(deconv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2, stride-2 transposed convolution as a linear map on channels-last pixels: weight
    (4 * C_out, C_in) and bias (4 * C_out,), outputs ordered (row offset, column offset, channel)."""
    c_in, c_out = deconv.weight.shape[:2]
    weight = deconv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)
    return weight, deconv.bias.repeat(4)


class OutputUpscaling(nn.Sequential):
    """SAM's output upscaling (official layout: 2x2 transposed conv, LayerNorm2d, activation, 2x2
    transposed conv, activation), computed channels-last.

    Each stride-2 transposed convolution with a 2x2 kernel maps every pixel to its own 2x2 block,
    so it is a matmul over channels; the LayerNorm over channels is then ``F.layer_norm`` on the
    last dimension. Nothing is transposed to NCHW on the way: the output keeps every pixel's 4 x 4
    block of sub-pixels together, and :meth:`blocks_to_image` puts them in place (done after the
    hypernetwork product, on 8 times less data).
    """

    def __init__(self, transformer_dim: int, activation: type[nn.Module]) -> None:
        super().__init__(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )

    def forward(
        self, x: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (N, h, w, C) channels-last -> (N, h, w, 2, 2, 2, 2, C / 8): output pixel
        (4i + 2a + c, 4j + 2b + d) of the official (N, C / 8, 4h, 4w) is [n, i, j, a, b, c, d].

        skips: SAM 2's high-resolution features, added after each transposed convolution (before
        the norm, before the last activation), in block layout: (N, h, w, 2, 2, C / 4) and
        (N, h, w, 2, 2, 2, 2, C / 8) (:meth:`image_to_blocks`); N or 1 images.
        """
        up1, norm, act1, up2, act2 = self
        n, h, w, _ = x.shape
        x = F.linear(x, *_deconv2x2_as_linear(up1))  # (N, h, w, 2 * 2 * C/4), (a, b, channel)
        c1, c2 = up1.weight.shape[1], up2.weight.shape[1]
        x = x.view(n, h, w, 2, 2, c1)
        if skips is not None:
            x = x + skips[0]
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        x = F.linear(x, *_deconv2x2_as_linear(up2)).view(n, h, w, 2, 2, 2, 2, c2)
        if skips is not None:
            x = x + skips[1]
        return act2(x)

    @staticmethod
    def image_to_blocks(x: torch.Tensor, levels: int) -> torch.Tensor:
        """(N, C, 2^k h, 2^k w) -> channels-last blocks (N, h, w, 2, 2, ..., C) for k = levels (1 or 2),
        the layout of :meth:`forward`'s intermediate outputs; the inverse of :meth:`blocks_to_image`."""
        n, c, hh, ww = x.shape
        f = 2**levels
        h, w = hh // f, ww // f
        if levels == 1:
            return x.view(n, c, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).contiguous()
        return x.view(n, c, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1).contiguous()

    @staticmethod
    def blocks_to_image(x: torch.Tensor) -> torch.Tensor:
        """(..., h, w, 2, 2, 2, 2) -> (..., 4h, 4w)."""
        *lead, h, w = x.shape[:-4]
        d = len(lead)
        x = x.permute(*range(d), d, d + 2, d + 4, d + 1, d + 3, d + 5)
        return x.reshape(*lead, 4 * h, 4 * w)


class DecoderImage(NamedTuple):
    """Image embeddings in the form the decoder reads them (:meth:`MaskDecoder.prepare_image`).

    It holds the positional encoding projected with the current weights, so it serves every
    decoder call until the weights change: the passes of one training step, the clicks of one
    evaluation.
    """

    embeddings: torch.Tensor  # (B, h, w, C) channels-last
    positions: tuple[torch.Tensor, ...]  # TwoWayTransformer.project_image_pe, each (1, hw, C')

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeddings, *self.positions]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> DecoderImage:
        return cls(tensors[0], tuple(tensors[1:]))


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
        self.output_upscaling = OutputUpscaling(transformer_dim, activation)
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
        return self.select_outputs(masks, iou_pred, multimask_output)

    def select_outputs(
        self, masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All outputs (N, 4, H, W), (N, 4) -> the multimask outputs 1: or the single output 0."""
        outputs = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, outputs], iou_pred[:, outputs]

    def prepare_image(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor) -> DecoderImage:
        """image_embeddings (B, C, h, w) and image_pe (1, C, h, w) -> a :class:`DecoderImage`."""
        return DecoderImage(
            image_embeddings.permute(0, 2, 3, 1).contiguous(), self.transformer.project_image_pe(image_pe)
        )

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output at once: :meth:`decode` of ``prepare_image(image_embeddings, image_pe)``."""
        image = self.prepare_image(image_embeddings, image_pe)
        return self.decode(image, sparse_prompt_embeddings, dense_prompt_embeddings, image_indices)

    def decode(
        self,
        image: DecoderImage,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output at once.

        Args:
            image: B prepared image embeddings; B = 1 broadcasts over the N prompts, otherwise
                image_indices (N,) says which image each prompt reads (or B = N).
            sparse_prompt_embeddings: (N, T, C).
            dense_prompt_embeddings: (N, C, h, w).

        Returns:
            masks (N, num_mask_tokens, 4h, 4w) low-res logits and iou_pred (N, num_mask_tokens).
        """
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        # Channels-last (N, h, w, C): the transformer reads the image as (N, hw, C) tokens, so this
        # layout needs no transposed copy; each mask reads its image by index.
        image_embeddings = image.embeddings
        if image_indices is not None:
            image_embeddings = image_embeddings[image_indices]
        src = (image_embeddings + dense_prompt_embeddings.permute(0, 2, 3, 1)).contiguous()
        b, h, w, c = src.shape
        hs, src = self.transformer(src.permute(0, 3, 1, 2), None, tokens, image_pos=image.positions)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.reshape(b, h, w, c))  # (N, h, w, 2, 2, 2, 2, C / 8)
        hyper_in = batched_mlp(self.output_hypernetworks_mlps, mask_tokens_out)  # (N, M, C / 8)
        # (N, 16hw, M): the gradient of the upscaled embedding comes out contiguous this way round.
        masks = upscaled.reshape(b, 16 * h * w, upscaled.shape[-1]) @ hyper_in.transpose(1, 2)
        masks = OutputUpscaling.blocks_to_image(
            masks.view(b, h, w, 2, 2, 2, 2, hyper_in.shape[1]).movedim(-1, 1)
        )
        return masks, self.iou_prediction_head(iou_token_out)
