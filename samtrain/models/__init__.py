"""Models and their weights (no Lightning): the SAM and SAM 2.1 families, LoRA, MAE; building,
loading and export."""

from samtrain.models.build import SAM_VARIANTS, build_sam, export_sam_checkpoint
from samtrain.models.checkpoint import LoadReport, load_sam_checkpoint
from samtrain.models.sam import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from samtrain.models.sam2 import Sam2, Sam2ImageFeatures
from samtrain.models.sam2.build import SAM2_VARIANTS, build_sam2
from samtrain.models.sam2.checkpoint import export_sam2_checkpoint, load_sam2_checkpoint

__all__ = [
    "SAM2_VARIANTS",
    "SAM_VARIANTS",
    "LoadReport",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "Sam2",
    "Sam2ImageFeatures",
    "TwoWayTransformer",
    "build_sam",
    "build_sam2",
    "export_sam2_checkpoint",
    "export_sam_checkpoint",
    "load_sam2_checkpoint",
    "load_sam_checkpoint",
]
