"""The SAM 2.1 variants: building a Sam2 of any variant and image size, optionally from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from samtrain.models.lora import add_lora
from samtrain.models.sam.prompt_encoder import PromptEncoder
from samtrain.models.sam.transformer import TwoWayTransformer
from samtrain.models.sam2.checkpoint import load_sam2_checkpoint
from samtrain.models.sam2.image_encoder import NECK_CHANNELS, TOTAL_STRIDE, HieraSpec, Sam2ImageEncoder
from samtrain.models.sam2.mask_decoder import Sam2MaskDecoder
from samtrain.models.sam2.model import Sam2

log = logging.getLogger(__name__)

# The trunks of the official 2.1 configs (configs/sam2.1/sam2.1_hiera_*.yaml), and a nano one of
# the same structure for tests and CPU demos.
HIERA_SPECS: dict[str, HieraSpec] = {
    "sam2.1_hiera_n": HieraSpec(
        "sam2_hiera_tiny",
        embed_dim=16,
        stages=(1, 1, 2, 1),
        global_att_blocks=(3,),
        window_spec=(8, 4, 4, 2),
        global_pos_size=(4, 4),
    ),
    "sam2.1_hiera_t": HieraSpec("sam2_hiera_tiny", stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9)),
    "sam2.1_hiera_s": HieraSpec("sam2_hiera_small", stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13)),
    "sam2.1_hiera_b+": HieraSpec(
        "sam2_hiera_base_plus",
        embed_dim=112,
        num_heads=2,
        stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        global_pos_size=(14, 14),
    ),
    "sam2.1_hiera_l": HieraSpec(
        "sam2_hiera_large",
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_spec=(8, 4, 16, 8),
    ),
}
SAM2_VARIANTS = tuple(HIERA_SPECS)
BACKBONE_STRIDE = 16  # of the decoder's image embedding


def check_image_size(variant: str, image_size: int) -> None:
    """Hiera needs S / 32 whole (three 2x2 poolings after the stride-4 patch embedding, and the FPN's
    exact 2x top-down steps) and S / 4 a multiple of the first window (its position embedding tiles)."""
    window = HIERA_SPECS[variant].window_spec[0]
    step = max(TOTAL_STRIDE, 4 * window)
    if image_size <= 0 or image_size % step:
        raise ValueError(f"{variant} needs an image_size that is a multiple of {step}, got {image_size}")


def build_sam2(
    variant: str = "sam2.1_hiera_t",
    image_size: int = 1024,
    checkpoint: str | Path | None = None,
    *,
    drop_path_rate: float = 0.0,
    strict: bool = True,
    lora: dict | None = None,
) -> Sam2:
    """A SAM 2.1 image model (sam2.1_hiera_t | s | b+ | l, or the nano sam2.1_hiera_n) at image_size.

    ``checkpoint``: an official ``sam2.1_hiera_*.pt`` (its video-memory keys are ignored and counted),
    an export of samtrain, a Lightning checkpoint or a Hugging Face Sam2Model directory. The trunk's
    position embedding is interpolated to the grid at run time, so weights of any image size load as
    they are.
    ``lora`` (``{rank, alpha, targets, dropout}``, see ``samtrain.models.lora.add_lora``) adds LoRA
    layers to the trunk's blocks after the weights are loaded and freezes the rest of the image
    encoder (trunk, neck, ``conv_s0``/``conv_s1``, ``no_mem_embed``).
    """
    if variant not in HIERA_SPECS:
        raise ValueError(f"unknown SAM 2 variant {variant!r}; choose one of {sorted(HIERA_SPECS)}")
    check_image_size(variant, image_size)
    grid = image_size // BACKBONE_STRIDE
    model = Sam2(
        image_encoder=Sam2ImageEncoder(spec=HIERA_SPECS[variant], scalp=1, drop_path_rate=drop_path_rate),
        prompt_encoder=PromptEncoder(
            embed_dim=NECK_CHANNELS,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=Sam2MaskDecoder(
            transformer_dim=NECK_CHANNELS,
            transformer=TwoWayTransformer(depth=2, embedding_dim=NECK_CHANNELS, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            iou_prediction_use_sigmoid=True,
            pred_obj_scores_mlp=True,
            dynamic_multimask_via_stability=True,
            stability_delta=0.05,
            stability_thresh=0.98,
        ),
        image_size=image_size,
        variant=variant,
    )
    if checkpoint is not None:
        log.info("%s", load_sam2_checkpoint(model, checkpoint, strict=strict))
    if lora:
        wrapped = add_lora(model.image_encoder, **lora)
        log.info("LoRA on %d trunk layers, the rest of the image encoder frozen: %s", len(wrapped), wrapped)
    return model
