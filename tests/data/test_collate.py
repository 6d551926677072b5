"""The per-device mask cap of collate_sam_batch (the SAM paper's 64 masks per GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtrain.data import SamDataModule, collate_sam_batch
from samtrain.data.collate import mask_priority, masks_within_cap

SIZE = 16


def marked_sample(image_id: int, num_masks: int) -> dict:
    """A sample whose mask k holds the single pixel (k, image_id % SIZE): identifiable after batching."""
    masks = torch.zeros(num_masks, SIZE, SIZE, dtype=torch.bool)
    for k in range(num_masks):
        masks[k, k, image_id % SIZE] = True
    return {
        "image": torch.full((3, SIZE, SIZE), float(image_id)),
        "masks": masks,
        "input_size": torch.tensor([SIZE, SIZE]),
        "original_size": torch.tensor([SIZE, SIZE]),
        "image_id": image_id,
    }


def kept_identities(batch: dict) -> set[tuple[int, int]]:
    """(image id, source ordinal) of every mask of a collated batch of marked samples."""
    ids = batch["image_id"][batch["mask_image_index"]].tolist()
    ordinals = [int(np.flatnonzero(m.any(1).numpy())[0]) for m in batch["masks"]]
    return set(zip(ids, ordinals, strict=True))


def lowest_priority(samples: list[dict], cap: int) -> set[tuple[int, int]]:
    """The cap's rule written out: the ``cap`` (image id, ordinal) pairs of lowest priority."""
    pairs = [(s["image_id"], k) for s in samples for k in range(len(s["masks"]))]
    ranks = mask_priority(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    return {pairs[i] for i in np.argsort(ranks, kind="stable")[:cap]}


def test_cap_keeps_the_masks_of_lowest_identity_priority():
    samples = [marked_sample(3, 5), marked_sample(11, 7), marked_sample(-4, 6)]
    batch = collate_sam_batch(samples, max_masks_per_batch=8)
    assert batch["masks"].shape == (8, SIZE, SIZE)
    assert kept_identities(batch) == lowest_priority(samples, 8)
    counts = torch.bincount(batch["mask_image_index"], minlength=3)
    kept = lowest_priority(samples, 8)
    assert counts.tolist() == [sum(i == s["image_id"] for i, _ in kept) for s in samples]
    assert batch["image"].shape[0] == 3  # every image stays, with or without masks


def test_cap_does_not_depend_on_the_order_of_the_batch():
    samples = [marked_sample(i, n) for i, n in [(0, 9), (1, 2), (2, 6), (3, 4)]]
    forward = collate_sam_batch(samples, max_masks_per_batch=10)
    backward = collate_sam_batch(samples[::-1], max_masks_per_batch=10)
    assert kept_identities(forward) == kept_identities(backward)
    assert len(kept_identities(forward)) == 10


def test_under_the_cap_nothing_changes():
    samples = [marked_sample(1, 3), marked_sample(2, 4)]
    capped, plain = collate_sam_batch(samples, max_masks_per_batch=7), collate_sam_batch(samples)
    assert torch.equal(capped["masks"], plain["masks"])
    assert torch.equal(capped["mask_image_index"], plain["mask_image_index"])


def test_an_image_can_lose_all_its_masks():
    samples = [marked_sample(i, 4) for i in range(6)]
    batch = collate_sam_batch(samples, max_masks_per_batch=2)
    assert batch["masks"].shape[0] == 2
    assert len(set(batch["mask_image_index"].tolist())) <= 2
    assert batch["image"].shape[0] == 6


def test_priorities_are_spread_and_keyed_by_both_parts():
    ids, ordinals = np.repeat(np.arange(64), 64), np.tile(np.arange(64), 64)
    ranks = mask_priority(ids, ordinals)
    assert ranks.dtype == np.uint64 and len(np.unique(ranks)) == len(ranks)
    # each image's share of the 64 lowest of 4096 masks is small: no image or ordinal is favoured
    lowest = np.argsort(ranks)[:64]
    assert np.bincount(ids[lowest]).max() <= 6 and np.bincount(ordinals[lowest]).max() <= 6


def test_bad_cap_is_refused():
    with pytest.raises(ValueError, match="max_masks_per_batch must be positive"):
        masks_within_cap([marked_sample(0, 2)], 0)
    with pytest.raises(ValueError, match="max_masks_per_batch must be positive"):
        SamDataModule(train_dataset=[marked_sample(0, 2)], max_masks_per_batch=-1)


def test_datamodule_caps_training_batches_only():
    samples = [marked_sample(i, 5) for i in range(8)]
    dm = SamDataModule(
        train_dataset=samples, val_dataset=samples, batch_size=4, max_masks_per_batch=6, seed=0
    )
    train = list(dm.train_dataloader())
    val = list(dm.val_dataloader())
    assert [b["masks"].shape[0] for b in train] == [6, 6]
    assert [b["masks"].shape[0] for b in val] == [20, 20]
    again = list(dm.train_dataloader())  # a rerun (a resume) keeps exactly the same masks
    assert [kept_identities(b) for b in again] == [kept_identities(b) for b in train]
