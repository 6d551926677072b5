"""SAM's interaction without Lightning: prompt sampling, keyed randomness, the simulated interaction
of a training step, losses (SAM's and SAM 2's), the evaluation protocols and their metrics."""

from samtrain.interactive.losses import dice_loss, mask_iou, sam2_loss, sam_loss, sigmoid_focal_loss
from samtrain.interactive.prompts import sample_error_points, sample_initial_prompts
from samtrain.interactive.simulate import LossWeights, PromptRecipe, Prompts, simulate_interaction

__all__ = [
    "LossWeights",
    "PromptRecipe",
    "Prompts",
    "dice_loss",
    "mask_iou",
    "sam2_loss",
    "sam_loss",
    "sample_error_points",
    "sample_initial_prompts",
    "sigmoid_focal_loss",
    "simulate_interaction",
]
