"""Using a trained model: the predictor."""

from samtrain.inference.predictor import SamPredictor

__all__ = ["SamPredictor"]
