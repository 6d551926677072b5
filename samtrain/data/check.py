"""``samtrain check-data``: walk a dataset, print its counts and every problem.

Two ways to name the data::

    samtrain check-data data=sa1b data.train_dataset.root=/data/sa1b       # the training config's data
    samtrain check-data --format coco --path ann.json --image-dir images   # a path and its format

Prints counts (images, masks, masks per image, image sizes, mask areas as a share of the image),
then every problem with its file and reason, and exits 1 when there were errors (2 when the
dataset cannot be opened at all). A progress bar runs on stderr.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samtrain.data.errors import SampleError
from samtrain.data.rle import RleMasks

FORMATS = ("coco", "sa1b", "sa1b_tar", "instance_png", "binary_masks", "semantic_masks")


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
    report = DataReport(name)
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


def datasets_from_path(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset named by ``--format`` and ``--path`` (untransformed)."""
    from samtrain import data

    path = Path(args.path)
    if args.format == "coco":
        image_dir = args.image_dir or path.parent
        return {"coco": data.CocoInstanceDataset(annotation_file=path, image_dir=image_dir)}
    if args.format == "sa1b":
        return {"sa1b": data.Sa1bDataset(root=path)}
    if args.format == "sa1b_tar":
        return {"sa1b_tar": data.Sa1bTarStream(shards=str(path))}
    dirs = {"image_dir": args.image_dir or path / "images", "mask_dir": args.mask_dir or path / "masks"}
    if args.format == "instance_png":
        return {"instance_png": data.InstanceMaskFolder(**dirs)}
    if args.format == "binary_masks":
        return {"binary_masks": data.BinaryMaskFolder(layout=args.layout, **dirs)}
    return {"semantic_masks": data.SemanticMaskFolder(**dirs)}


def datasets_from_config(overrides: Sequence[str], splits: Sequence[str]) -> dict[str, Any]:
    """The train/val datasets of the training config's ``data`` group (untransformed)."""
    import hydra
    from hydra import compose, initialize_config_dir

    from samtrain.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    found = {}
    for split in splits:
        node = cfg.data.get(f"{split}_dataset")
        if node is not None:
            found[split] = hydra.utils.instantiate(node, transform=None)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtrain check-data",
        description="Walk a dataset: counts, image sizes, mask areas and every problem (exit 1 on errors). "
        "Without --path, the remaining arguments are Hydra overrides of the training config "
        "(e.g. data=sa1b data.train_dataset.root=...).",
    )
    parser.add_argument(
        "--path", help="dataset path: COCO JSON, SA-1B folder or shards, or a mask-folder root"
    )
    parser.add_argument("--format", choices=FORMATS, help="the format of --path")
    parser.add_argument(
        "--image-dir", help="COCO: images folder (default: beside the JSON); folders: <path>/images"
    )
    parser.add_argument("--mask-dir", help="mask folders: the masks (default: <path>/masks)")
    parser.add_argument(
        "--layout", choices=("folder", "suffix"), default="folder", help="binary_masks layout"
    )
    parser.add_argument(
        "--split", choices=("train", "val", "both"), default="both", help="config mode: which"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the checker; returns the exit status (0 clean, 1 errors found, 2 cannot open)."""
    args, overrides = build_parser().parse_known_args(list(argv))
    if (args.path is None) != (args.format is None):
        print("samtrain check-data: --path and --format go together", flush=True)
        return 2
    try:
        if args.path is not None:
            datasets = datasets_from_path(args)
        else:
            splits = ("train", "val") if args.split == "both" else (args.split,)
            datasets = datasets_from_config(overrides, splits)
    except Exception as err:  # missing folder, bad JSON, a config error: the dataset cannot be opened
        print(f"samtrain check-data: cannot open the dataset: {err}", flush=True)
        return 2
    reports = [check_dataset(ds, name, progress=not args.no_progress) for name, ds in datasets.items()]
    for report in reports:
        print(report.format(), flush=True)
    errors = sum(len(r.errors) for r in reports)
    print(f"{errors} error(s)" if errors else "no errors", flush=True)
    return 1 if errors else 0
