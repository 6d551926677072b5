"""SAM's image encoder: timm's ``samvit`` (windowed ViT with relative positions and a conv neck)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import timm
from torch import nn

PATCH_SIZE = 16
NECK_CHANNELS = 256


@dataclass(frozen=True)
class EncoderSpec:
    """The shape of one SAM image-encoder variant."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14


ENCODER_SPECS: dict[str, EncoderSpec] = {
    # A tiny encoder of the same structure, for tests and CPU demos.
    "vit_t": EncoderSpec(embed_dim=192, depth=4, num_heads=3, global_attn_indexes=(1, 3), window_size=8),
    "vit_b": EncoderSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": EncoderSpec(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": EncoderSpec(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def build_image_encoder(variant: str, *, image_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """timm samvit for a SAM variant: (B, 3, S, S) -> (B, 256, S/16, S/16); no weights downloaded."""
    if variant not in ENCODER_SPECS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(ENCODER_SPECS)}")
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    spec = ENCODER_SPECS[variant]
    return timm.create_model(
        "samvit_base_patch16",
        pretrained=False,
        img_size=image_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        neck_chans=NECK_CHANNELS,
        drop_path_rate=drop_path_rate,
        num_classes=0,
        global_pool="",
    )


def set_encoder_checkpointing(encoder: nn.Module, enable: bool = True) -> None:
    """Activation checkpointing of every encoder block (timm's ``set_grad_checkpointing``): the
    blocks keep only their inputs in the forward pass and recompute the rest in the backward pass.

    timm checkpoints non-reentrantly unless ``timm.layers.set_reentrant_ckpt(True)`` was called;
    reentrant checkpointing would drop the gradients of LoRA layers behind a frozen patch embedding.
    """
    if not hasattr(encoder, "set_grad_checkpointing"):
        raise TypeError(f"{type(encoder).__name__} has no set_grad_checkpointing (not a timm model)")
    if enable and getattr(timm.layers, "use_reentrant_ckpt", lambda: False)():
        raise ValueError("encoder checkpointing needs timm's non-reentrant mode: set_reentrant_ckpt(False)")
    encoder.set_grad_checkpointing(enable)
