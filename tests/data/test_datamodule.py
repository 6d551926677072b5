"""collate_sam_batch and SamDataModule (StatefulDataLoader resume, worker seeding)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch.utils.data import Dataset

from samtrain.data import CocoInstanceDataset, SamDataModule, SamTransform, collate_sam_batch
from tests.conftest import as_rank

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"


def fake_sample(num_masks: int, image_id: int, size: int = 16) -> dict:
    masks = torch.zeros(num_masks, size, size, dtype=torch.bool)
    for k in range(num_masks):
        masks[k, k, image_id] = True  # identifies (image, mask)
    return {
        "image": torch.full((3, size, size), float(image_id)),
        "masks": masks,
        "input_size": torch.tensor([size, size - image_id]),
        "original_size": torch.tensor([2 * size, 2 * size]),
        "image_id": image_id,
    }


def test_collate_concatenates_masks_in_image_order():
    samples = [fake_sample(2, 1), fake_sample(0, 2), fake_sample(3, 3)]
    batch = collate_sam_batch(samples)
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["masks"].shape == (5, 16, 16) and batch["masks"].dtype == torch.bool
    assert batch["mask_image_index"].tolist() == [0, 0, 2, 2, 2]
    assert batch["mask_image_index"].dtype == torch.int64
    for n, i in enumerate(batch["mask_image_index"].tolist()):
        assert torch.equal(batch["masks"][n], samples[i]["masks"][n - (0 if i == 0 else 2)])
    assert batch["input_size"].tolist() == [[16, 15], [16, 14], [16, 13]]
    assert batch["original_size"].shape == (3, 2) and batch["original_size"].dtype == torch.int64
    assert batch["image_id"].tolist() == [1, 2, 3] and batch["image_id"].dtype == torch.int64


def test_collate_batch_without_masks():
    batch = collate_sam_batch([fake_sample(0, 1), fake_sample(0, 2)])
    assert batch["masks"].shape == (0, 16, 16) and batch["mask_image_index"].shape == (0,)


def test_collate_rejects_bad_batches():
    with pytest.raises(ValueError, match="empty"):
        collate_sam_batch([])
    with pytest.raises(ValueError, match="different image shapes"):
        collate_sam_batch([fake_sample(1, 1, size=16), fake_sample(1, 2, size=32)])


def sample_dataset(split: str, *, train: bool, max_masks: int | None = 4, **kwargs) -> CocoInstanceDataset:
    kwargs = {"color_jitter": 0.2 if train else 0.0, **kwargs}
    transform = SamTransform(image_size=64, train=train, max_masks=max_masks, **kwargs)
    return CocoInstanceDataset(
        annotation_file=SAMPLE_DIR / split / "annotations.json",
        image_dir=SAMPLE_DIR / split,
        transform=transform,
    )


def make_datamodule(**kwargs) -> SamDataModule:
    return SamDataModule(
        train_dataset=sample_dataset("train", train=True),
        val_dataset=sample_dataset("val", train=False),
        batch_size=4,
        seed=0,
        **kwargs,
    )


def test_datamodule_over_sample_data_yields_batches():
    dm = make_datamodule(val_batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["masks"].shape[1:] == (64, 64) and len(batch["mask_image_index"]) == len(batch["masks"])
    assert batch["mask_image_index"].max() < 4
    val_ids = [i for b in dm.val_dataloader() for i in b["image_id"].tolist()]
    assert len(val_ids) == 16 and len(set(val_ids)) == 16
    with pytest.raises(ValueError, match="no test_dataset"):
        dm.test_dataloader()


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
        assert same, key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_loader_resumes_with_the_same_next_batch(num_workers):
    loader = make_datamodule(num_workers=num_workers).train_dataloader()
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    expected = next(batches)
    # A fresh process: new datasets and transforms, state restored from the checkpointed dict.
    resumed = make_datamodule(num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)
    assert_same_batch(next(iter(resumed)), expected)


def test_resume_with_other_seed_differs():
    """Guards the test above: without the restored state the next batch is another one."""
    loader = make_datamodule().train_dataloader()
    batches = iter(loader)
    next(batches)
    expected = next(batches)
    fresh = make_datamodule().train_dataloader()
    fresh_batches = iter(fresh)
    next(fresh_batches)
    assert_same_batch(next(fresh_batches), expected)  # same seed: same stream
    other = SamDataModule(train_dataset=sample_dataset("train", train=True), batch_size=4, seed=1)
    other_batches = iter(other.train_dataloader())
    next(other_batches)
    assert not torch.equal(next(other_batches)["image_id"], expected["image_id"])


class RepeatedSample(Dataset):
    """The same image at every index, so differences come only from augmentation."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.transform = SamTransform(image_size=32, train=True, color_jitter=0.3)
        image = np.random.default_rng(0).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        self.sample = {"image": image, "masks": np.zeros((0, 24, 32), bool), "image_id": 0}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.sample)


def test_workers_augment_differently():
    dataset = RepeatedSample(4)
    dataset[0]  # the main process's RNG exists before the workers fork
    dm = SamDataModule(train_dataset=dataset, val_dataset=dataset, batch_size=1, num_workers=2, seed=0)
    images = [b["image"][0] for b in dm.val_dataloader()]  # worker 0: items 0, 2; worker 1: items 1, 3
    assert not torch.equal(images[0], images[1])
    assert not torch.equal(images[0], images[2])


def val_masks(seed: int, epoch: int, max_masks: int | None = 1) -> list[torch.Tensor]:
    """The masks of every validation image at ``epoch`` (the sampler's epoch, as Lightning sets it)."""
    dm = SamDataModule(val_dataset=sample_dataset("val", train=False, max_masks=max_masks), seed=seed)
    loader = dm.val_dataloader()
    loader.sampler.set_epoch(epoch)
    return [
        m for batch in loader for m in batch["masks"].split(batch["mask_image_index"].bincount().tolist())
    ]


def test_val_masks_are_the_same_subset_every_epoch_and_seed():
    """The val sampler hands each image a seed of (seed, epoch, index); an image with more masks than
    max_masks must still be scored on the same ones, or val/resized_mIoU is not comparable across epochs."""
    assert max(len(m) for m in val_masks(0, 0, max_masks=None)) > 1  # some image has a subset to pick
    first = val_masks(seed=0, epoch=0)
    for seed, epoch in [(0, 1), (0, 7), (5, 0)]:
        again = val_masks(seed, epoch)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), (seed, epoch)


def test_train_mask_subset_still_varies_with_the_sample_seed():
    dataset = sample_dataset("train", train=True, max_masks=1, scale_range=None, hflip_prob=0.0)
    index = next(i for i in range(len(dataset)) if len(dataset.load_sample(i)["masks"]) > 1)
    subsets = {
        tuple(dataset[(index, seed)]["masks"].flatten().nonzero()[:1, 0].tolist()) for seed in range(8)
    }
    assert len(subsets) > 1


@pytest.mark.parametrize(("strategy", "even"), [(DDPStrategy, False), (FSDPStrategy, True)])
def test_validation_shares_are_even_under_a_sharded_model(strategy, even):
    """An FSDP rank must run each forward pass with the others: every rank gets as many val samples."""
    dm = SamDataModule(val_dataset=sample_dataset("val", train=False), batch_size=1, seed=0)
    dm.trainer = SimpleNamespace(strategy=strategy())
    with as_rank(1, 3):
        sampler = dm.val_dataloader().sampler
    assert sampler.even is even and sampler.world_size == 3
    assert len(sampler) == (len(dm.val_dataset) // 3 if even else len(range(1, len(dm.val_dataset), 3)))
