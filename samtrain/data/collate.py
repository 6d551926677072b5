"""Batching of SAM samples: images stacked, instance masks of all images concatenated."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_sam_batch(samples: Sequence[dict | None]) -> dict:
    """Batch samples of the SAM sample contract (see ``samtrain.data.transforms``).

    None entries (samples that could not be read, see ``SkipBadSamples``) are dropped and counted;
    a batch whose samples all failed holds only ``"num_skipped"``.

    Returns:
        "image":            float32 (B, 3, S, S), or "image_embedding" float32 (B, C, S/16, S/16) for
                            samples read from an embedding cache
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
    counts = torch.tensor([len(s["masks"]) for s in samples], dtype=torch.int64)
    return {
        key: torch.stack([s[key] for s in samples]),
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
