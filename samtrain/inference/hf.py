"""Hugging Face export: a ``transformers`` SamModel directory (config.json + model.safetensors).

``SamModel.from_pretrained(directory)`` loads it; ``build_sam(variant, image_size, checkpoint=directory)``
reads it back (:mod:`samtrain.models.hf_keys`). Needs ``transformers`` (``pip install samtrain[hf]``).
"""

from __future__ import annotations

from pathlib import Path

from samtrain.inference.merged import merged_model
from samtrain.models.checkpoint import samtrain_to_official
from samtrain.models.hf_keys import official_to_hf
from samtrain.models.sam.image_encoder import ENCODER_SPECS
from samtrain.models.sam.model import Sam


def hf_config(model: Sam):
    """The SamConfig of a samtrain model (its variant at its image size)."""
    from transformers import SamConfig  # the hf extra

    if model.variant not in ENCODER_SPECS:
        raise ValueError(f"the model's variant {model.variant!r} is none of {', '.join(ENCODER_SPECS)}")
    spec = ENCODER_SPECS[model.variant]
    size = model.image_size
    return SamConfig(
        vision_config={
            "hidden_size": spec.embed_dim,
            "num_hidden_layers": spec.depth,
            "num_attention_heads": spec.num_heads,
            "global_attn_indexes": list(spec.global_attn_indexes),
            "window_size": spec.window_size,
            "image_size": size,
            "mlp_dim": 4 * spec.embed_dim,
        },
        prompt_encoder_config={"image_size": size, "image_embedding_size": size // 16},
    )


def save_hf_directory(model: Sam, directory: str | Path) -> Path:
    """Write ``directory`` as a SamModel (LoRA merged); the weights load into SamModel strictly."""
    from transformers import SamModel  # the hf extra

    model = merged_model(model)
    state = samtrain_to_official({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    hf_model = SamModel(hf_config(model))
    result = hf_model.load_state_dict(official_to_hf(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"SamModel does not match the model's keys: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    directory = Path(directory)
    hf_model.save_pretrained(str(directory), safe_serialization=True)
    return directory
