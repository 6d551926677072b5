"""The SAM variants: building a model of any variant and image size (optionally from a checkpoint),
and exporting one in the official layout."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from samtrain.models.checkpoint import (
    exportable_state,
    load_sam_checkpoint,
    resample_position_tensors,
    samtrain_to_official,
    write_state_dict,
)
from samtrain.models.lora import add_lora
from samtrain.models.mae_transfer import init_encoder_from_mae
from samtrain.models.sam.image_encoder import ENCODER_SPECS, PATCH_SIZE, build_image_encoder
from samtrain.models.sam.mask_decoder import MaskDecoder
from samtrain.models.sam.model import Sam
from samtrain.models.sam.prompt_encoder import PromptEncoder
from samtrain.models.sam.transformer import TwoWayTransformer
from samtrain.models.sam2.build import SAM2_VARIANTS, build_sam2
from samtrain.models.sam2.checkpoint import export_sam2_checkpoint
from samtrain.models.sam2.model import Sam2

log = logging.getLogger(__name__)

PROMPT_EMBED_DIM = 256
SAM_VARIANTS = tuple(ENCODER_SPECS)  # SAM 1; SAM2_VARIANTS (samtrain.models.sam2.build) build a Sam2


def build_sam(
    variant: str = "vit_b",
    image_size: int = 1024,
    checkpoint: str | Path | None = None,
    *,
    drop_path_rate: float = 0.0,
    encoder_init: str | Path | None = None,
    strict: bool = True,
    lora: dict | None = None,
) -> Sam | Sam2:
    """A SAM model of the given variant (vit_t | vit_b | vit_l | vit_h) at image_size; a SAM 2.1
    variant (sam2.1_hiera_t | s | b+ | l, nano sam2.1_hiera_n) builds a Sam2 (see
    ``samtrain.models.sam2.build.build_sam2``; encoder_init is SAM's only).

    ``checkpoint`` may be an official ``sam_vit_*.pth``, an export of samtrain (``.pth`` or
    ``.safetensors``) or a Lightning checkpoint; weights made at another image size are resampled.
    ``encoder_init`` initialises the image encoder from MAE weights (``pretrain_mae.py``'s
    ``mae_encoder.safetensors`` or timm's MAE ViT); a full ``checkpoint`` still overrides it.
    ``lora`` (``{rank, alpha, targets, dropout}``, see ``samtrain.models.lora.add_lora``) adds LoRA
    layers to the encoder after the weights are loaded and freezes the encoder's other parameters.
    """
    if variant in SAM2_VARIANTS:
        if encoder_init is not None:
            raise ValueError(
                f"encoder_init (MAE weights for a ViT) does not apply to the SAM 2 variant {variant!r}"
            )
        return build_sam2(
            variant, image_size, checkpoint, drop_path_rate=drop_path_rate, strict=strict, lora=lora
        )
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
        report = load_sam_checkpoint(model, checkpoint, strict=strict)
        log.info("%s", report)
    if lora:
        wrapped = add_lora(model.image_encoder, **lora)
        log.info("LoRA on %d encoder layers, the rest of the encoder frozen: %s", len(wrapped), wrapped)
    return model


def export_sam_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | None = None,
    original: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's weights in the official SAM layout; safetensors when the suffix says so.
    LoRA layers are written merged into their base weights (the model itself is left as it is).
    A Sam2 is written in the official SAM 2 layout, into ``original`` (an official checkpoint whose
    other keys are kept bit for bit) when given: ``samtrain.models.sam2.checkpoint.export_sam2_checkpoint``.

    image_size: the input size the file is made for, its position embedding and relative position
    tables resampled to it (None: the model's own). The official ``sam_model_registry`` builds at
    1024 px, so a model trained at another size loads there strictly with ``image_size=1024``.

    state: the weights to write when they are not ``model.state_dict()``: a sharded (FSDP2) model's
    full state, gathered on every rank (``samtrain.lightning.sharding.gathered_state``).
    """
    if isinstance(model, Sam2):
        if image_size not in (None, model.image_size):
            raise ValueError(f"export at image_size={image_size}: a SAM 2.1 model exports at its own size")
        return export_sam2_checkpoint(model, path, original=original, state=state)
    if original is not None:
        raise ValueError("original= applies to SAM 2 models only: a SAM checkpoint has no parts a Sam lacks")
    state = exportable_state(model, state)
    if image_size is not None and image_size != model.image_size:
        if getattr(model, "variant", None) is None:
            raise ValueError(
                f"export at image_size={image_size} needs the model's variant to know its position "
                "tensors' shapes: build it with build_sam(variant, ...)"
            )
        resample_position_tensors(state, _state_shapes(model.variant, image_size))
    return write_state_dict(samtrain_to_official(state), path)


def _state_shapes(variant: str, image_size: int) -> dict[str, torch.Tensor]:
    """The state dict of an empty ``build_sam(variant, image_size)``, on the meta device (shapes only)."""
    with torch.device("meta"):
        return build_sam(variant, image_size=image_size).state_dict()
