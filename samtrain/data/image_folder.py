"""Unlabeled images from a folder tree, for MAE pretraining: dataset and LightningDataModule."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from samtrain.data.coco import read_rgb_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# MAE normalises with ImageNet's statistics (as does SAM).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_images(root: str | Path) -> list[Path]:
    """Every image file under root (recursive, extensions case-insensitive), sorted.

    Raises FileNotFoundError when root is missing and ValueError when it holds no image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"image folder {root} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


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
    """Images under ``root`` as float tensors (3, S, S) normalised with ImageNet's mean/std.

    An unreadable file is skipped with a warning naming it; the next readable image is returned
    instead and the file counted in ``num_skipped`` (per process: DataLoader workers keep their own
    count). ``files`` restricts the dataset to a subset of the folder (e.g. a train/val split).
    """

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
        self.skipped: set[Path] = set()
        self._seeded_pid: int | None = None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def _seed_transform(self) -> None:
        """Seed albumentations once per process from torch (distinct per worker, follows the run seed)."""
        if self._seeded_pid != os.getpid():
            self.transform.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_pid = os.getpid()

    def read(self, index: int) -> tuple[np.ndarray, Path]:
        """The first readable image from ``index`` on (wrapping round), and its path."""
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            try:
                return read_rgb_image(path), path
            except Exception as err:  # SampleError from read_rgb_image, or a decoder failure
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
        raise RuntimeError(f"none of the {len(self.files)} images under {self.root} can be read")

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.train:
            self._seed_transform()
        image, _ = self.read(index)
        out = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float()


class MaeDataModule(pl.LightningDataModule):
    """Train/val image folders for MAE pretraining, loaded with torchdata ``StatefulDataLoader``s.

    Validation images come from ``val_root`` when given, else from a deterministic split of
    ``root``: a fraction ``val_fraction`` of the sorted files chosen by a permutation seeded with
    ``split_seed`` (at least one image, and at least one left for training). Batches are image
    tensors (B, 3, S, S). Training shuffles with a generator seeded by ``seed`` (default: the run
    seed) and the global rank, and drops the last incomplete batch when the set has a full one.
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
            train_files, val_files = self.split(find_images(self.root), val_fraction, split_seed)
        common = {"image_size": self.image_size}
        self.train_dataset = ImageFolderDataset(
            root=self.root, train=True, scale=scale, hflip_prob=hflip_prob, files=train_files, **common
        )
        self.val_dataset = ImageFolderDataset(
            root=self.val_root or self.root, train=False, files=val_files, **common
        )

    @staticmethod
    def split(files: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
        """(train, val) files: a seeded permutation of the sorted list, val_fraction of it for val."""
        if len(files) < 2:
            raise ValueError(
                f"need at least 2 images to split off a validation set, found {len(files)}; set val_root"
            )
        num_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        val = sorted(files[i] for i in order[:num_val])
        train = sorted(files[i] for i in order[num_val:])
        return train, val

    def _generator(self) -> torch.Generator:
        base = self.seed if self.seed is not None else torch.initial_seed()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return torch.Generator().manual_seed((int(base) + 1_000_003 * rank) % 2**63)

    def _loader(self, dataset: ImageFolderDataset, *, train: bool) -> StatefulDataLoader:
        batch_size = self.batch_size if train else self.val_batch_size
        workers = self.num_workers > 0
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last and len(dataset) >= batch_size,
            generator=self._generator(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_dataset, train=False)
