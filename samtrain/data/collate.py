"""Batching of SAM samples: images stacked, instance masks of all images concatenated."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def mask_priority(image_ids: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
    """A pseudo-random rank for each mask from its identity alone: uint64 (N,) from int64 (N,)
    image ids and int64 (N,) ordinals among their image's masks (splitmix64's finaliser over both).
    The same mask gets the same rank in any batch, on any rank, worker or resumed run."""
    golden, mul1, mul2 = (np.uint64(c) for c in _MIX)
    with np.errstate(over="ignore"):
        h = image_ids.astype(np.int64).view(np.uint64) * golden ^ ordinals.astype(np.int64).view(np.uint64)
        h = (h ^ (h >> np.uint64(30))) * mul1
        h = (h ^ (h >> np.uint64(27))) * mul2
        return h ^ (h >> np.uint64(31))


def masks_within_cap(samples: Sequence[dict], max_masks: int) -> list[dict]:
    """The samples with at most ``max_masks`` masks among them all: those of lowest
    :func:`mask_priority` are kept, each image's in their order; images may keep none.

    The SAM paper's per-GPU cap (64 masks per GPU), beside the transform's per-image one: which
    masks stay depends only on the masks' identities (image id, ordinal) and on which samples share
    the batch, never on the rank, the worker or the order of batches, so DDP and resumed runs
    draw exactly what they would have drawn."""
    if max_masks <= 0:
        raise ValueError(f"max_masks_per_batch must be positive or None, got {max_masks}")
    counts = [len(s["masks"]) for s in samples]
    if sum(counts) <= max_masks:
        return list(samples)
    image_ids = np.repeat([int(s["image_id"]) for s in samples], counts)
    ordinals = np.concatenate([np.arange(c) for c in counts])
    kept = np.zeros(len(image_ids), dtype=bool)
    kept[np.argsort(mask_priority(image_ids, ordinals), kind="stable")[:max_masks]] = True
    starts = np.cumsum([0, *counts])
    return [
        {**s, "masks": s["masks"][torch.from_numpy(kept[starts[i] : starts[i + 1]])]}
        for i, s in enumerate(samples)
    ]


def collate_sam_batch(samples: Sequence[dict | None], *, max_masks_per_batch: int | None = None) -> dict:
    """Batch samples of the SAM sample contract (see ``samtrain.data.transforms``).

    None entries (samples that could not be read, see ``SkipBadSamples``) are dropped and counted;
    a batch whose samples all failed holds only ``"num_skipped"``. With ``max_masks_per_batch``
    the batch keeps at most that many masks in all (:func:`masks_within_cap`).

    Returns:
        "image":            float32 (B, 3, S, S), or "image_embedding" float32 (B, C, S/16, S/16) for
                            samples read from an embedding cache
        "high_res_features": (cached SAM 2.1 features) the finer levels, each float32 (B, C_l, h_l, w_l)
        "masks":            bool (N, S, S), every image's masks in image order (N = sum of K_i)
        "mask_image_index": int64 (N,), the batch index of each mask's image
        "input_size":       int64 (B, 2)
        "original_size":    int64 (B, 2)
        "image_id":         int64 (B,)
        "num_skipped":      int, the samples of this batch that could not be read
    """
    if len(samples) == 0:
        raise ValueError("collate_sam_batch got an empty list of samples")
    num_skipped = sum(s is None for s in samples)
    samples = [s for s in samples if s is not None]
    if not samples:
        return {"num_skipped": num_skipped}
    key = "image_embedding" if "image_embedding" in samples[0] else "image"
    sizes = {tuple(s[key].shape) for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"collate_sam_batch: samples have different {key} shapes {sorted(sizes)}")
    if max_masks_per_batch is not None:
        samples = masks_within_cap(samples, int(max_masks_per_batch))
    counts = torch.tensor([len(s["masks"]) for s in samples], dtype=torch.int64)
    finer = {}
    if "high_res_features" in samples[0]:
        levels = zip(*(s["high_res_features"] for s in samples), strict=True)
        finer["high_res_features"] = [torch.stack(level) for level in levels]
    return {
        key: torch.stack([s[key] for s in samples]),
        **finer,
        "masks": torch.cat([s["masks"] for s in samples]),
        "mask_image_index": torch.repeat_interleave(torch.arange(len(samples)), counts),
        "input_size": torch.stack([torch.as_tensor(s["input_size"], dtype=torch.int64) for s in samples]),
        "original_size": torch.stack(
            [torch.as_tensor(s["original_size"], dtype=torch.int64) for s in samples]
        ),
        "image_id": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.int64),
        "num_skipped": num_skipped,  # a Python int: reading it costs no device sync
    }


def collate_image_batch(samples: Sequence[torch.Tensor | None]) -> dict:
    """Batch image tensors (MAE's samples): each float32 (3, S, S), or None for a sample that could
    not be read (see ``SkipBadSamples``), dropped and counted as in ``collate_sam_batch``.

    Returns:
        "image":       float32 (B, 3, S, S), absent when every sample of the batch failed
        "num_skipped": int, the samples of this batch that could not be read
    """
    if len(samples) == 0:
        raise ValueError("collate_image_batch got an empty list of samples")
    images = [s for s in samples if s is not None]
    num_skipped = len(samples) - len(images)
    if not images:
        return {"num_skipped": num_skipped}
    return {"image": torch.stack(images), "num_skipped": num_skipped}
