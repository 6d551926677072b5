"""Hugging Face export: a ``transformers`` SamModel (SAM) or Sam2Model (SAM 2.1) directory
(config.json + model.safetensors; for SAM 2.1 also processor_config.json, a Sam2Processor at its size).

``SamModel.from_pretrained(directory)`` / ``Sam2Model.from_pretrained(directory)`` load it;
``build_sam(variant, image_size, checkpoint=directory)`` reads it back (:mod:`samtrain.models.hf_keys`).
Needs ``transformers`` (``pip install samtrain[hf]``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from samtrain.inference.merged import merged_model
from samtrain.models.checkpoint import samtrain_to_official
from samtrain.models.hf_keys import official_sam2_to_hf, official_to_hf
from samtrain.models.sam.image_encoder import ENCODER_SPECS
from samtrain.models.sam.model import Sam
from samtrain.models.sam2.checkpoint import samtrain_to_official_sam2
from samtrain.models.sam2.model import Sam2

SAM2_LEVELS = 3  # the neck levels Sam2Model's decoder reads: two high-resolution ones and the top


def hf_config(model: Sam | Sam2):
    """The SamConfig (Sam2Config for a Sam2) of a samtrain model: its variant at its image size."""
    if isinstance(model, Sam2):
        return hf_sam2_config(model)
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


def sam2_hf_refusals(model: Sam2) -> list[str]:
    """What of ``model`` transformers' Sam2Model cannot express (empty for every ``build_sam``
    variant at every size it builds): Sam2Model always has a sigmoid IoU head, a 3-layer MLP
    object-score head, GELU in the output upscaling and the mask downscaling, and reads exactly
    three neck levels."""
    decoder, encoder = model.mask_decoder, model.image_encoder
    refusals = []
    if not decoder.iou_prediction_head.sigmoid_output:
        refusals.append("its IoU head has no sigmoid (iou_prediction_use_sigmoid=False)")
    if isinstance(decoder.pred_obj_score_head, nn.Linear):
        refusals.append("its object-score head is linear (pred_obj_scores_mlp=False)")
    if len(encoder.spec.stages) - encoder.scalp != SAM2_LEVELS:
        refusals.append(
            f"its neck gives {len(encoder.spec.stages) - encoder.scalp} levels after the scalp, not {SAM2_LEVELS}"
        )
    activations = {
        "output upscaling": decoder.output_upscaling[2],
        "mask downscaling": model.prompt_encoder.mask_downscaling[2],
    }
    refusals += [
        f"its {part} activation is {type(act).__name__}, not GELU"
        for part, act in activations.items()
        if type(act) is not nn.GELU or act.approximate != "none"
    ]
    return refusals


def hf_sam2_config(model: Sam2):
    """The Sam2Config of a samtrain Sam2: its Hiera trunk, neck, prompt encoder and decoder at its
    image size. ValueError listing what Sam2Model cannot express (:func:`sam2_hf_refusals`)."""
    from transformers import Sam2Config, Sam2HieraDetConfig  # the hf extra

    refusals = sam2_hf_refusals(model)
    if refusals:
        raise ValueError(f"transformers' Sam2Model cannot express this model: {'; '.join(refusals)}")
    encoder, decoder, size = model.image_encoder, model.mask_decoder, model.image_size
    spec, transformer = encoder.spec, decoder.transformer
    stages = range(len(spec.stages))
    trunk = Sam2HieraDetConfig(
        hidden_size=spec.embed_dim,
        num_attention_heads=spec.num_heads,
        image_size=[size, size],
        blocks_per_stage=list(spec.stages),
        embed_dim_per_stage=[spec.embed_dim * 2**i for i in stages],
        num_attention_heads_per_stage=[spec.num_heads * 2**i for i in stages],
        window_size_per_stage=list(spec.window_spec),
        global_attention_blocks=list(spec.global_att_blocks),
        window_positional_embedding_background_size=list(spec.global_pos_size),
        num_query_pool_stages=len(encoder.trunk.q_pool_blocks),
    )
    return Sam2Config(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": trunk,
            "backbone_channel_list": spec.channels,
            "backbone_feature_sizes": [[size // (4 * 2**i)] * 2 for i in range(SAM2_LEVELS)],
            "fpn_hidden_size": encoder.neck.d_model,
            "fpn_top_down_levels": list(encoder.neck.top_down_levels),
            "num_feature_levels": SAM2_LEVELS,
        },
        prompt_encoder_config={
            "hidden_size": model.prompt_encoder.embed_dim,
            "image_size": size,
            "patch_size": size // model.prompt_encoder.image_embedding_size[0],
            "mask_input_channels": model.prompt_encoder.mask_downscaling[3].out_channels,
        },
        mask_decoder_config={
            "hidden_size": transformer.embedding_dim,
            "mlp_dim": transformer.mlp_dim,
            "num_hidden_layers": transformer.depth,
            "num_attention_heads": transformer.num_heads,
            "attention_downsample_rate": transformer.embedding_dim
            // transformer.final_attn_token_to_image.internal_dim,
            "num_multimask_outputs": decoder.num_multimask_outputs,
            "iou_head_depth": len(decoder.iou_prediction_head.layers),
            "iou_head_hidden_dim": decoder.iou_prediction_head.layers[0].out_features,
            "dynamic_multimask_via_stability": decoder.dynamic_multimask_via_stability,
            "dynamic_multimask_stability_delta": decoder.stability_delta,
            "dynamic_multimask_stability_thresh": decoder.stability_thresh,
        },
    )


def save_hf_directory(model: Sam | Sam2, directory: str | Path) -> Path:
    """Write ``directory`` as a SamModel, or a Sam2Model for a Sam2 (LoRA merged); the weights load
    into it strictly. A Sam2's directory also holds a Sam2Processor configured for its image size."""
    model = merged_model(model)
    if isinstance(model, Sam2):
        from transformers import Sam2Model as hf_class  # the hf extra

        state = official_sam2_to_hf(samtrain_to_official_sam2(_cpu_state(model)))
    else:
        from transformers import SamModel as hf_class  # the hf extra

        state = official_to_hf(samtrain_to_official(_cpu_state(model)))
    hf_model = hf_class(hf_config(model))
    result = hf_model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{hf_class.__name__} does not match the model's keys: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    directory = Path(directory)
    hf_model.save_pretrained(str(directory), safe_serialization=True)
    if isinstance(model, Sam2):
        sam2_processor(model.image_size).save_pretrained(str(directory))
    return directory


def sam2_processor(image_size: int):
    """transformers' Sam2Processor for a model input of ``image_size``: it resizes images to S x S
    and scales prompts to that frame, as samtrain's Sam2 does."""
    from transformers import Sam2ImageProcessor, Sam2Processor  # the hf extra

    image_processor = Sam2ImageProcessor(
        size={"height": image_size, "width": image_size},
        mask_size={"height": image_size // 4, "width": image_size // 4},
    )
    return Sam2Processor(image_processor=image_processor)


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
