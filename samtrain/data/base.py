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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from samtrain.data.rle import RleMasks


class SamDataset(Dataset):
    """Base of samtrain's map-style datasets; subclasses set ``self.transform``."""

    transform: Callable[..., dict] | None = None
    accepts_sample_seeds = True  # dataset[(index, seed)] seeds the augmentation (module docstring)

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
