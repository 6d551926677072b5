"""Hugging Face ``transformers`` SamModel <-> official SAM key names, and reading a SamModel directory.

A SamModel directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Reading one needs only safetensors, not transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

# (official prefix, HF prefix); "{n}" is a layer index. The first matching rule renames a key, in
# either direction; keys that match none (attention projections, tokens) are named alike.
_RULES = (
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{n}.norm1.", "vision_encoder.layers.{n}.layer_norm1."),
    ("image_encoder.blocks.{n}.norm2.", "vision_encoder.layers.{n}.layer_norm2."),
    ("image_encoder.blocks.{n}.", "vision_encoder.layers.{n}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.", "vision_encoder."),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.{n}.", "prompt_encoder.point_embed.{n}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{n}.norm1.", "mask_decoder.transformer.layers.{n}.layer_norm1."),
    ("mask_decoder.transformer.layers.{n}.norm2.", "mask_decoder.transformer.layers.{n}.layer_norm2."),
    ("mask_decoder.transformer.layers.{n}.norm3.", "mask_decoder.transformer.layers.{n}.layer_norm3."),
    ("mask_decoder.transformer.layers.{n}.norm4.", "mask_decoder.transformer.layers.{n}.layer_norm4."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    # The 3-layer MLPs: official layers.0/1/2 are HF's proj_in, layers.0, proj_out.
    (
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.0.",
        "mask_decoder.output_hypernetworks_mlps.{n}.proj_in.",
    ),
    (
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.1.",
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.0.",
    ),
    (
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.2.",
        "mask_decoder.output_hypernetworks_mlps.{n}.proj_out.",
    ),
    ("mask_decoder.iou_prediction_head.layers.0.", "mask_decoder.iou_prediction_head.proj_in."),
    ("mask_decoder.iou_prediction_head.layers.1.", "mask_decoder.iou_prediction_head.layers.0."),
    ("mask_decoder.iou_prediction_head.layers.2.", "mask_decoder.iou_prediction_head.proj_out."),
)
# HF keeps a second handle on the random Fourier matrix (tied to shared_image_embedding).
HF_TIED_POSITIONAL = "prompt_encoder.shared_embedding.positional_embedding"
HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"


def _compile(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = re.escape(source).replace(r"\{n\}", r"(\d+)")
    return re.compile("^" + pattern), target.replace("{n}", r"\1")


_TO_HF = [_compile(official, hf) for official, hf in _RULES]
_TO_OFFICIAL = [_compile(hf, official) for official, hf in _RULES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, target in rules:
        renamed, count = pattern.subn(target, key, count=1)
        if count:
            return renamed
    return key


def official_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SAM keys -> SamModel's (with its tied second copy of the Fourier matrix)."""
    hf = {_rename(k, _TO_HF): v for k, v in state.items()}
    hf[HF_TIED_POSITIONAL] = hf["shared_image_embedding.positional_embedding"]
    return hf


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SamModel keys -> the official SAM layout (the tied copy dropped)."""
    return {_rename(k, _TO_OFFICIAL): v for k, v in state.items() if k != HF_TIED_POSITIONAL}


def is_hf_directory(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG).is_file()


def read_hf_directory(path: str | Path) -> dict[str, torch.Tensor]:
    """A SamModel directory's tensors in the official key layout; ValueError naming what is missing."""
    path = Path(path)
    if not (path / HF_CONFIG).is_file():
        raise ValueError(f"{path} is a directory but not a Hugging Face SamModel directory (no {HF_CONFIG})")
    config = json.loads((path / HF_CONFIG).read_text())
    if config.get("model_type") != "sam":
        raise ValueError(f"{path / HF_CONFIG}: model_type is {config.get('model_type')!r}, not 'sam'")
    if (path / HF_WEIGHTS).is_file():
        files = [path / HF_WEIGHTS]
    elif (path / HF_INDEX).is_file():
        index = json.loads((path / HF_INDEX).read_text())
        files = [path / name for name in sorted(set(index["weight_map"].values()))]
    else:
        raise ValueError(f"{path} has no {HF_WEIGHTS} (nor {HF_INDEX}); only safetensors weights are read")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return hf_to_official(state)
