"""SAM 2's image encoder: timm's Hiera trunk (``sam2_hiera_*``), the FPN neck, and the projections
that turn the neck's levels into what the image-only mask decoder reads.

Official keys ``no_mem_embed`` and ``sam_mask_decoder.conv_s0|conv_s1`` live here as
``image_encoder.no_mem_embed`` and ``image_encoder.conv_s0|conv_s1``: SAM 2's image path applies
them once per image (``directly_add_no_mem_embed``, ``forward_image``), so the encoder's output is
exactly what every decoder call reads, and a cached embedding holds them already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import timm
import torch
import torch.nn.functional as F
from torch import nn

NECK_CHANNELS = 256
TOTAL_STRIDE = 32  # patch embedding 4, then three 2x2 query poolings


@dataclass(frozen=True)
class HieraSpec:
    """The shape of one Hiera trunk (the keyword arguments of timm's ``HieraDet``)."""

    timm_name: str
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    global_pos_size: tuple[int, int] = (7, 7)

    @property
    def channels(self) -> list[int]:
        """The trunk's output channels, lowest resolution first (the neck's ``backbone_channel_list``)."""
        return [self.embed_dim * 2**i for i in reversed(range(len(self.stages)))]

    def timm_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "timm_name"}


@dataclass(frozen=True)
class Sam2ImageFeatures:
    """What the SAM 2 mask decoder reads of B images: the top level with ``no_mem_embed`` added and
    the two finer levels after ``conv_s1`` / ``conv_s0``.

    ``features[i]`` indexes the batch dimension of every level (as a tensor would); ``.to()`` and
    ``.detach()`` apply to every level.
    """

    image_embed: torch.Tensor  # (B, C, S/16, S/16)
    high_res_s1: torch.Tensor  # (B, C/4, S/8, S/8)
    high_res_s0: torch.Tensor  # (B, C/8, S/4, S/4)

    def tensors(self) -> list[torch.Tensor]:
        return [self.image_embed, self.high_res_s1, self.high_res_s0]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> Sam2ImageFeatures:
        return cls(*tensors)

    def __getitem__(self, index) -> Sam2ImageFeatures:
        return Sam2ImageFeatures(*(t[index] for t in self.tensors()))

    def __len__(self) -> int:
        return len(self.image_embed)

    def to(self, *args, **kwargs) -> Sam2ImageFeatures:
        return Sam2ImageFeatures(*(t.to(*args, **kwargs) for t in self.tensors()))

    def detach(self) -> Sam2ImageFeatures:
        return Sam2ImageFeatures(*(t.detach() for t in self.tensors()))

    @property
    def shape(self) -> torch.Size:
        """The top level's shape (B, C, S/16, S/16)."""
        return self.image_embed.shape

    @property
    def device(self) -> torch.device:
        return self.image_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_embed.dtype


def sine_position_encoding(
    height: int, width: int, channels: int, *, device=None, temperature: float = 10000.0
) -> torch.Tensor:
    """The neck's normalised sine encoding of an (h, w) grid (DETR's, scale 2 pi) -> (1, C, h, w):
    channels [0, C/2) encode y, [C/2, C) encode x, alternating sin and cos per frequency."""
    half = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    steps = torch.arange(half, dtype=torch.float32, device=device)
    freqs = temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / half)

    def encode(values: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, half), sin/cos interleaved
        phases = values[:, None] / freqs
        return torch.stack((phases[:, 0::2].sin(), phases[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, half)
    pos_x = encode(x)[None, :, :].expand(height, width, half)
    return torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1).unsqueeze(0)


class FpnNeck(nn.Module):
    """SAM 2's FPN neck: a 1x1 lateral conv per trunk level to d_model channels, and nearest-neighbour
    top-down fusion (sum) into the levels in ``top_down_levels`` only (the official layout: ``convs.i``
    reads the i-th level counted from the lowest resolution)."""

    def __init__(
        self, *, backbone_channel_list: list[int], d_model: int = NECK_CHANNELS, top_down_levels=(2, 3)
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.top_down_levels = tuple(top_down_levels)
        self.convs = nn.ModuleList(nn.Sequential() for _ in backbone_channel_list)
        for conv, channels in zip(self.convs, backbone_channel_list, strict=True):
            conv.add_module("conv", nn.Conv2d(channels, d_model, kernel_size=1))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Trunk levels, highest resolution first, (B, C_i, S/2^(i+2), ...) -> the same levels with
        d_model channels."""
        last = len(levels) - 1
        out: list[torch.Tensor] = [None] * len(levels)  # type: ignore[list-item]
        previous = None
        for i in range(last, -1, -1):
            lateral = self.convs[last - i](levels[i])
            if previous is not None and i in self.top_down_levels:
                top_down = F.interpolate(previous.float(), scale_factor=2.0, mode="nearest")
                previous = lateral + top_down
            else:
                previous = lateral
            out[i] = previous
        return out


class Sam2ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck + the decoder's image-side projections.

    Args:
        spec: the trunk's shape.
        d_model: neck and decoder width (256).
        scalp: how many of the lowest-resolution neck levels to drop (1 in SAM 2.1).
        drop_path_rate: the trunk's stochastic depth.
    """

    def __init__(
        self, *, spec: HieraSpec, d_model: int = NECK_CHANNELS, scalp: int = 1, drop_path_rate: float = 0.0
    ):
        super().__init__()
        self.spec = spec
        self.scalp = scalp
        trunk = timm.create_model(
            spec.timm_name,
            pretrained=False,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            **spec.timm_kwargs(),
        )
        trunk.prune_intermediate_layers(indices=len(spec.stages), prune_head=True)
        self.trunk = trunk
        self.neck = FpnNeck(backbone_channel_list=spec.channels, d_model=d_model)
        self.conv_s0 = nn.Conv2d(d_model, d_model // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(d_model, d_model // 4, kernel_size=1)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)

    @property
    def blocks(self) -> nn.Sequential:
        """The trunk's transformer blocks (what ``samtrain.models.lora.add_lora`` wraps; Hiera's
        attention has ``qkv`` and ``proj``, its MLP ``fc1`` and ``fc2``)."""
        return self.trunk.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every trunk block (timm's, non-reentrant unless timm was
        told otherwise; ``samtrain.models.sam.image_encoder.set_encoder_checkpointing`` checks that)."""
        self.trunk.set_grad_checkpointing(enable)

    def backbone(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) normalised -> the neck's levels after the scalp, highest resolution first:
        (B, 256, S/4, S/4), (B, 256, S/8, S/8), (B, 256, S/16, S/16) in SAM 2.1 (official
        ``backbone_fpn``, before ``conv_s0``/``conv_s1``)."""
        levels = self.trunk.forward_intermediates(images, intermediates_only=True)
        features = self.neck(levels)
        return features[: len(features) - self.scalp]

    def position_encodings(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The neck's sine position encoding of each level (official ``vision_pos_enc``, used by
        SAM 2's video memory only) -> [(1, 256, h_i, w_i)]."""
        return [
            sine_position_encoding(*f.shape[-2:], f.shape[1], device=f.device).to(f.dtype) for f in features
        ]

    def forward(self, images: torch.Tensor) -> Sam2ImageFeatures:
        """(B, 3, S, S) normalised -> :class:`Sam2ImageFeatures`."""
        s0, s1, top = self.backbone(images)[-3:]
        return Sam2ImageFeatures(
            image_embed=top + self.no_mem_embed.view(1, -1, 1, 1).to(top.dtype),
            high_res_s1=self.conv_s1(s1),
            high_res_s0=self.conv_s0(s0),
        )
