"""Errors raised while loading data."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """One sample cannot be loaded (missing or unreadable image, bad annotation).

    The message names the file and the reason; ``path`` and ``reason`` keep them apart so a
    caller can skip the sample and count the failure.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        # Exceptions pickle their args; ours has two named ones (DataLoader workers pickle errors).
        return (type(self), (self.path, self.reason))


class SkipBadSamples(Dataset):
    """A dataset whose unreadable samples become None instead of an exception.

    A sample that raises :class:`SampleError` is logged with its file and reason and returned as
    None; ``collate_sam_batch`` drops it and reports the count in the batch (``"num_skipped"``),
    which :class:`samtrain.lightning.callbacks.SkippedSamplesBudget` adds up. Other exceptions (bugs)
    still propagate. The wrapped dataset's ``state_dict`` (augmentation RNG) passes through, so
    stateful loaders resume exactly.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except SampleError as err:
            log.warning("skipping sample %s: %s", index, err)
            return None

    def state_dict(self) -> dict:
        return self.dataset.state_dict() if hasattr(self.dataset, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state)
