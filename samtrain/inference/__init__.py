"""Using a trained model: the predictor and the automatic mask generator."""

from samtrain.inference.automatic import AutomaticMaskGenerator
from samtrain.inference.predictor import SamPredictor

__all__ = ["AutomaticMaskGenerator", "SamPredictor"]
