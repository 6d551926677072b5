"""Errors raised while loading data."""

from __future__ import annotations

from pathlib import Path


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
