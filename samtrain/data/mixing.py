"""Several training datasets in one epoch, each drawn by a sampling weight or a repeat factor.

``data.train_datasets`` names the sources (a list of ``{name, weight | repeat, dataset}`` works too)::

    train_datasets:
      coco: {weight: 3.0, dataset: {_target_: samtrain.data.CocoInstanceDataset, ...}}
      cells: {weight: 1.0, dataset: {_target_: samtrain.data.LabelmeDataset, ...}}

- ``weight`` (all sources): every position of an epoch of ``samples_per_epoch`` (default: the
  sources' total size) draws its source with probability weight / sum of weights, then the next
  item of that source's own shuffled order (restarted, reshuffled, when used up): small sources
  are oversampled, large ones subsampled, and no item repeats before its source is used up.
- ``repeat`` (all sources; the default 1): a source appears ``repeat`` times per epoch
  (fractions: a random part of one more pass), so an epoch has sum(repeat * size) samples.

:class:`MixedDataset` puts the sources end to end (``(source, index)`` -> one global index);
:class:`MixingSampler` is a :class:`~samtrain.data.sampler.SeededShardSampler` whose epoch order
is that draw, seeded by ``(seed, epoch)`` alone. Its sample seeds depend on ``(seed, epoch,
position)``, so an item drawn twice in an epoch is augmented twice differently, and, as with the
plain sampler, rank ``r`` of ``W`` takes positions ``r, r + W, ...``: ``W`` ranks at batch ``b``
see exactly what one process at batch ``W * b`` sees, and a resumed run redraws the same epoch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from samtrain.data.sampler import SeededShardSampler
from samtrain.interactive.keyed_random import mix_seed


@dataclass
class Source:
    """One training source: its dataset, name, and weight or repeat factor."""

    name: str
    dataset: Dataset
    weight: float | None = None
    repeat: float | None = None


def sources_from_config(entries: Sequence[Any] | Mapping[str, Any]) -> list[Source]:
    """``train_datasets`` entries (mappings with dataset, name, weight or repeat; or bare datasets),
    a list or a mapping name -> entry (what Hydra overrides reach: ``data.train_datasets.coco.weight=2``),
    as Sources, checked: names unique, all weighted or all repeated, values positive."""
    if isinstance(entries, Mapping):
        entries = [
            {**entry, "name": name} if isinstance(entry, Mapping) else {"dataset": entry, "name": name}
            for name, entry in entries.items()
        ]
    sources = []
    for i, entry in enumerate(entries):
        if isinstance(entry, Mapping):
            if "dataset" not in entry:
                raise ValueError(f"train_datasets[{i}] has no 'dataset'")
            weight, repeat = entry.get("weight"), entry.get("repeat")
            name = str(entry.get("name") or f"dataset{i}")
            source = Source(name, entry["dataset"], _positive(weight, i), _positive(repeat, i))
        else:
            source = Source(f"dataset{i}", entry)
        if source.weight is not None and source.repeat is not None:
            raise ValueError(
                f"train_datasets[{i}] ({source.name}): give a weight or a repeat factor, not both"
            )
        sources.append(source)
    if not sources:
        raise ValueError("train_datasets is empty")
    weighted = {s.weight is not None for s in sources}
    if len(weighted) > 1:
        raise ValueError("train_datasets: give every source a weight, or none (repeat factors)")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"train_datasets: names must be unique, got {names}")
    for s in sources:
        if len(s.dataset) == 0:
            raise ValueError(f"train_datasets: source {s.name!r} is empty")
    return sources


def _positive(value: Any, i: int) -> float | None:
    if value is None:
        return None
    if float(value) <= 0:
        raise ValueError(f"train_datasets[{i}]: weight and repeat must be positive, got {value}")
    return float(value)


class MixedDataset(Dataset):
    """The sources end to end: global index ``offsets[s] + i`` is item ``i`` of source ``s``.

    ``dataset[(index, seed)]`` passes the seed on to sources that take sample seeds.
    """

    accepts_sample_seeds = True

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = list(sources)
        self.sizes = [len(s.dataset) for s in self.sources]
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(source, index within it) of a global index."""
        source = bisect.bisect_right(self.offsets.tolist(), int(index)) - 1
        return source, int(index) - int(self.offsets[source])

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        source, local = self.locate(index)
        dataset = self.sources[source].dataset
        if seed is not None and getattr(dataset, "accepts_sample_seeds", False):
            return dataset[(local, seed)]
        return dataset[local]

    def source_files(self) -> list[Path]:
        files = set()
        for s in self.sources:
            files.update(getattr(s.dataset, "source_files", list)())
        return sorted(files)

    def state_dict(self) -> dict:
        return {s.name: s.dataset.state_dict() for s in self.sources if hasattr(s.dataset, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for s in self.sources:
            if s.name in state and hasattr(s.dataset, "load_state_dict"):
                s.dataset.load_state_dict(state[s.name])


class MixingSampler(SeededShardSampler):
    """Rank ``rank``'s share of one mixed epoch as ``(global index, sample seed)`` pairs (see the
    module docstring). ``sizes``: the sources' lengths; ``weights`` or ``repeats`` per source."""

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        seed: int,
        weights: Sequence[float] | None = None,
        repeats: Sequence[float] | None = None,
        samples_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if (weights is None) == (repeats is None):
            raise ValueError("MixingSampler needs weights or repeats, not both")
        self.sizes = [int(s) for s in sizes]
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.repeats = None if repeats is None else np.asarray(repeats, dtype=np.float64)
        if samples_per_epoch is not None and self.weights is None:
            raise ValueError("samples_per_epoch goes with weights (repeat factors fix the epoch length)")
        if self.repeats is not None:
            epoch = int(sum(np.floor(r * n + 0.5) for r, n in zip(self.repeats, self.sizes, strict=True)))
        else:
            epoch = int(samples_per_epoch) if samples_per_epoch is not None else sum(self.sizes)
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)
        super().__init__(epoch, seed=seed, shuffle=True, rank=rank, world_size=world_size, even=True)

    def _source_order(self, source: int, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` items of a source: its shuffled passes, one after another. int64 (count,)."""
        size = self.sizes[source]
        passes = [torch.randperm(size, generator=generator) for _ in range(-(-count // size))]
        return (torch.cat(passes)[:count] if passes else torch.zeros(0, dtype=torch.int64)) + int(
            self.offsets[source]
        )

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(mix_seed("mixing", self.seed, self.epoch))
        if self.weights is not None:
            probs = torch.as_tensor(self.weights / self.weights.sum())
            picks = torch.multinomial(probs, self.size, replacement=True, generator=generator)
        else:
            counts = [int(np.floor(r * n + 0.5)) for r, n in zip(self.repeats, self.sizes, strict=True)]
            picks = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            picks = picks[torch.randperm(len(picks), generator=generator)]
        order = torch.empty(self.size, dtype=torch.int64)
        for source in range(len(self.sizes)):
            where = torch.nonzero(picks == source).flatten()
            order[where] = self._source_order(source, len(where), generator)
        return order.tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._epoch_order()[: len(self) * self.world_size]
        for position in range(self.rank, len(order), self.world_size):
            yield order[position], mix_seed("mixed sample", self.seed, self.epoch, position)

    def source_counts(self) -> np.ndarray:
        """How many samples of each source this rank's share of the epoch holds: int64 (S,)."""
        sources = np.searchsorted(self.offsets, [i for i, _ in self], side="right") - 1
        return np.bincount(sources, minlength=len(self.sizes)).astype(np.int64)
