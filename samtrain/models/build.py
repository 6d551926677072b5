"""build_sam: a SAM model of any variant and image size, optionally from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from samtrain.models.image_encoder import ENCODER_SPECS, PATCH_SIZE, build_image_encoder
from samtrain.models.lora import add_lora
from samtrain.models.mae_transfer import init_encoder_from_mae
from samtrain.models.mask_decoder import MaskDecoder
from samtrain.models.prompt_encoder import PromptEncoder
from samtrain.models.sam import Sam
from samtrain.models.transformer import TwoWayTransformer

log = logging.getLogger(__name__)

PROMPT_EMBED_DIM = 256
SAM_VARIANTS = tuple(ENCODER_SPECS)


def build_sam(
    variant: str = "vit_b",
    image_size: int = 1024,
    checkpoint: str | Path | None = None,
    *,
    drop_path_rate: float = 0.0,
    encoder_init: str | Path | None = None,
    strict: bool = True,
    lora: dict | None = None,
) -> Sam:
    """A SAM model of the given variant (vit_t | vit_b | vit_l | vit_h) at image_size.

    ``checkpoint`` may be an official ``sam_vit_*.pth``, an export of samtrain (``.pth`` or
    ``.safetensors``) or a Lightning checkpoint; weights made at another image size are resampled.
    ``encoder_init`` initialises the image encoder from MAE weights (``pretrain_mae.py``'s
    ``mae_encoder.safetensors`` or timm's MAE ViT); a full ``checkpoint`` still overrides it.
    ``lora`` (``{rank, alpha, targets, dropout}``, see ``samtrain.models.lora.add_lora``) adds LoRA
    layers to the encoder after the weights are loaded and freezes the encoder's other parameters.
    """
    grid = image_size // PATCH_SIZE
    model = Sam(
        image_encoder=build_image_encoder(variant, image_size=image_size, drop_path_rate=drop_path_rate),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        image_size=image_size,
        variant=variant,
    )
    if encoder_init is not None:
        log.info("%s", init_encoder_from_mae(model, encoder_init))
    if checkpoint is not None:
        from samtrain.models.checkpoint import load_sam_checkpoint

        report = load_sam_checkpoint(model, checkpoint, strict=strict)
        log.info("%s", report)
    if lora:
        wrapped = add_lora(model.image_encoder, **lora)
        log.info("LoRA on %d encoder layers, the rest of the encoder frozen: %s", len(wrapped), wrapped)
    return model
