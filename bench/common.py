"""Helpers shared by the benchmarks: a synthetic batch, function clocks and a timer."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import torch


def synthetic_batch(batch_size: int, masks_per_image: int, image_size: int, seed: int = 0) -> dict:
    """Random images with elliptic instance masks of varied size."""
    g = torch.Generator().manual_seed(seed)
    n = batch_size * masks_per_image
    yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * image_size
    radii = (0.05 + 0.25 * torch.rand(n, 2, generator=g)) * image_size
    masks = ((xx - centre[:, :1, None]) / radii[:, :1, None]) ** 2 + (
        (yy - centre[:, 1:, None]) / radii[:, 1:, None]
    ) ** 2 <= 1
    return {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=g),
        "masks": masks,
        "mask_image_index": torch.arange(batch_size).repeat_interleave(masks_per_image),
        "input_size": torch.full((batch_size, 2), image_size),
    }


class FunctionClock:
    """Accumulates the wall time spent inside some functions of a module, by patching them there.

    ``sync`` runs before each start and stop reading (``torch.cuda.synchronize`` on a GPU), so
    that the time is the device's and not only the launch's.
    """

    def __init__(self, module: ModuleType, names: Iterable[str], sync: Callable[[], None] = lambda: None):
        self.module = module
        self.names = tuple(names)
        self.sync = sync
        self.seconds = 0.0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds += time.perf_counter() - start

        return timed

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(self.module, name) for name in self.names}
        for name, fn in originals.items():
            setattr(self.module, name, self.wrap(fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(self.module, name, fn)


def timed(fn, repeats: int) -> float:
    """Mean seconds of fn() over repeats calls after one warm-up call."""
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in bytes, from
    /proc/self/status (None where there is none). Not getrusage's ``ru_maxrss``: Linux carries the
    parent's peak over into a child across fork and exec, while VmHWM starts afresh."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None
