"""LightningDataModule over already-built datasets (Hydra instantiates them)."""

from __future__ import annotations

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from samtrain.data.collate import collate_sam_batch
from samtrain.data.errors import SkipBadSamples


class SamDataModule(LightningDataModule):
    """Train/val/test loaders for SAM training.

        Loaders are torchdata ``StatefulDataLoader``s, so a run resumed from a checkpoint continues
        mid-epoch (sampler position, shuffle generator and, for datasets with ``state_dict``, the
        augmentation RNG). Training data is shuffled by a generator seeded from ``seed`` (default:
        ``torch.initial_seed()``, i.e. the run seed after ``seed_everything``) mixed with the global
        rank; the same generator seeds the DataLoader workers. Batches come from ``collate_sam_batch``;
    samples that cannot be read are skipped and counted (``SkipBadSamples``), never fatal.

        Args:
            train_dataset, val_dataset, test_dataset: map-style datasets returning SAM samples.
            batch_size: images per training batch.
            val_batch_size: images per val/test batch (default: ``batch_size``).
            num_workers: DataLoader worker processes.
            pin_memory: pin batches in page-locked memory.
            persistent_workers: keep workers alive between epochs (default: when ``num_workers > 0``).
            seed: shuffle seed (None: ``torch.initial_seed()`` when the loader is built).
    """

    def __init__(
        self,
        *,
        train_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.test_dataset = test_dataset
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = (
            (self.num_workers > 0) if persistent_workers is None else bool(persistent_workers)
        )
        self.seed = seed

    def _generator(self) -> torch.Generator:
        """A generator seeded by (seed, global rank): shuffling and worker seeds differ per rank."""
        base = self.seed if self.seed is not None else torch.initial_seed()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return torch.Generator().manual_seed((int(base) + 1_000_003 * rank) % 2**63)

    def _loader(self, dataset: Dataset | None, name: str, *, train: bool) -> StatefulDataLoader:
        if dataset is None:
            raise ValueError(f"SamDataModule has no {name}_dataset; pass {name}_dataset= to use this loader")
        workers = self.num_workers > 0
        return StatefulDataLoader(
            SkipBadSamples(dataset),
            batch_size=self.batch_size if train else self.val_batch_size,
            shuffle=train,
            generator=self._generator(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers,
            collate_fn=collate_sam_batch,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_dataset, "val", train=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.test_dataset, "test", train=False)
