"""SAM (arXiv 2304.02643): timm's samvit image encoder, the prompt encoder, the two-way
transformer and the mask decoder, composed by :class:`Sam`."""

from samtrain.models.sam.mask_decoder import DecoderImage, MaskDecoder
from samtrain.models.sam.model import Sam
from samtrain.models.sam.prompt_encoder import PromptEncoder
from samtrain.models.sam.transformer import TwoWayTransformer

__all__ = ["DecoderImage", "MaskDecoder", "PromptEncoder", "Sam", "TwoWayTransformer"]
