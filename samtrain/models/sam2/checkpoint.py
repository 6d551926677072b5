"""SAM 2 checkpoints: official key names <-> samtrain's, loading into a Sam2, and export (into an
original checkpoint with every other key kept bit for bit, or image-only).

The official file is ``{"model": state_dict}`` of the whole video model. samtrain's Sam2 holds its
image path; the rest (memory attention, memory encoder, object pointers, temporal encodings) is
video memory, ignored on loading and carried over untouched on export.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from samtrain.models.checkpoint import (
    LoadReport,
    exportable_state,
    load_matching_tensors,
    read_checkpoint_state,
    unreadable_reason,
    write_state_dict,
)
from samtrain.models.lora import LORA_SUFFIXES, merge_lora_state

# (official pattern, samtrain replacement), tried in order; the first match wins.
_TO_SAMTRAIN = [
    (
        re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.0\."),
        r"image_encoder.trunk.blocks.\1.mlp.fc1.",
    ),
    (
        re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.1\."),
        r"image_encoder.trunk.blocks.\1.mlp.fc2.",
    ),
    (re.compile(r"^no_mem_embed$"), "image_encoder.no_mem_embed"),
    (re.compile(r"^sam_mask_decoder\.conv_s([01])\."), r"image_encoder.conv_s\1."),
    (
        re.compile(r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.0\."),
        r"mask_decoder.transformer.layers.\1.mlp.lin1.",
    ),
    (
        re.compile(r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.1\."),
        r"mask_decoder.transformer.layers.\1.mlp.lin2.",
    ),
    (re.compile(r"^sam_mask_decoder\."), "mask_decoder."),
    (re.compile(r"^sam_prompt_encoder\."), "prompt_encoder."),
]
_TO_OFFICIAL = [
    (
        re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.fc1\."),
        r"image_encoder.trunk.blocks.\1.mlp.layers.0.",
    ),
    (
        re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.fc2\."),
        r"image_encoder.trunk.blocks.\1.mlp.layers.1.",
    ),
    (re.compile(r"^image_encoder\.no_mem_embed$"), "no_mem_embed"),
    (re.compile(r"^image_encoder\.conv_s([01])\."), r"sam_mask_decoder.conv_s\1."),
    (
        re.compile(r"^mask_decoder\.transformer\.layers\.(\d+)\.mlp\.lin1\."),
        r"sam_mask_decoder.transformer.layers.\1.mlp.layers.0.",
    ),
    (
        re.compile(r"^mask_decoder\.transformer\.layers\.(\d+)\.mlp\.lin2\."),
        r"sam_mask_decoder.transformer.layers.\1.mlp.layers.1.",
    ),
    (re.compile(r"^mask_decoder\."), "sam_mask_decoder."),
    (re.compile(r"^prompt_encoder\."), "sam_prompt_encoder."),
]
_IMAGE_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        renamed, count = pattern.subn(replacement, key)
        if count:
            return renamed
    return key


def official_to_samtrain_sam2(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An official SAM 2 state dict (or one already in samtrain's names) -> the image model's tensors
    in samtrain's names, and the keys left out (video memory)."""
    image, video = {}, []
    for key, value in state.items():
        renamed = _rename(key, _TO_SAMTRAIN)
        if renamed.startswith(_IMAGE_PREFIXES):
            image[renamed] = value
        else:
            video.append(key)
    return image, sorted(video)


def samtrain_to_official_sam2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """samtrain Sam2 key names -> the official SAM 2 layout."""
    return {_rename(k, _TO_OFFICIAL): v for k, v in state.items()}


def load_sam2_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load an official SAM 2 checkpoint (``sam2.1_hiera_*.pt``), a samtrain export, a Lightning
    checkpoint or a Hugging Face Sam2Model directory into a samtrain Sam2. Video-memory keys are ignored and counted in the report.

    Raises ValueError when nothing matches, when shapes disagree (another variant), and (strict)
    when image keys are missing or unexpected; the error lists the keys.
    """
    state, video = official_to_samtrain_sam2(read_checkpoint_state(path))
    model_state = model.state_dict()
    if not any(k.endswith(LORA_SUFFIXES) for k in model_state):
        state = merge_lora_state(state)
    report = LoadReport(path=str(path), ignored=video)
    return load_matching_tensors(
        model, state, report, strict=strict, family="SAM 2", first_keys=video or None
    )


def _read_original(path: str | Path) -> dict:
    """The original official checkpoint as stored: ``{"model": state_dict, ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"original checkpoint {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"original checkpoint {path} could not be read: {unreadable_reason(err, path)}"
        ) from None
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise ValueError(
            f"original checkpoint {path} is not an official SAM 2 checkpoint (no 'model' state dict)"
        )
    return content


def export_sam2_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    original: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a Sam2's weights in the official SAM 2 layout (LoRA merged; the model is left as it is).

    original: an official checkpoint (``sam2.1_hiera_*.pt``): the file written is it with the image
    parts replaced, every other key (video memory) and every other top-level entry kept bit for bit,
    so the official ``build_sam2`` loads it strictly and video inference still runs. Without one the
    file holds ``{"model": image parts}`` (a ``.safetensors`` path: the flat image state dict).
    state: the weights to write when they are not ``model.state_dict()`` (:func:`exportable_state`).
    """
    image = samtrain_to_official_sam2(exportable_state(model, state))
    if original is None:
        if Path(path).suffix == ".safetensors":
            return write_state_dict(image, path)
        return write_state_dict({"model": image}, path)  # type: ignore[dict-item]
    content = _read_original(original)
    base = content["model"]
    absent = sorted(set(image) - set(base))
    wrong = [
        f"{k}: {tuple(image[k].shape)} vs {tuple(base[k].shape)}"
        for k in image
        if k in base and image[k].shape != base[k].shape
    ]
    if absent or wrong:
        raise ValueError(
            f"original checkpoint {original} does not fit this model (another variant?): "
            f"absent keys {absent[:5]}, other shapes {wrong[:5]}"
        )
    merged = {k: image[k].to(v.dtype) if k in image else v for k, v in base.items()}
    if Path(path).suffix == ".safetensors":
        return write_state_dict(merged, path)
    return write_state_dict({**content, "model": merged}, path)  # type: ignore[dict-item]
