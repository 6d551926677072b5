"""Prompt simulation for SAM's interactive training recipe (SAM paper, arXiv 2304.02643, appendix A).

Conventions used throughout:

- A point is ``(x, y)`` in the pixel grid of the masks it was drawn from: the pixel at row ``i``,
  column ``j`` is the point ``(x=j, y=i)`` as float. SAM's prompt encoder adds the 0.5 itself.
- Point labels are int64: ``1`` positive click, ``0`` negative click, ``-1`` padding ("not a point"),
  ``2`` box top-left corner, ``3`` box bottom-right corner. A box is therefore two points, which lets
  one tensor hold point-first and box-first prompts side by side.
- Randomness only comes from an explicit source on the masks' device: a ``torch.Generator``, or a
  :class:`~samtrain.interactive.keyed_random.KeyedRandom` whose numbers follow each mask's identity (training:
  the same mask draws the same numbers on any rank and in any batch).
- The training-time samplers run on the masks' device without host synchronisation and without a
  Python loop over masks.
"""

from __future__ import annotations

import numpy as np
import torch

from samtrain.interactive.keyed_random import KeyedRandom, hash_keys, mix_seed
from samtrain.models.sam.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PADDING, POSITIVE

__all__ = [
    "click_schedule",
    "jitter_boxes",
    "mask_keys",
    "masks_to_boxes",
    "sample_error_points",
    "sample_initial_prompts",
    "sample_points_in_masks",
    "step_generators",
]


ERROR_POINT_METHODS = ("uniform", "center")
BOX_NOISE = ("gaussian", "uniform")


# ----------------------------------------------------------------------------------------------------------
# validation helpers


def _check_masks(masks: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """Return ``masks`` as bool (N, H, W); integer masks are accepted and compared with zero."""
    if not isinstance(masks, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got shape {tuple(masks.shape)}")
    if masks.dtype == torch.bool:
        return masks
    if masks.dtype.is_floating_point or masks.dtype.is_complex:
        raise ValueError(f"{name} must be bool (or integer) masks, got dtype {masks.dtype}; threshold first")
    return masks != 0


RandomSource = torch.Generator | KeyedRandom


def _check_generator(generator: RandomSource | None, device: torch.device, who: str) -> RandomSource:
    if not isinstance(generator, torch.Generator | KeyedRandom):
        raise ValueError(
            f"{who} needs an explicit torch.Generator or KeyedRandom (generator=...), got {generator!r}"
        )
    if generator.device.type != device.type:
        raise ValueError(
            f"{who}: the generator lives on {generator.device} but the tensors on {device}; "
            "create it on the same device"
        )
    return generator


def _uniform(source: RandomSource, n: int, device: torch.device) -> torch.Tensor:
    """float32 (n,) uniform in [0, 1) from either kind of source."""
    if isinstance(source, KeyedRandom):
        _check_rows(source, n)
        return source.rand(1)[:, 0]
    return torch.rand(n, generator=source, device=device)


def _normal(source: RandomSource, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """float32 ``shape`` = (n, k) standard normal from either kind of source."""
    if isinstance(source, KeyedRandom):
        _check_rows(source, shape[0])
        return source.randn(shape[1])
    return torch.randn(shape, generator=source, device=device)


def _uniform_rows(source: RandomSource, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """float32 ``shape`` = (n, k) uniform in [0, 1) from either kind of source."""
    if isinstance(source, KeyedRandom):
        _check_rows(source, shape[0])
        return source.rand(shape[1])
    return torch.rand(shape, generator=source, device=device)


def _check_rows(source: KeyedRandom, n: int) -> None:
    if len(source) != n:
        raise ValueError(f"the KeyedRandom has {len(source)} keys but {n} masks draw from it")


# ----------------------------------------------------------------------------------------------------------
# points and boxes


def _flat_index_to_xy(index: torch.Tensor, width: int) -> torch.Tensor:
    """``(...) int64`` flat row-major pixel index -> ``(..., 2) float32`` points ``(x, y)``."""
    return torch.stack((index % width, index // width), dim=-1).to(torch.float32)


def _sample_flat_index(
    masks: torch.Tensor, generator: RandomSource | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one pixel uniformly from each mask.

    Args:
        masks: ``(N, H, W) bool``.
        generator: on the masks' device (None: torch's global generator).

    Returns:
        index ``(N,) int64`` flat row-major pixel index (undefined for an empty mask) and
        nonempty ``(N,) bool``.
    """
    flat = masks.flatten(1)
    # int32 halves the memory of the running count; a mask has far fewer than 2**31 pixels.
    cumsum = flat.cumsum(1, dtype=torch.int32)
    counts = cumsum[:, -1] if flat.shape[1] > 0 else flat.new_zeros(flat.shape[0], dtype=torch.int32)
    if generator is None:
        u = torch.rand(flat.shape[0], device=masks.device)
    else:
        u = _uniform(generator, flat.shape[0], masks.device)
    # rank r in [0, count): the chosen pixel is the first whose running count exceeds r.
    rank = (u * counts).floor().to(torch.int32).clamp(max=(counts - 1).clamp(min=0))
    index = torch.searchsorted(cumsum, rank[:, None], right=True).squeeze(1)
    return index.clamp(max=max(flat.shape[1] - 1, 0)), counts > 0


def sample_points_in_masks(masks: torch.Tensor, *, generator: RandomSource) -> torch.Tensor:
    """One point drawn uniformly from the pixels of each mask.

    Args:
        masks: ``(N, H, W) bool``.
        generator: ``torch.Generator`` or ``KeyedRandom`` on the masks' device.

    Returns:
        ``(N, 2) float32`` points ``(x, y)``. An empty mask gets the image centre pixel
        ``(x=W // 2, y=H // 2)``.
    """
    masks = _check_masks(masks)
    generator = _check_generator(generator, masks.device, "sample_points_in_masks")
    height, width = masks.shape[-2:]
    index, nonempty = _sample_flat_index(masks, generator)
    centre = torch.full_like(index, (height // 2) * width + width // 2)
    return _flat_index_to_xy(torch.where(nonempty, index, centre), width)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around masks.

    Args:
        masks: ``(N, H, W) bool``.

    Returns:
        ``(N, 4) float32`` boxes ``(x1, y1, x2, y2)`` with inclusive pixel indices
        (x = column, y = row); all zeros for an empty mask.
    """
    masks = _check_masks(masks)
    height, width = masks.shape[-2:]
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(width, device=masks.device)
    ys = torch.arange(height, device=masks.device)
    boxes = torch.stack(
        (
            torch.where(cols, xs, width).amin(dim=1),
            torch.where(rows, ys, height).amin(dim=1),
            torch.where(cols, xs, -1).amax(dim=1),
            torch.where(rows, ys, -1).amax(dim=1),
        ),
        dim=1,
    )
    return torch.where(rows.any(dim=1, keepdim=True), boxes, 0).to(torch.float32)


def jitter_boxes(
    boxes: torch.Tensor,
    *,
    image_size: tuple[int, int],
    noise_std: float = 0.1,
    noise_max: float = 20.0,
    generator: RandomSource,
    distribution: str = "gaussian",
) -> torch.Tensor:
    """Add box noise per coordinate, scaled by the box side (``x2 - x1`` for x, ``y2 - y1`` for y).

    - ``"gaussian"`` (SAM): std ``noise_std`` times the side, each offset clamped to
      ``[-noise_max, noise_max]`` pixels.
    - ``"uniform"`` (SAM 2's ``sample_box_points``): uniform in ``[-b, b]`` with
      ``b = min(noise_std * side, noise_max)``.

    The box is then clipped to ``[0, W-1] x [0, H-1]`` and its corners re-ordered so that
    ``x1 <= x2`` and ``y1 <= y2``.

    Args:
        boxes: ``(N, 4) float`` ``(x1, y1, x2, y2)``.
        image_size: ``(H, W)`` of the pixel grid the boxes live in.
        generator: on the boxes' device.
        distribution: ``"gaussian"`` or ``"uniform"``.

    Returns:
        ``(N, 4) float`` jittered boxes (float32 for non-float input).
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got shape {tuple(boxes.shape)}")
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {image_size!r}")
    generator = _check_generator(generator, boxes.device, "jitter_boxes")
    if not boxes.dtype.is_floating_point:
        boxes = boxes.to(torch.float32)
    height, width = image_size
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (w, h, w, h)
    if distribution == "gaussian":
        noise = _normal(generator, tuple(boxes.shape), boxes.device).to(boxes.dtype)
        offset = (noise * noise_std * side).clamp(-noise_max, noise_max)
    elif distribution == "uniform":
        noise = _uniform_rows(generator, tuple(boxes.shape), boxes.device).to(boxes.dtype)
        offset = (2 * noise - 1) * (noise_std * side).clamp(max=noise_max)
    else:
        raise ValueError(f"unknown box noise distribution {distribution!r}; expected one of {BOX_NOISE}")
    noisy = boxes + offset
    upper = torch.tensor([width - 1, height - 1], device=boxes.device, dtype=boxes.dtype).repeat(2)
    noisy = noisy.clamp(min=0).minimum(upper)
    x1, y1, x2, y2 = noisy.unbind(1)
    return torch.stack((x1.minimum(x2), y1.minimum(y2), x1.maximum(x2), y1.maximum(y2)), dim=1)


def sample_initial_prompts(
    masks: torch.Tensor,
    *,
    point_prob: float = 0.5,
    generator: RandomSource,
    box_noise_std: float = 0.1,
    box_noise_max: float = 20.0,
    choice_generator: RandomSource | None = None,
    box_noise: str = "gaussian",
) -> tuple[torch.Tensor, torch.Tensor]:
    """First prompt per mask: a positive point uniform in the mask, or its jittered box.

    Args:
        masks: ``(N, H, W) bool``.
        point_prob: probability of a point prompt (1: all points, 0: all boxes).
        generator: per-mask draws (point position, box noise), on the masks' device.
        box_noise_std, box_noise_max, box_noise: see :func:`jitter_boxes` (``box_noise`` is its
            ``distribution``).
        choice_generator: draws the point-or-box choice of each mask (default: ``generator``).

    Returns:
        coords ``(N, 2, 2) float32`` and labels ``(N, 2) int64``: ``[1, -1]`` (the point, then a
        padding point at ``(0, 0)``) for point prompts, ``[2, 3]`` (box corners) for box prompts.
    """
    masks = _check_masks(masks)
    if not 0.0 <= point_prob <= 1.0:
        raise ValueError(f"point_prob must be in [0, 1], got {point_prob}")
    generator = _check_generator(generator, masks.device, "sample_initial_prompts")
    choice_generator = _check_generator(
        generator if choice_generator is None else choice_generator, masks.device, "sample_initial_prompts"
    )
    n, height, width = masks.shape
    is_point = _uniform(choice_generator, n, masks.device) < point_prob

    points = sample_points_in_masks(masks, generator=generator)
    point_coords = torch.stack((points, torch.zeros_like(points)), dim=1)
    boxes = jitter_boxes(
        masks_to_boxes(masks),
        image_size=(height, width),
        noise_std=box_noise_std,
        noise_max=box_noise_max,
        generator=generator,
        distribution=box_noise,
    )
    coords = torch.where(is_point[:, None, None], point_coords, boxes.view(n, 2, 2))

    point_labels = torch.tensor([POSITIVE, PADDING], device=masks.device)
    box_labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=masks.device)
    labels = torch.where(is_point[:, None], point_labels, box_labels)
    return coords, labels


# ----------------------------------------------------------------------------------------------------------
# corrective clicks


def sample_error_points(
    gt_masks: torch.Tensor,
    pred_masks: torch.Tensor,
    method: str = "uniform",
    generator: RandomSource | None = None,
    *,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per mask in the error region of a prediction.

    A click in a false negative (``gt & ~pred``) is positive (label 1), one in a false positive
    (``~gt & pred``) negative (label 0).

    - ``"uniform"`` (training): uniform over the whole error region, the label given by the part it
      fell in. On the masks' device, no host sync; needs ``generator`` on that device.
    - ``"center"`` (evaluation, the RITM rule): per mask on the host, the exact L2 distance transform
      of the FN and FP regions, each padded by 1 px of background; positive when the FN maximum is
      strictly larger; the click is the first pixel in row-major order at the chosen maximum.

    Where prediction and truth agree everywhere the click is negative, on the background (uniform,
    or the background's distance-transform maximum for ``"center"``); with no background either it
    is pixel ``(0, 0)``, label 0.

    With ``valid`` (the image inside its padding), pixels outside it are neither error nor
    background, so no click falls in the padding (the evaluation protocol's rule).

    Args:
        gt_masks, pred_masks: ``(N, H, W) bool``.
        method: ``"uniform"`` or ``"center"``.
        generator: required for ``"uniform"``, unused by ``"center"``.
        valid: optional ``bool`` broadcastable to ``(N, H, W)``, True inside the image.

    Returns:
        points ``(N, 1, 2) float32`` ``(x, y)`` and labels ``(N, 1) int64``, on the input device.
    """
    gt_masks = _check_masks(gt_masks, "gt_masks")
    pred_masks = _check_masks(pred_masks, "pred_masks")
    if gt_masks.shape != pred_masks.shape:
        raise ValueError(
            f"gt_masks and pred_masks must have the same shape, got {tuple(gt_masks.shape)} "
            f"and {tuple(pred_masks.shape)}"
        )
    if pred_masks.device != gt_masks.device:
        raise ValueError(f"gt_masks on {gt_masks.device} but pred_masks on {pred_masks.device}")
    if valid is not None:
        valid = _check_valid(valid, gt_masks)
    if method == "uniform":
        if generator is not None:  # None draws from torch's global generator (not reproducible per step)
            generator = _check_generator(generator, gt_masks.device, "sample_error_points(method='uniform')")
        return _error_points_uniform(gt_masks, pred_masks, generator, valid)
    if method == "center":
        if valid is not None:  # outside the image: both truth and prediction, so no error and no background
            gt_masks, pred_masks = gt_masks | ~valid, pred_masks | ~valid
        return _error_points_center(gt_masks, pred_masks)
    raise ValueError(f"unknown method {method!r}; expected one of {ERROR_POINT_METHODS}")


def _check_valid(valid: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {getattr(valid, 'dtype', type(valid))}")
    if valid.device != gt_masks.device:
        raise ValueError(f"gt_masks on {gt_masks.device} but valid on {valid.device}")
    try:
        shape = torch.broadcast_shapes(valid.shape, gt_masks.shape)
    except RuntimeError:
        shape = None
    if shape != gt_masks.shape:
        raise ValueError(
            f"valid of shape {tuple(valid.shape)} does not broadcast to the masks' {tuple(gt_masks.shape)}"
        )
    return valid


def _error_points_uniform(
    gt: torch.Tensor, pred: torch.Tensor, generator: RandomSource | None, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    false_neg = gt & ~pred
    error = gt ^ pred
    background = ~gt
    if valid is not None:
        error &= valid
        background &= valid
    has_error = error.flatten(1).any(1)
    region = torch.where(has_error[:, None, None], error, background)
    index, nonempty = _sample_flat_index(region, generator)
    index = torch.where(nonempty, index, 0)[:, None]  # (N, 1); pixel (0, 0) when nothing to click
    labels = false_neg.flatten(1).gather(1, index).to(torch.int64)
    return _flat_index_to_xy(index, gt.shape[-1]), labels


def _padded_distance_max(region: np.ndarray) -> tuple[float, int]:
    """Max of the exact L2 distance transform of ``(H, W) bool`` padded by 1 px of background,
    and the flat row-major index of its first occurrence."""
    import cv2  # heavy import kept off the training path

    padded = np.pad(region, 1).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    index = int(np.argmax(dist))  # argmax returns the first maximum in row-major order
    return float(dist.flat[index]), index


def _center_click(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """RITM click for one ``(H, W) bool`` pair: ``(flat index, label)``."""
    fn_max, fn_index = _padded_distance_max(gt & ~pred)
    fp_max, fp_index = _padded_distance_max(~gt & pred)
    if fn_max > fp_max:
        return fn_index, POSITIVE
    if fp_max > 0:
        return fp_index, NEGATIVE
    bg_max, bg_index = _padded_distance_max(~gt)  # no error: click the background
    return (bg_index if bg_max > 0 else 0), NEGATIVE


def _error_points_center(gt: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gt_np = gt.cpu().numpy()
    pred_np = pred.cpu().numpy()
    clicks = [_center_click(g, p) for g, p in zip(gt_np, pred_np, strict=True)]
    index = torch.tensor([c[0] for c in clicks], dtype=torch.int64).view(-1, 1)
    labels = torch.tensor([c[1] for c in clicks], dtype=torch.int64).view(-1, 1)
    points = _flat_index_to_xy(index, gt.shape[-1])
    return points.to(gt.device), labels.to(gt.device)


# ----------------------------------------------------------------------------------------------------------
# schedule and seeding


def click_schedule(
    *, num_click_passes: int = 8, num_mask_only_passes: int = 2, generator: torch.Generator
) -> list[bool]:
    """Which of the passes after the initial prompt add a click.

    The last mask-only pass is always the final pass; the other ``num_mask_only_passes - 1`` fall at
    random positions among the earlier passes (SAM: 8 click passes, one mask-only pass at a random
    position among them and one at the end). The choice is structural: pass a generator seeded
    alike on every rank. A CUDA generator costs one tiny host sync here (the schedule drives
    Python control flow anyway).

    Returns:
        ``list[bool]`` of length ``num_click_passes + num_mask_only_passes``: True = the pass adds a
        click, False = mask-only pass (previous logits fed back, no new click).
    """
    if num_click_passes < 0 or num_mask_only_passes < 0:
        raise ValueError(
            f"pass counts must be >= 0, got num_click_passes={num_click_passes}, "
            f"num_mask_only_passes={num_mask_only_passes}"
        )
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"click_schedule needs an explicit torch.Generator, got {generator!r}")
    schedule = [True] * (num_click_passes + num_mask_only_passes)
    if num_mask_only_passes == 0:
        return schedule
    schedule[-1] = False
    earlier = num_click_passes + num_mask_only_passes - 1
    order = torch.randperm(earlier, generator=generator, device=generator.device)
    for position in order[: num_mask_only_passes - 1].tolist():
        schedule[position] = False
    return schedule


def mask_keys(image_ids: torch.Tensor, mask_image_index: torch.Tensor) -> torch.Tensor:
    """The identity of each mask of a batch: its image's id and its ordinal among that image's masks.

    Args:
        image_ids: int64 (B,) ids of the batch's images.
        mask_image_index: int64 (N,) the batch index of each mask's image, grouped by image.

    Returns:
        int64 (N,) keys, equal for the same mask of the same image in any batch.
    """
    counts = torch.zeros_like(image_ids).index_add_(0, mask_image_index, torch.ones_like(mask_image_index))
    starts = counts.cumsum(0) - counts
    ordinal = torch.arange(len(mask_image_index), device=mask_image_index.device) - starts[mask_image_index]
    return hash_keys(image_ids[mask_image_index], ordinal)


def step_generators(seed: int, step: int, keys: torch.Tensor) -> tuple[torch.Generator, KeyedRandom]:
    """The random sources of one training step.

    Args:
        seed: the run seed.
        step: the global step.
        keys: int64 (N,) mask identities (:func:`mask_keys`).

    Returns:
        ``(structural, per_mask)``: ``structural`` (a generator seeded from ``(seed, step)``) makes
        the choices that shape the step, alike on every rank (where the mask-only passes fall,
        whether the ground truth is a mask prompt); ``per_mask`` draws each mask's point or box,
        box noise and clicks from its key. Both depend only on their inputs, so DDP ranks, a
        single process with the same global batch, and a resumed run all draw the same numbers.
    """
    structural = torch.Generator(device=keys.device)
    structural.manual_seed(mix_seed("structural", int(seed), int(step)))
    return structural, KeyedRandom(keys, salt=mix_seed("per_mask", int(seed), int(step)))
