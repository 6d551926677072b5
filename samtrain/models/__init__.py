"""Models and their weights (no Lightning): the SAM family, LoRA, MAE; building, loading and export."""

from samtrain.models.build import SAM_VARIANTS, build_sam, export_sam_checkpoint
from samtrain.models.checkpoint import LoadReport, load_sam_checkpoint
from samtrain.models.sam import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

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
