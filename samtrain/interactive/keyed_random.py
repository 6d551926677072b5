"""Counter-based random numbers keyed by identity rather than by position or process.

A ``torch.Generator`` hands out numbers in sequence, so what a mask draws depends on how many masks
came before it, in its batch and on its rank. ``KeyedRandom`` instead derives every number from a
hash of (salt, the row's key, the draw's ordinal, the column): the same mask draws the same numbers
whichever rank holds it and whatever else its batch holds. That makes a 2-process run draw exactly
what a 1-process run with the same global batch draws, and a resumed run what the uninterrupted run
drew. Hashing is a few integer ops per number on the keys' device, with no host synchronisation.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK32 = 0xFFFFFFFF


def mix_seed(*values: int | str) -> int:
    """A deterministic 63-bit integer from ints and strings (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, with no int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit avalanche mix (MurmurHash3's finaliser) of int64 values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _split32(value: torch.Tensor | int) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """The low and high 32-bit halves of int64 values (two's complement for negatives)."""
    return value & _MASK32, (value >> 32) & _MASK32


def hash_keys(*parts: torch.Tensor) -> torch.Tensor:
    """Combine int64 tensors of equal shape into one 32-bit key per element: int64 in [0, 2**32)."""
    if not parts:
        raise ValueError("hash_keys needs at least one tensor")
    h = torch.zeros_like(parts[0], dtype=torch.int64)
    for part in parts:
        for half in _split32(part.to(torch.int64)):
            h = _fmix32(h ^ half)
    return h


class KeyedRandom:
    """Random numbers for N keyed rows.

    Row ``i`` of the ``d``-th draw depends only on ``(salt, keys[i], d)``. Callers that make the same
    sequence of draws (the same code on every rank) therefore give each key the same numbers,
    independent of the other rows.

    Args:
        keys: int64 (N,) row identities; equal keys draw equal numbers.
        salt: distinguishes streams, e.g. ``mix_seed(seed, step)``.
    """

    def __init__(self, keys: torch.Tensor, salt: int) -> None:
        if keys.ndim != 1:
            raise ValueError(f"keys must have shape (N,), got {tuple(keys.shape)}")
        low, high = _split32(int(salt) & ((1 << 64) - 1))
        self.keys = _fmix32(_fmix32(hash_keys(keys) ^ low) ^ high)
        self.draws = 0

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def _bits(self, width: int) -> torch.Tensor:
        """The next draw: int64 (N, width) of 32 random bits each."""
        self.draws += 1
        column = torch.arange(width, device=self.device, dtype=torch.int64)
        counter = _fmix32(torch.full_like(column, self.draws) ^ _mul32(column, 0x9E3779B9))
        return _fmix32(self.keys[:, None] ^ counter[None, :])

    def rand(self, width: int = 1) -> torch.Tensor:
        """float32 (N, width) uniform in [0, 1) on a 2**-24 grid, like ``torch.rand``."""
        return (self._bits(width) >> 8).to(torch.float32) * 2.0**-24

    def randn(self, width: int = 1) -> torch.Tensor:
        """float32 (N, width) standard normal (Box-Muller on two uniform draws)."""
        u1 = 1.0 - self.rand(width)  # (0, 1]: the log is finite
        u2 = self.rand(width)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
