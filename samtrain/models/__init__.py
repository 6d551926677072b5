"""The SAM model: timm image encoder, prompt encoder, two-way mask decoder."""

from samtrain.models.build import SAM_VARIANTS, build_sam
from samtrain.models.checkpoint import LoadReport, export_sam_checkpoint, load_sam_checkpoint
from samtrain.models.mask_decoder import MaskDecoder
from samtrain.models.prompt_encoder import PromptEncoder
from samtrain.models.sam import Sam
from samtrain.models.transformer import TwoWayTransformer

__all__ = [
    "SAM_VARIANTS",
    "LoadReport",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "build_sam",
    "export_sam_checkpoint",
    "load_sam_checkpoint",
]
