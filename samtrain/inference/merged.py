"""A model with its LoRA layers merged: what every export format writes."""

from __future__ import annotations

from samtrain.models.build import build_sam
from samtrain.models.lora import LORA_SUFFIXES, merge_lora_state
from samtrain.models.sam.model import Sam
from samtrain.models.sam2.model import Sam2


def merged_model(model: Sam | Sam2) -> Sam | Sam2:
    """``model`` itself when it has no LoRA layers; otherwise a plain copy with W + scale * B @ A
    folded into each adapted weight (on the CPU, in eval mode)."""
    state = model.state_dict()
    if not any(k.endswith(LORA_SUFFIXES) for k in state):
        return model
    if model.variant is None:
        raise ValueError(
            "merging LoRA layers needs the model's variant: build it with build_sam(variant, ...)"
        )
    plain = build_sam(model.variant, image_size=model.image_size)
    plain.load_state_dict(merge_lora_state({k: v.detach().cpu() for k, v in state.items()}))
    return plain.eval()
