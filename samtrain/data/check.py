"""Walking a dataset: counts (images, masks per image, image sizes, mask areas as a share of the
image) and every problem with its file and reason. ``samtrain check-data`` prints it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samtrain.data.errors import SampleError
from samtrain.data.rle import RleMasks


@dataclass
class DataReport:
    """What a walk over one dataset found."""

    name: str
    images: int = 0
    masks_per_image: list[int] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    area_fractions: list[float] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    skipped_empty: int = 0  # images (or slices) without objects the dataset left out

    def add(self, name: str, sample: dict) -> None:
        image, masks = sample["image"], sample["masks"]
        height, width = image.shape[:2]
        areas = masks.areas() if isinstance(masks, RleMasks) else masks.reshape(len(masks), -1).sum(axis=1)
        self.images += 1
        self.masks_per_image.append(len(areas))
        self.sizes[(int(width), int(height))] += 1
        self.area_fractions.extend((np.asarray(areas) / float(height * width)).tolist())
        if len(areas) == 0:
            self.warnings.append((name, "image has no masks"))

    def format(self) -> str:
        per_image = np.asarray(self.masks_per_image or [0])
        fractions = np.asarray(self.area_fractions or [0.0])
        lines = [
            f"== {self.name}",
            f"images: {self.images} readable, {len(self.errors)} with errors",
            f"masks: {int(per_image.sum())}; per image min {per_image.min()} / median {np.median(per_image):g} "
            f"/ max {per_image.max()}",
            "image sizes (w x h): "
            + ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(5))
            + (f", ... {len(self.sizes) - 5} more" if len(self.sizes) > 5 else ""),
            "mask area / image area: "
            + " / ".join(f"p{q} {np.percentile(fractions, q):.4f}" for q in (0, 5, 50, 95, 100)),
        ]
        if self.skipped_empty:
            lines.append(f"skipped: {self.skipped_empty} image(s) without objects (not errors)")
        lines += [f"ERROR {name}: {reason}" for name, reason in self.errors]
        lines += [f"warning {name}: {reason}" for name, reason in self.warnings]
        return "\n".join(lines)


def raw_samples(dataset: Any) -> Iterator[tuple[str, dict | SampleError]]:
    """(name, untransformed sample or the SampleError it raised) for every item of a dataset."""
    if hasattr(dataset, "iter_raw"):  # streams
        yield from dataset.iter_raw()
        return
    load = getattr(dataset, "load_encoded_sample", None) or dataset.load_sample
    for index in range(len(dataset)):
        name = dataset.sample_name(index) if hasattr(dataset, "sample_name") else str(index)
        try:
            yield name, load(index)
        except SampleError as err:
            yield name, err


def check_dataset(dataset: Any, name: str, *, progress: bool = True) -> DataReport:
    """Walk ``dataset`` (a samtrain dataset or stream) and collect a DataReport."""
    report = DataReport(name, skipped_empty=int(getattr(dataset, "skipped_empty", 0)))
    items = raw_samples(dataset)
    if progress:
        from rich.console import Console
        from rich.progress import track

        total = len(dataset) if hasattr(dataset, "__len__") else None
        items = track(items, total=total, description=f"checking {name}", console=Console(stderr=True))
    for item_name, result in items:
        if isinstance(result, SampleError):
            report.errors.append((result.path, result.reason))
        else:
            report.add(item_name, result)
    return report
