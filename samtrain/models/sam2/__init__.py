"""SAM 2.1 on images: Hiera image encoder (timm), SAM's prompt encoder, SAM 2's mask decoder."""

from samtrain.models.sam2.image_encoder import Sam2ImageEncoder, Sam2ImageFeatures
from samtrain.models.sam2.mask_decoder import Sam2DecoderImage, Sam2MaskDecoder
from samtrain.models.sam2.model import Sam2

__all__ = ["Sam2", "Sam2DecoderImage", "Sam2ImageEncoder", "Sam2ImageFeatures", "Sam2MaskDecoder"]
