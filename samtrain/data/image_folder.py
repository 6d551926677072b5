"""Unlabeled images from a folder tree, for MAE pretraining: dataset and LightningDataModule."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from samtrain import distributed
from samtrain.data.collate import collate_image_batch
from samtrain.data.datamodule import sharded_loader
from samtrain.data.image_io import find_images, read_rgb_image
from samtrain.data.split import select_split

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "MaeDataModule",
    "find_images",
    "mae_transform",
]

log = logging.getLogger(__name__)

# MAE normalises with ImageNet's statistics (as does SAM).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mae_transform(
    image_size: int, *, train: bool, scale: tuple[float, float] = (0.2, 1.0), hflip_prob: float = 0.5
) -> A.Compose:
    """MAE's augmentation: RandomResizedCrop + horizontal flip (train) or resize + centre crop (eval);
    ImageNet normalisation."""
    if train:
        steps = [
            A.RandomResizedCrop(
                size=(image_size, image_size), scale=tuple(scale), interpolation=cv2.INTER_CUBIC
            ),
            A.HorizontalFlip(p=hflip_prob),
        ]
    else:
        steps = [
            A.SmallestMaxSize(max_size=image_size, interpolation=cv2.INTER_CUBIC),
            A.CenterCrop(height=image_size, width=image_size),
        ]
    steps.append(A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0))
    return A.Compose(steps)


class ImageFolderDataset(Dataset):
    """Images under ``root`` as float32 (3, S, S) tensors normalised with ImageNet's mean/std.

    ``dataset[index]`` augments with an RNG seeded once per process from ``torch.initial_seed()``;
    ``dataset[(index, seed)]`` (what :class:`SeededShardSampler` yields) seeds the augmentation with
    ``seed``, so it depends only on (run seed, epoch, index). A file that cannot be read raises
    :class:`samtrain.data.errors.SampleError` naming it: the loaders of :class:`MaeDataModule` skip,
    log and count it (``SkipBadSamples``, ``collate_image_batch``); any other error propagates.
    ``files`` restricts the dataset to a subset of the folder (e.g. a train/val split).
    """

    accepts_sample_seeds = True

    def __init__(
        self,
        *,
        root: str | Path,
        image_size: int,
        train: bool = True,
        scale: Sequence[float] = (0.2, 1.0),
        hflip_prob: float = 0.5,
        files: Sequence[str | Path] | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = [Path(f) for f in files] if files is not None else find_images(self.root)
        if not self.files:
            raise ValueError(f"no images selected from {self.root}")
        self.image_size = int(image_size)
        self.train = train
        self.transform = mae_transform(
            self.image_size, train=train, scale=tuple(scale), hflip_prob=hflip_prob
        )
        self._seeded_pid: int | None = None  # the process whose stream _process_rng is
        self._process_rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.files)

    def sample_name(self, index: int) -> str:
        return str(self.files[index])

    def _seed_transform(self, seed: int | None) -> None:
        """Seed albumentations with ``seed``; without one, with the next seed of a stream seeded once
        per process from torch (distinct per worker, and not restarted by seeded calls in between)."""
        if seed is None:
            if self._seeded_pid != os.getpid():
                self._process_rng = np.random.default_rng(torch.initial_seed() % 2**63)
                self._seeded_pid = os.getpid()
            seed = int(self._process_rng.integers(2**63))
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __getitem__(self, item: int | tuple[int, int]) -> torch.Tensor:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = read_rgb_image(self.files[int(index)])  # SampleError when unreadable
        if self.train:
            self._seed_transform(None if seed is None else int(seed))
        out = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float()


class MaeDataModule(pl.LightningDataModule):
    """Train/val image folders for MAE pretraining, loaded with torchdata ``StatefulDataLoader``s.

    Validation images come from ``val_root`` when given, else from a split of ``root`` by a stable
    hash of each file's path relative to ``root`` (:func:`samtrain.data.split.select_split`, seeded
    with ``split_seed``): about ``val_fraction`` of the files, and adding or removing files moves no
    other file between the splits.

    The module shards the data itself, as :class:`samtrain.data.SamDataModule` does (trainers run
    with ``use_distributed_sampler: false``): a :class:`SeededShardSampler` per loader, each training
    epoch one permutation seeded by ``(seed, epoch)`` of which rank ``r`` of ``W`` takes every
    ``W``-th image, each image augmented from a seed of ``(seed, epoch, index)``. Validation is
    split across the ranks in order, every image once.

    Unreadable images are logged with their file and skipped (``SkipBadSamples``). The loaders yield
    ``{"image": (B, 3, S, S), "num_skipped": int}`` (``collate_image_batch``; no ``"image"`` when no
    image of the batch could be read), which :class:`samtrain.lightning.callbacks.SkippedSamplesBudget`
    counts over all ranks, as in SAM training.

    Args:
        root: folder of training images (recursive).
        image_size: S.
        val_root: folder of validation images (None: split ``root``).
        val_fraction, split_seed: the split of ``root`` when ``val_root`` is None.
        batch_size: training images per device; ``val_batch_size``: per validation batch.
        num_workers, pin_memory: DataLoader settings.
        scale, hflip_prob: MAE's augmentation (RandomResizedCrop scale, flip probability).
        drop_last: drop each rank's last incomplete training batch (when it has a full one).
        seed: order and augmentation seed (None: ``torch.initial_seed()``, the run seed).
    """

    def __init__(
        self,
        *,
        root: str | Path,
        image_size: int = 224,
        val_root: str | Path | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        scale: Sequence[float] = (0.2, 1.0),
        hflip_prob: float = 0.5,
        drop_last: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        # Checkpoints load with weights_only=True, which refuses pathlib objects.
        for key in ("root", "val_root"):
            if self.hparams[key] is not None:
                self.hparams[key] = str(self.hparams[key])
        self.root = Path(root)
        self.val_root = Path(val_root) if val_root else None
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.seed = seed
        if self.val_root is not None:
            train_files, val_files = find_images(self.root), find_images(self.val_root)
        else:
            train_files, val_files = self.split(self.root, val_fraction, split_seed)
        common = {"image_size": self.image_size}
        self.train_dataset = ImageFolderDataset(
            root=self.root, train=True, scale=scale, hflip_prob=hflip_prob, files=train_files, **common
        )
        self.val_dataset = ImageFolderDataset(
            root=self.val_root or self.root, train=False, files=val_files, **common
        )

    @staticmethod
    def split(root: Path, val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
        """(train, val) image files of ``root``, split by a stable hash of the path relative to
        ``root``; ValueError when either side is empty."""
        files = find_images(root)

        def key(path: Path) -> str:
            return path.relative_to(root).as_posix()

        train, val = (select_split(files, key, split, val_fraction, seed) for split in ("train", "val"))
        for name, part in (("train", train), ("val", val)):
            if not part:
                raise ValueError(
                    f"image folder {root}: none of its {len(files)} images falls in the {name} split "
                    f"(val_fraction={val_fraction}, split_seed={seed}); change val_fraction or set val_root"
                )
        return train, val

    def _loader(self, dataset: ImageFolderDataset, *, train: bool) -> StatefulDataLoader:
        seed = int(self.seed if self.seed is not None else torch.initial_seed())
        batch_size = self.batch_size if train else self.val_batch_size
        share = len(dataset) // distributed.world_size()  # each rank's share of an epoch
        return sharded_loader(
            dataset,
            seed=seed,
            train=train,
            even=train or distributed.is_sharded(self.trainer),
            batch_size=batch_size,
            drop_last=train and self.drop_last and share >= batch_size,
            collate_fn=collate_image_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_dataset, train=False)
