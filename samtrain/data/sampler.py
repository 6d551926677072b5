"""The sampler of SAM training: each rank's share of an epoch, with a seed per sample."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from samtrain.interactive.keyed_random import mix_seed


class SeededShardSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` pairs: rank ``rank``'s share of one epoch.

    Each epoch orders ``range(size)`` by a permutation seeded from ``(seed, epoch)`` (or keeps it
    in order without ``shuffle``); rank ``r`` of ``world_size`` takes positions ``r, r + W, ...``.
    So the ranks' batches at step ``i`` together hold exactly the samples a single process with
    ``W`` times the batch would hold, and no sample is seen twice in an epoch. With ``even`` (for
    training) the epoch is cut to a multiple of ``W`` so every rank runs the same number of steps;
    without it (evaluation) every sample is used once and the ranks may differ by one sample.

    ``sample_seed`` depends only on ``(seed, epoch, index)``: datasets seed each sample's
    augmentation with it (``dataset[(index, seed)]``), which makes augmentation independent of the
    number of ranks and workers and lets a resumed run redo exactly what the first run did.
    Lightning calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.even = bool(even)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(mix_seed("order", self.seed, self.epoch))
        return torch.randperm(self.size, generator=generator).tolist()

    def __len__(self) -> int:
        if self.even:
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._epoch_order()
        if self.even:
            order = order[: len(self) * self.world_size]
        for index in order[self.rank :: self.world_size]:
            yield index, mix_seed("sample", self.seed, self.epoch, index)
