"""The map-style dataset protocol that every samtrain dataset follows.

A subclass implements ``__len__`` and ``load_sample(index)``, returning the raw sample::

    "image":    uint8 (H, W, 3) RGB
    "masks":    bool (K, H, W)
    "image_id": int, unique per image in the dataset

and may override ``load_encoded_sample(index)`` to hand the transform its masks still
run-length encoded (:class:`samtrain.data.rle.RleMasks`), so a transform that understands them
decodes only the masks and pixels it keeps.

Indexing:

- ``dataset[index]``: ``transform(sample)``, the transform's own RNG (or the raw sample when
  ``transform`` is None);
- ``dataset[(index, seed)]``: ``transform(sample, rng=np.random.default_rng(seed))``, so the
  augmentation is a pure function of the seed (a sampler that yields ``(index, seed)`` makes it
  depend only on (run seed, epoch, index): exact resume, DDP equal to one process). An eval
  transform ignores the seed: its output, the mask subset included, depends on the sample alone.

What a sample depends on (the contract the embedding cache's key is built from; every dataset
class follows it, map-style or stream):

- ``SAMPLE_ARGS: tuple[str, ...]``, a class attribute: the constructor arguments that change what
  a sample holds (files, folders, options, the split), each kept on the instance under the same
  attribute name (normalised values are fine: a ``Path``, a ``frozenset``);
- ``NON_SAMPLE_ARGS: tuple[str, ...]``: the other constructor arguments (``transform``, which the
  cache key covers by itself; settings that change speed or logging only);
- ``SAMPLE_ARGS + NON_SAMPLE_ARGS`` name the constructor's parameters exactly (a subclass passing
  ``**kwargs`` up counts its base's parameters): :func:`undeclared_arguments` says what is missing
  or extra, and a test checks every dataset class of ``samtrain.data``, so a new option cannot be
  left out of the key;
- ``source_files() -> list[Path]``: every file the dataset reads for its samples (annotation files,
  images, masks), including expected files that are missing;
- optionally ``sample_files(index) -> list[Path]``: the files item ``index`` alone reads (its
  image, its mask files); then a change in those files rebuilds only that item's cache entry.
  Files shared by many items (a COCO annotation file) are in ``source_files`` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from samtrain.data.rle import RleMasks


class SamDataset(Dataset):
    """Base of samtrain's map-style datasets; subclasses set ``self.transform``."""

    transform: Callable[..., dict] | None = None
    accepts_sample_seeds = True  # dataset[(index, seed)] seeds the augmentation (module docstring)
    SAMPLE_ARGS: tuple[str, ...] = ()  # constructor arguments that change a sample (module docstring)
    NON_SAMPLE_ARGS: tuple[str, ...] = ()  # the other constructor arguments

    def source_files(self) -> list[Path]:
        """Every file the dataset reads for its samples (module docstring)."""
        raise NotImplementedError

    def sample_files(self, index: int) -> list[Path] | None:
        """The files item ``index`` alone reads; None: not known (a changed file rebuilds every item)."""
        return None

    def __len__(self) -> int:
        raise NotImplementedError

    def load_sample(self, index: int) -> dict:
        """The untransformed sample of ``index`` (see the module docstring)."""
        raise NotImplementedError

    def load_encoded_sample(self, index: int) -> dict:
        """Like ``load_sample``, but masks may be :class:`RleMasks` (decoded by the transform)."""
        return self.load_sample(index)

    def sample_name(self, index: int) -> str:
        """A human-readable name of item ``index`` (its file), for logs and the data checker."""
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        if self.transform is None:
            return self.load_sample(index)
        takes_rle = getattr(self.transform, "accepts_rle_masks", False)
        sample = self.load_encoded_sample(index) if takes_rle else self.load_sample(index)
        if seed is None:
            return self.transform(sample)
        return self.transform(sample, rng=np.random.default_rng(int(seed)))

    # torchdata's StatefulDataLoader saves these, so a resumed run continues the augmentation RNG.
    def state_dict(self) -> dict:
        state_fn = getattr(self.transform, "state_dict", None)
        return {"transform": state_fn()} if callable(state_fn) else {}

    def load_state_dict(self, state: dict) -> None:
        if "transform" in state and hasattr(self.transform, "load_state_dict"):
            self.transform.load_state_dict(state["transform"])


def decoded(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with RleMasks masks decoded to bool (K, H, W) (other samples unchanged)."""
    masks = sample.get("masks")
    if isinstance(masks, RleMasks):
        return {**sample, "masks": masks.decode()}
    return sample


def constructor_parameters(cls: type) -> tuple[str, ...]:
    """The keyword parameters of ``cls(...)``: its ``__init__``'s, and where that passes
    ``**kwargs`` up, those of the next ``__init__`` along the MRO (``self`` excluded)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return tuple(dict.fromkeys(names))


def undeclared_arguments(cls: type) -> list[str]:
    """What breaks the module docstring's contract in ``cls``: constructor parameters declared in
    neither ``SAMPLE_ARGS`` nor ``NON_SAMPLE_ARGS``, declared names that are no parameter, names
    declared in both (empty: the declarations are complete)."""
    sample = tuple(getattr(cls, "SAMPLE_ARGS", None) or ())
    other = tuple(getattr(cls, "NON_SAMPLE_ARGS", None) or ())
    params = set(constructor_parameters(cls))
    declared = set(sample) | set(other)
    problems = [f"{name} is not declared" for name in sorted(params - declared)]
    problems += [f"{name} is declared but is no constructor parameter" for name in sorted(declared - params)]
    problems += [f"{name} is declared twice" for name in sorted(set(sample) & set(other))]
    return problems
