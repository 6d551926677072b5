"""The simulated interaction of one training step (SAM paper, arXiv 2304.02643, appendix A).

Pass 0 prompts every mask with a positive point or a jittered box; then the click schedule runs
8 passes that add a click drawn uniformly from the error region of the previous prediction and
2 that add none. Every pass after the first feeds the previous low-res logits back as the mask
prompt. Single-point prompts get the multimask outputs (the loss on the best of them), the others
the single output; the output with the highest predicted IoU is fed back and clicked on.

The model enters only through ``decode``, a callable from the prompts of all masks to their
low-res logits and IoU predictions, so any implementation of SAM's decoder (samtrain's batched
``Sam.decode_masks``, the official modules called per image) runs the same recipe with the same
draws. Nothing here knows about Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samtrain.frame import masks_in_frame
from samtrain.interactive.losses import SamLoss, sam_loss
from samtrain.interactive.prompts import (
    click_schedule,
    sample_error_points,
    sample_initial_prompts,
    step_generators,
)
from samtrain.models.sam.prompt_encoder import BOX_TOP_LEFT, NEGATIVE, POSITIVE

GT_MASK_LOGIT = 10.0  # magnitude of the logits that stand for a ground-truth mask prompt


@dataclass
class PromptRecipe:
    """How prompts are simulated during training (defaults: the SAM paper)."""

    point_prob: float = 0.5
    box_noise_std: float = 0.1
    box_noise_max: float = 20.0
    num_click_passes: int = 8
    num_mask_only_passes: int = 2
    # Probability that a step's first pass also receives each mask's ground truth as the mask
    # prompt (a structural choice: the same on every rank).
    gt_mask_prob: float = 0.0


@dataclass
class LossWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    iou_supervision: str = "all"
    # False: low-res logits against downsampled targets (SAM); True: logits upsampled to S.
    full_resolution: bool = False


@dataclass
class Prompts:
    """The prompts of every mask for one decoder pass."""

    coords: torch.Tensor  # (N, T, 2) (x, y) in the model-input frame
    labels: torch.Tensor  # (N, T)
    mask_input: torch.Tensor | None  # (N, 1, S/4, S/4) logits fed back, detached


# prompts -> low-res logits (N, M, S/4, S/4) and IoU predictions (N, M); output 0 is the
# single-mask output, 1: the multimask outputs.
Decode = Callable[[Prompts], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Interaction:
    """What one step's interaction produced: the loss (the mean over passes) and its parts."""

    loss: torch.Tensor  # () with graph, unless every pass was backpropagated on its own
    logs: dict[str, torch.Tensor]  # detached scalars: loss, focal, dice, iou_mse, mIoU_first, mIoU_last
    num_passes: int


def masks_to_prompt_logits(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth masks (N, S, S) bool -> mask-prompt logits (N, 1, S/4, S/4) in [-10, 10],
    from the area fraction each low-res cell covers."""
    fraction = F.interpolate(masks[:, None].float(), size=size, mode="area")
    return (2 * fraction - 1) * GT_MASK_LOGIT


def output_candidates(labels: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """labels (N, T) -> (N, num_outputs) bool: the multimask outputs (1:) for a single-point
    prompt, the single-mask output (0) for everything else."""
    is_click = (labels == NEGATIVE) | (labels == POSITIVE)
    single_point = (is_click.sum(1) == 1) & ~(labels >= BOX_TOP_LEFT).any(1)
    is_multi = torch.arange(num_outputs, device=labels.device) > 0
    return torch.where(single_point[:, None], is_multi, ~is_multi)


def chosen_output(logits: torch.Tensor, iou_pred: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The output each mask continues from, the candidate with the highest predicted IoU:
    logits (N, M, h, w) -> detached (N, 1, h, w)."""
    best = iou_pred.detach().masked_fill(~candidates, float("-inf")).argmax(1)
    return logits.detach()[torch.arange(len(best), device=best.device), best].unsqueeze(1)


def pass_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    gt_masks: torch.Tensor,
    candidates: torch.Tensor,
    *,
    weights: LossWeights,
    num_masks: torch.Tensor | float,
) -> SamLoss:
    """SAM's loss of one pass: logits (N, M, h, w), iou_pred (N, M), gt (N, S, S), candidates (N, M)."""
    if weights.full_resolution:
        logits = F.interpolate(logits, size=gt_masks.shape[-2:], mode="bilinear", align_corners=False)
    return sam_loss(
        logits,
        iou_pred,
        gt_masks,
        valid=candidates,
        focal_weight=weights.focal,
        dice_weight=weights.dice,
        iou_weight=weights.iou,
        iou_supervision=weights.iou_supervision,
        num_masks=num_masks,
    )


def chosen_iou(result: SamLoss) -> torch.Tensor:
    """() the mean true IoU of the output each mask's loss was taken on."""
    if result.true_iou.numel() == 0:
        return result.true_iou.new_zeros(())
    return result.true_iou.gather(1, result.chosen[:, None]).mean()


def first_prompts(
    gt_masks: torch.Tensor, recipe: PromptRecipe, structural: torch.Generator, per_mask
) -> Prompts:
    """Pass 0: a positive point or a jittered box per mask (and, with probability
    ``gt_mask_prob`` for the whole step, the ground truth as the mask prompt)."""
    coords, labels = sample_initial_prompts(
        gt_masks,
        point_prob=recipe.point_prob,
        generator=per_mask,
        box_noise_std=recipe.box_noise_std,
        box_noise_max=recipe.box_noise_max,
    )
    mask_input = None
    if (
        recipe.gt_mask_prob > 0
        and torch.rand((), generator=structural, device=gt_masks.device) < recipe.gt_mask_prob
    ):
        low_res = gt_masks.shape[-1] // 4
        mask_input = masks_to_prompt_logits(gt_masks, (low_res, low_res))
    return Prompts(coords=coords, labels=labels, mask_input=mask_input)


def simulate_interaction(
    decode: Decode,
    gt_masks: torch.Tensor,
    *,
    valid: torch.Tensor,
    mask_keys: torch.Tensor,
    seed: int,
    step: int,
    recipe: PromptRecipe | None = None,
    loss_weights: LossWeights | None = None,
    num_masks: torch.Tensor | float | None = None,
    backward_pass: Callable[[torch.Tensor], None] | None = None,
) -> Interaction:
    """Runs the 1 + clicks + mask-only passes of one step over every mask at once.

    Args:
        decode: the decoder (see :data:`Decode`).
        gt_masks: (N, S, S) bool, the targets in the model-input frame.
        valid: (N, S, S) bool, each mask's image region (clicks never land in the padding).
        mask_keys: (N,) int64 identities (``prompts.mask_keys``): every per-mask draw follows them.
        seed, step: with the keys, seed every draw (``prompts.step_generators``).
        recipe, loss_weights: the SAM paper's by default.
        num_masks: the loss normaliser (the mean mask count per rank under DDP; default N).
        backward_pass: called with each pass's loss as soon as it is known (per-pass backward);
            the returned loss is then detached.
    """
    recipe = recipe or PromptRecipe()
    weights = loss_weights or LossWeights()
    num_masks = max(gt_masks.shape[0], 1) if num_masks is None else num_masks
    structural, per_mask = step_generators(seed, step, mask_keys)
    prompts = first_prompts(gt_masks, recipe, structural, per_mask)
    schedule = [
        False,
        *click_schedule(
            num_click_passes=recipe.num_click_passes,
            num_mask_only_passes=recipe.num_mask_only_passes,
            generator=structural,
        ),
    ]
    results: list[SamLoss] = []
    pred_masks = None
    for adds_click in schedule:
        if adds_click:
            point, label = sample_error_points(
                gt_masks, pred_masks, method="uniform", generator=per_mask, valid=valid
            )
            prompts.coords = torch.cat([prompts.coords, point], dim=1)
            prompts.labels = torch.cat([prompts.labels, label], dim=1)
        logits, iou_pred = decode(prompts)
        candidates = output_candidates(prompts.labels, logits.shape[1])
        result = pass_loss(logits, iou_pred, gt_masks, candidates, weights=weights, num_masks=num_masks)
        if backward_pass is not None:
            backward_pass(result.loss)
            result.loss = result.loss.detach()
        results.append(result)
        prompts.mask_input = chosen_output(logits, iou_pred, candidates)
        pred_masks = masks_in_frame(prompts.mask_input, valid)
    return Interaction(
        loss=torch.stack([r.loss for r in results]).mean(),
        logs=interaction_logs(results),
        num_passes=len(schedule),
    )


def interaction_logs(results: list[SamLoss]) -> dict[str, torch.Tensor]:
    """Detached scalars over the passes: the mean loss and its parts, the chosen outputs' true IoU
    at the first and the last pass."""

    def mean(name: str) -> torch.Tensor:
        return torch.stack([getattr(r, name) for r in results]).mean().detach()

    return {
        "loss": mean("loss"),
        "focal": mean("focal"),
        "dice": mean("dice"),
        "iou_mse": mean("iou"),
        "mIoU_first": chosen_iou(results[0]).detach(),
        "mIoU_last": chosen_iou(results[-1]).detach(),
    }
