"""``samtrain check-data``: walk a dataset, print its counts and every problem.

Two ways to name the data::

    samtrain check-data data=sa1b data.train_dataset.root=/data/sa1b       # the training config's data
    samtrain check-data --format coco --path ann.json --image-dir images   # a path and its format

Prints counts (images, masks, masks per image, image sizes, mask areas as a share of the image),
then every problem with its file and reason. Exit status:

- 0: the data was checked and is clean;
- 1: the data was checked and has errors (each listed with its file and reason);
- 2: the data could not be checked: bad arguments, a dataset that cannot be opened, or an
  unexpected exception during the walk (its message is printed; the counts are then incomplete).

A progress bar runs on stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir

from samtrain import data
from samtrain.commands.config import config_dir
from samtrain.data import cvat, labelme, voc, volume, yolo
from samtrain.data.check import check_dataset

CLEAN, DATA_ERRORS, COULD_NOT_CHECK = 0, 1, 2
FORMATS = (
    "coco",
    "sa1b",
    "sa1b_tar",
    "instance_png",
    "binary_masks",
    "semantic_masks",
    "yolo",
    "labelme",
    "cvat",
    "voc",
    "volume",
)
ANNOTATION_FORMATS = ("yolo", "labelme", "cvat", "voc", "volume")


def datasets_from_path(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset named by ``--format`` and ``--path`` (untransformed)."""
    path = Path(args.path)
    if args.format in ANNOTATION_FORMATS:
        return annotation_datasets(args.format, path, args.image_dir, args.mask_dir)
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


def annotation_datasets(
    format: str, path: Path, image_dir: str | None = None, mask_dir: str | None = None
) -> dict[str, Any]:
    """The datasets of ``path`` in one of the ANNOTATION_FORMATS (untransformed): YOLO's splits
    (data.yaml or its folder), a labelme folder, a CVAT XML (images in ``image_dir``, default
    ``images/`` beside it or its folder), a VOC year folder (every image), a volume folder
    (``imagesTr/`` + ``labelsTr/`` as nnU-Net has them, else ``images/`` + ``labels/``)."""
    if format == "yolo":
        yaml_file, doc = yolo.read_data_yaml(path)
        return {
            split: yolo.YoloSegmentationDataset(data_yaml=yaml_file, split=split)
            for split in yolo.SPLITS
            if doc.get(split)
        }
    if format == "labelme":
        return {"labelme": labelme.LabelmeDataset(root=path)}
    if format == "cvat":
        default = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        return {"cvat": cvat.CvatImagesDataset(annotation_file=path, image_dir=image_dir or default)}
    if format == "voc":
        return {"voc": voc.VocInstanceDataset(root=path, image_set=None)}
    nnunet = (path / "imagesTr").is_dir() and (path / "labelsTr").is_dir()
    return {
        "volume": volume.VolumeSliceDataset(
            image_dir=image_dir or path / ("imagesTr" if nnunet else "images"),
            label_dir=mask_dir or path / ("labelsTr" if nnunet else "labels"),
            image_suffix="_0000" if nnunet else "",
        )
    }


def datasets_from_config(overrides: Sequence[str], splits: Sequence[str]) -> dict[str, Any]:
    """The train/val datasets of the training config's ``data`` group (untransformed)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    found = {}
    for split in splits:
        node = cfg.data.get(f"{split}_dataset")
        if node is not None:
            found[split] = hydra.utils.instantiate(node, transform=None)
        found.update(named_datasets(cfg.data.get(f"{split}_datasets"), split))
    return found


def named_datasets(nodes: Any, split: str) -> dict[str, Any]:
    """The datasets of ``train_datasets`` (mixing sources) or ``val_datasets``, as ``<split>/<name>``."""
    if not nodes:
        return {}
    items = nodes.items() if hasattr(nodes, "items") else enumerate(nodes)
    found = {}
    for key, node in items:
        name = node.get("name", key) if "dataset" in node else key
        found[f"{split}/{name}"] = hydra.utils.instantiate(node.get("dataset", node), transform=None)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtrain check-data",
        description="Walk a dataset: counts, image sizes, mask areas and every problem. Exit status: 0 clean, "
        "1 data errors found, 2 could not check (bad arguments, unopenable dataset, unexpected exception). "
        "Without --path, the remaining arguments are Hydra overrides of the training config "
        "(e.g. data=sa1b data.train_dataset.root=...).",
    )
    parser.add_argument(
        "--path",
        help="dataset path: COCO JSON, SA-1B folder or shards, a mask-folder root, YOLO data.yaml "
        "(or its folder), labelme folder, CVAT XML, VOC year folder, or volume folder",
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
    """Run the checker; returns the exit status: 0 clean, 1 data errors found, 2 could not check."""
    args, overrides = build_parser().parse_known_args(list(argv))
    if (args.path is None) != (args.format is None):
        print("samtrain check-data: --path and --format go together", flush=True)
        return COULD_NOT_CHECK
    try:
        if args.path is not None:
            datasets = datasets_from_path(args)
        else:
            splits = ("train", "val") if args.split == "both" else (args.split,)
            datasets = datasets_from_config(overrides, splits)
    except Exception as err:  # missing folder, bad JSON, a config error: the dataset cannot be opened
        print(f"samtrain check-data: cannot open the dataset: {err}", flush=True)
        return COULD_NOT_CHECK
    reports = []
    for name, dataset in datasets.items():
        try:
            reports.append(check_dataset(dataset, name, progress=not args.no_progress))
        except Exception as err:  # a bug or an environment problem, not a finding about the data
            print(
                f"samtrain check-data: could not check {name}: {type(err).__name__}: {err}",
                flush=True,
            )
            return COULD_NOT_CHECK
    for report in reports:
        print(report.format(), flush=True)
    errors = sum(len(r.errors) for r in reports)
    print(f"{errors} error(s)" if errors else "no errors", flush=True)
    return DATA_ERRORS if errors else CLEAN
