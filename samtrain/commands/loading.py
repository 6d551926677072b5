"""What predict, annotate and export share: the model arguments and loading any checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from samtrain.models import SAM2_VARIANTS, SAM_VARIANTS, build_sam
from samtrain.models.checkpoint import official_to_samtrain, read_checkpoint_state
from samtrain.models.sam.image_encoder import ENCODER_SPECS
from samtrain.models.sam2.build import HIERA_SPECS

HIERA_PATCH_EMBED = "image_encoder.trunk.patch_embed.proj.weight"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="official sam_vit_*.pth or sam2.1_hiera_*.pt, a samtrain export (.pth/.safetensors), "
        "a Lightning .ckpt, or a Hugging Face SamModel / Sam2Model directory",
    )
    parser.add_argument(
        "--variant",
        choices=(*SAM_VARIANTS, *SAM2_VARIANTS),
        help="the model variant (default: read from the checkpoint)",
    )
    parser.add_argument("--image-size", type=int, default=1024, help="model input size in px (default 1024)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when there is a GPU)")


def variant_of(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """The variant whose encoder width and depth the checkpoint's tensors have (SAM or SAM 2.1)."""
    if HIERA_PATCH_EMBED in state:
        return hiera_variant_of(state, path)
    state = official_to_samtrain(state)
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        raise ValueError(f"checkpoint {path} has no image encoder (image_encoder.patch_embed.proj.weight)")
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, spec in ENCODER_SPECS.items():
        if spec.embed_dim == weight.shape[0] and spec.depth == depth:
            return name
    raise ValueError(
        f"checkpoint {path}: an encoder of width {weight.shape[0]} and depth {depth} is none of "
        f"{', '.join(SAM_VARIANTS)}; pass --variant"
    )


def hiera_variant_of(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """The SAM 2.1 variant whose Hiera trunk has the checkpoint's width and number of blocks."""
    width = state[HIERA_PATCH_EMBED].shape[0]
    depth = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
    for name, spec in HIERA_SPECS.items():
        if spec.embed_dim == width and sum(spec.stages) == depth:
            return name
    raise ValueError(
        f"checkpoint {path}: a Hiera trunk of width {width} and {depth} blocks is none of "
        f"{', '.join(SAM2_VARIANTS)}; pass --variant"
    )


def default_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args: argparse.Namespace):
    """build_sam(variant, image_size, checkpoint) in eval mode on the chosen device."""
    variant = args.variant or variant_of(read_checkpoint_state(args.checkpoint), args.checkpoint)
    model = build_sam(variant, image_size=args.image_size, checkpoint=args.checkpoint)
    return model.eval().to(default_device(args.device))
