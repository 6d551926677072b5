"""A deterministic train/val split by file name, for datasets without separate split files.

Each item goes to val when a hash of (seed, its key) falls below ``val_fraction``: the split
does not depend on the order files are listed in, and adding or removing files moves no other
file between the splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

SPLITS = ("train", "val")


def stable_hash(text: str, seed: int = 0) -> int:
    """A 63-bit hash of ``text`` that is the same in every process and Python version."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_mask(keys: Sequence[str], split: str, val_fraction: float, seed: int = 0) -> list[bool]:
    """Which of ``keys`` belong to ``split`` ("train" or "val"): bool per key."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if not 0.0 <= float(val_fraction) <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    threshold = float(val_fraction) * 2**63
    in_val = [stable_hash(str(key), seed) < threshold for key in keys]
    return in_val if split == "val" else [not v for v in in_val]


def select_split(
    items: Sequence[T], key: Callable[[T], str], split: str | None, val_fraction: float, seed: int = 0
) -> list[T]:
    """The ``items`` whose ``key(item)`` falls in ``split`` (all of them when ``split`` is None)."""
    if split is None:
        return list(items)
    keep = split_mask([key(item) for item in items], split, val_fraction, seed)
    return [item for item, k in zip(items, keep, strict=True) if k]
