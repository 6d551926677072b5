"""Hugging Face ``transformers`` SamModel / Sam2Model <-> official SAM / SAM 2 key names, and reading
such a directory.

A SamModel or Sam2Model directory holds ``config.json`` (``model_type`` ``sam`` or ``sam2``) and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``). Reading one needs only
safetensors, not transformers.
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


# SAM 2 (official sam2 names <-> Sam2Model's), the same way. The decoder's attention ``out_proj`` is
# HF's ``o_proj`` under a renamed prefix: one rule per attention.
_SAM2_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
_SAM2_RULES = (
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.blocks.{n}.norm1.", "vision_encoder.backbone.blocks.{n}.layer_norm1."),
    ("image_encoder.trunk.blocks.{n}.norm2.", "vision_encoder.backbone.blocks.{n}.layer_norm2."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.0.", "vision_encoder.backbone.blocks.{n}.mlp.proj_in."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.1.", "vision_encoder.backbone.blocks.{n}.mlp.proj_out."),
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.convs.{n}.conv.", "vision_encoder.neck.convs.{n}."),
    ("no_mem_embed", "no_memory_embedding"),
    (
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("sam_prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("sam_prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("sam_prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("sam_prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("sam_prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    *(
        (
            f"sam_mask_decoder.transformer.layers.{{n}}.{attention}.out_proj.",
            f"mask_decoder.transformer.layers.{{n}}.{attention}.o_proj.",
        )
        for attention in _SAM2_ATTENTIONS
    ),
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.",
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.",
    ),
    *(
        (
            f"sam_mask_decoder.transformer.layers.{{n}}.norm{i}.",
            f"mask_decoder.transformer.layers.{{n}}.layer_norm{i}.",
        )
        for i in (1, 2, 3, 4)
    ),
    (
        "sam_mask_decoder.transformer.layers.{n}.mlp.layers.0.",
        "mask_decoder.transformer.layers.{n}.mlp.proj_in.",
    ),
    (
        "sam_mask_decoder.transformer.layers.{n}.mlp.layers.1.",
        "mask_decoder.transformer.layers.{n}.mlp.proj_out.",
    ),
    ("sam_mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("sam_mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("sam_mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("sam_mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    # The 3-layer MLPs: official layers.0/1/2 are HF's proj_in, layers.0, proj_out.
    *(
        rule
        for head in ("output_hypernetworks_mlps.{n}", "iou_prediction_head", "pred_obj_score_head")
        for rule in (
            (f"sam_mask_decoder.{head}.layers.0.", f"mask_decoder.{head}.proj_in."),
            (f"sam_mask_decoder.{head}.layers.1.", f"mask_decoder.{head}.layers.0."),
            (f"sam_mask_decoder.{head}.layers.2.", f"mask_decoder.{head}.proj_out."),
        )
    ),
    ("sam_mask_decoder.", "mask_decoder."),
)
# Official SAM 2 keeps one (1, C) tensor per point type; Sam2Model stacks them in one (4, C) table.
# It also keeps the random Fourier matrix twice: for the image-wide encoding and in its prompt encoder.
SAM2_POINT_EMBEDDING = "sam_prompt_encoder.point_embeddings.{}.weight"
SAM2_HF_POINT_TABLE = "prompt_encoder.point_embed.weight"
SAM2_HF_POSITIONAL = "shared_image_embedding.positional_embedding"
SAM2_HF_TIED_POSITIONAL = "prompt_encoder.shared_embedding.positional_embedding"
SAM2_POINT_TYPES = 4  # negative, positive, box top-left, box bottom-right

_SAM2_TO_HF = [_compile(official, hf) for official, hf in _SAM2_RULES]
_SAM2_TO_OFFICIAL = [_compile(hf, official) for official, hf in _SAM2_RULES]


def official_sam2_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SAM 2 image keys -> Sam2Model's: renamed, the point embeddings stacked into one (4, C)
    table, the Fourier matrix given to both of Sam2Model's holders. ValueError naming a point
    embedding the state lacks."""
    points = [SAM2_POINT_EMBEDDING.format(i) for i in range(SAM2_POINT_TYPES)]
    missing = [k for k in points if k not in state]
    if missing:
        raise ValueError(f"the SAM 2 state dict lacks {missing}")
    hf = {_rename(k, _SAM2_TO_HF): v for k, v in state.items() if k not in points}
    hf[SAM2_HF_POINT_TABLE] = torch.cat([state[k] for k in points], dim=0)
    hf[SAM2_HF_TIED_POSITIONAL] = hf[SAM2_HF_POSITIONAL]
    return hf


def hf_to_official_sam2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sam2Model keys -> the official SAM 2 layout: the point table split into its four rows, the
    prompt encoder's copy of the Fourier matrix dropped. ValueError when the two copies differ
    (samtrain, as sam2, has one matrix for both)."""
    table = state.get(SAM2_HF_POINT_TABLE)
    if table is None:
        raise ValueError(f"the Sam2Model state dict lacks {SAM2_HF_POINT_TABLE}")
    if table.shape[0] != SAM2_POINT_TYPES:
        raise ValueError(f"{SAM2_HF_POINT_TABLE} has {table.shape[0]} rows, not {SAM2_POINT_TYPES}")
    copy = state.get(SAM2_HF_TIED_POSITIONAL)
    if copy is not None and not torch.equal(copy, state[SAM2_HF_POSITIONAL]):
        raise ValueError(
            f"{SAM2_HF_TIED_POSITIONAL} differs from {SAM2_HF_POSITIONAL}: SAM 2 encodes prompts and the "
            "image with one Fourier matrix"
        )
    official = {
        _rename(k, _SAM2_TO_OFFICIAL): v
        for k, v in state.items()
        if k not in (SAM2_HF_POINT_TABLE, SAM2_HF_TIED_POSITIONAL)
    }
    for i in range(SAM2_POINT_TYPES):
        official[SAM2_POINT_EMBEDDING.format(i)] = table[i : i + 1].clone()
    return official


_FROM_HF = {"sam": hf_to_official, "sam2": hf_to_official_sam2}


def is_hf_directory(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG).is_file()


def read_hf_directory(path: str | Path) -> dict[str, torch.Tensor]:
    """A SamModel (Sam2Model) directory's tensors in the official SAM (SAM 2) key layout; ValueError
    naming what is missing."""
    path = Path(path)
    if not (path / HF_CONFIG).is_file():
        raise ValueError(
            f"{path} is a directory but not a Hugging Face SamModel or Sam2Model directory (no {HF_CONFIG})"
        )
    config = json.loads((path / HF_CONFIG).read_text())
    model_type = config.get("model_type")
    if model_type not in _FROM_HF:
        raise ValueError(f"{path / HF_CONFIG}: model_type is {model_type!r}, neither 'sam' nor 'sam2'")
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
    try:
        return _FROM_HF[model_type](state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
