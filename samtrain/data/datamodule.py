"""LightningDataModule over already-built datasets (Hydra instantiates them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from samtrain import distributed
from samtrain.data.collate import collate_sam_batch
from samtrain.data.errors import SkipBadSamples
from samtrain.data.mixing import MixedDataset, MixingSampler, Source, sources_from_config
from samtrain.data.sampler import SeededShardSampler


def takes_sample_seeds(dataset: Dataset) -> bool:
    """Whether ``dataset[(index, seed)]`` seeds the sample's augmentation (samtrain's datasets do:
    they set ``accepts_sample_seeds``)."""
    return bool(getattr(dataset, "accepts_sample_seeds", False))


class IgnoreSampleSeeds(Dataset):
    """Lets a plain map-style dataset take the sampler's ``(index, seed)`` keys (the seed is unused)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.dataset[key[0]]

    def state_dict(self) -> dict:
        return self.dataset.state_dict() if hasattr(self.dataset, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state)


def worker_generator(seed: int, rank: int) -> torch.Generator:
    """The generator that seeds a loader's worker processes: a different one on every rank."""
    return torch.Generator().manual_seed((seed + 1_000_003 * rank) % 2**63)


def sharded_loader(
    dataset: Dataset, *, seed: int, train: bool, even: bool, **loader_args
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over this rank's share of a map-style dataset.

    A :class:`SeededShardSampler` orders each epoch (shuffled by ``(seed, epoch)`` for training, in
    order otherwise) and hands each sample its seed. With ``even`` the epoch is cut to a multiple of
    the world size so every rank runs as many steps: training always needs it, validation under a
    sharded model (FSDP), whose ranks must run each forward pass in step (up to W - 1 samples are
    then left out). A
    dataset that does not take ``(index, seed)`` keys is wrapped in :class:`IgnoreSampleSeeds`.
    Samples raising ``SampleError`` become None (``SkipBadSamples``): the ``collate_fn`` in
    ``loader_args`` drops and counts them.
    """
    rank, world_size = distributed.rank(), distributed.world_size()
    if not takes_sample_seeds(dataset):
        dataset = IgnoreSampleSeeds(dataset)
    sampler = SeededShardSampler(
        len(dataset), seed=seed, shuffle=train, rank=rank, world_size=world_size, even=even
    )
    loader_args.setdefault("generator", worker_generator(seed, rank))
    return StatefulDataLoader(SkipBadSamples(dataset), sampler=sampler, **loader_args)


def mixed_loader(
    sources: Sequence[Source], *, seed: int, samples_per_epoch: int | None, **loader_args
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over this rank's share of a mixed epoch (:mod:`samtrain.data.mixing`):
    the sources drawn by weight or repeat factor, seeded by ``(seed, epoch)``, sharded as
    :func:`sharded_loader` shards one dataset."""
    dataset = MixedDataset(sources)
    weighted = sources[0].weight is not None
    sampler = MixingSampler(
        dataset.sizes,
        seed=seed,
        weights=[s.weight for s in sources] if weighted else None,
        repeats=None if weighted else [s.repeat or 1.0 for s in sources],
        samples_per_epoch=samples_per_epoch,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    loader_args.setdefault("generator", worker_generator(seed, distributed.rank()))
    return StatefulDataLoader(SkipBadSamples(dataset), sampler=sampler, **loader_args)


class SamDataModule(LightningDataModule):
    """Train/val/test loaders for SAM training, sharded across distributed ranks by the module itself.

    Map-style datasets are read through a :class:`SeededShardSampler`: each epoch one permutation
    seeded by ``(seed, epoch)``, rank ``r`` of ``W`` taking every ``W``-th sample, and a seed per
    sample for its augmentation. So ``W`` ranks at batch ``b`` see exactly what one process at batch
    ``W * b`` sees, augmented alike, and a resumed run repeats what the first run did. The trainer
    must not add its own distributed sampler (``use_distributed_sampler: false``, as in every
    ``conf/trainer`` option). Iterable datasets (streams) shard themselves and are passed through.

    Loaders are torchdata ``StatefulDataLoader``s, so a run resumed from a checkpoint continues
    mid-epoch. Batches come from ``collate_sam_batch``; samples that cannot be read are skipped
    and counted (``SkipBadSamples``), never fatal.

    Several training datasets (``train_datasets``: entries ``{name, dataset, weight | repeat}``)
    are mixed per epoch by :class:`samtrain.data.mixing.MixingSampler`, with the same exactness.
    Several validation datasets (``val_datasets``: name -> dataset) give one val loader each, in
    order, named by :attr:`val_names` (the module logs ``val/<name>/<metric>``).

    Args:
        train_dataset, val_dataset, test_dataset: datasets returning SAM samples.
        train_datasets: instead of ``train_dataset``, the sources of a mixed epoch.
        samples_per_epoch: the length of a weighted mixed epoch (default: the sources' total).
        val_datasets: instead of ``val_dataset``, validation datasets by name.
        batch_size: images per training batch on each device.
        global_batch_size: images per optimizer step over all devices; when set, it replaces
            ``batch_size`` with ``global_batch_size / (world size * accumulate_grad_batches)``.
        val_batch_size: images per val/test batch (default: the per-device training batch).
        max_masks_per_batch: training batches keep at most this many masks in all, on each device
            (the SAM paper's 64 per GPU), beside the transform's per-image ``max_masks``; which
            masks stay is a function of the masks' identities (``collate.masks_within_cap``). None:
            no per-device cap. Validation and test batches are never capped.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory.
        persistent_workers: keep workers alive between epochs (default: when ``num_workers > 0``).
        seed: the order and augmentation seed (None: ``torch.initial_seed()``, i.e. the run seed
            after ``seed_everything``).
    """

    def __init__(
        self,
        *,
        train_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        train_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        samples_per_epoch: int | None = None,
        val_datasets: Mapping[str, Dataset] | None = None,
        batch_size: int = 2,
        global_batch_size: int | None = None,
        val_batch_size: int | None = None,
        max_masks_per_batch: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if train_dataset is not None and train_datasets:
            raise ValueError("SamDataModule: give train_dataset or train_datasets, not both")
        if val_dataset is not None and val_datasets:
            raise ValueError("SamDataModule: give val_dataset or val_datasets, not both")
        self.train_dataset = train_dataset
        self.train_sources = sources_from_config(train_datasets) if train_datasets else None
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.val_dataset = val_dataset
        self.val_datasets = dict(val_datasets) if val_datasets else None
        self.test_dataset = test_dataset
        self.batch_size = int(batch_size)
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self._val_batch_size = None if val_batch_size is None else int(val_batch_size)
        if max_masks_per_batch is not None and int(max_masks_per_batch) <= 0:
            raise ValueError(f"max_masks_per_batch must be positive or None, got {max_masks_per_batch}")
        self.max_masks_per_batch = None if max_masks_per_batch is None else int(max_masks_per_batch)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = (
            (self.num_workers > 0) if persistent_workers is None else bool(persistent_workers)
        )
        self.seed = seed

    SPLITS = ("train", "val", "test")

    def datasets(self) -> dict[str, Dataset]:
        """The datasets it holds by split ("train", "val", "test"), those not given left out."""
        held = {split: getattr(self, f"{split}_dataset") for split in self.SPLITS}
        return {split: dataset for split, dataset in held.items() if dataset is not None}

    def replace_datasets(self, datasets: Mapping[str, Dataset]) -> None:
        """Swap the datasets of the splits named in ``datasets`` (e.g. for readers of an embedding
        cache); loaders made afterwards read the new ones. ValueError for an unknown split."""
        unknown = sorted(set(datasets) - set(self.SPLITS))
        if unknown:
            raise ValueError(f"SamDataModule has no split {unknown}; splits are {self.SPLITS}")
        for split, dataset in datasets.items():
            setattr(self, f"{split}_dataset", dataset)

    @property
    def val_batch_size(self) -> int:
        return self._val_batch_size if self._val_batch_size is not None else self.batch_size

    def setup(self, stage: str) -> None:
        if self.global_batch_size is None:
            return
        world_size = distributed.world_size()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        per_step = world_size * accumulate
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by world size {world_size} "
                f"x accumulate_grad_batches {accumulate}"
            )
        self.batch_size = self.global_batch_size // per_step

    def _seed(self) -> int:
        return int(self.seed if self.seed is not None else torch.initial_seed())

    def _loader(self, dataset: Dataset | None, name: str, *, train: bool) -> StatefulDataLoader:
        if dataset is None:
            raise ValueError(f"SamDataModule has no {name}_dataset; pass {name}_dataset= to use this loader")
        seed = self._seed()
        loader_args = {
            "batch_size": self.batch_size if train else self.val_batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "collate_fn": partial(
                collate_sam_batch, max_masks_per_batch=self.max_masks_per_batch if train else None
            ),
            "generator": worker_generator(seed, distributed.rank()),
        }
        if isinstance(dataset, IterableDataset):
            # Fresh workers each epoch: they receive the epoch SamModule sets on the stream.
            return StatefulDataLoader(dataset, persistent_workers=False, **loader_args)
        return sharded_loader(
            dataset,
            seed=seed,
            train=train,
            even=train or distributed.is_sharded(self.trainer),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            **loader_args,
        )

    @property
    def val_names(self) -> list[str] | None:
        """The names of the val loaders, in order (None: one unnamed val dataset)."""
        return None if self.val_datasets is None else list(self.val_datasets)

    def train_dataloader(self) -> StatefulDataLoader:
        if self.train_sources is None:
            return self._loader(self.train_dataset, "train", train=True)
        return mixed_loader(
            self.train_sources,
            seed=self._seed(),
            samples_per_epoch=self.samples_per_epoch,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=partial(collate_sam_batch, max_masks_per_batch=self.max_masks_per_batch),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def val_dataloader(self) -> StatefulDataLoader | list[StatefulDataLoader]:
        if self.val_datasets is None:
            return self._loader(self.val_dataset, "val", train=False)
        return [
            self._loader(dataset, f"val ({name})", train=False) for name, dataset in self.val_datasets.items()
        ]

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.test_dataset, "test", train=False)
