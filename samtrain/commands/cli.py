"""The ``samtrain`` command: ``samtrain train [overrides]``, ``samtrain eval [overrides]``,
``samtrain check-data [options] [overrides]`` (see :mod:`samtrain.commands.check_data`),
``samtrain convert`` (:mod:`samtrain.commands.convert`) and ``samtrain predict|annotate|export``
(:mod:`samtrain.commands.predict`, ``annotate``, ``export``).

Each subcommand is the Hydra app of the matching root script (``train.py`` with ``conf/train.yaml``,
``eval.py`` with ``conf/eval.yaml``): everything after the subcommand goes to Hydra unchanged, so
overrides (``key=value``, ``group=option``) and Hydra's flags (``--help``, ``--cfg job``, ``-m``)
work as they do with the scripts. The configs are read from the repository's ``conf/`` folder
(next to the ``samtrain`` package of an editable install) or from ``$SAMTRAIN_CONFIG_DIR``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from samtrain.commands.config import config_dir

COMMANDS = {
    "train": "train a SAM model (conf/train.yaml; same as `python train.py`)",
    "eval": "evaluate checkpoints: results.json, results.md, mIoU-vs-clicks plot "
    "(conf/eval.yaml; same as `python eval.py`)",
    "check-data": "walk a dataset: counts, sizes, mask areas and every problem (exit 0 clean, 1 data errors, 2 could not check)",
    "convert": "write a dataset (yolo, labelme, cvat, voc, volume, ...) as a COCO instance file",
    "predict": "masks for point/box prompts on images: mask PNGs, overlays, scores.json",
    "annotate": "pre-annotate a folder: a COCO file (RLE) of automatic or prompted masks; resumable",
    "export": "export a checkpoint: --format official|safetensors|onnx|hf",
    "plan": "predict the peak memory of a training step per memory mode (fake tensors; --memory 24GiB)",
}
# Commands with their own argparse options (not Hydra apps): the module whose main(argv) runs them.
ARGPARSE_COMMANDS = {
    "check-data": "check_data",
    "predict": "predict",
    "annotate": "annotate",
    "export": "export",
    "convert": "convert",
    "plan": "plan",
}

EXAMPLES = """\
examples:
  samtrain train experiment=sample_cpu
  samtrain train --help                      # the training config groups and options
  samtrain eval checkpoints=[outputs/train/runs/<run>/official.pth,sam_vit_b_01ec64.pth] variant=vit_b
  samtrain eval data=coco data.val_dataset.annotation_file=... data.val_dataset.image_dir=...
  samtrain eval --cfg job                    # print the composed eval config
  samtrain check-data data=sa1b data.train_dataset.root=/data/sa1b
  samtrain check-data --format coco --path annotations.json --image-dir images
  samtrain convert --from yolo --path data.yaml --to coco --out coco.json
  samtrain predict official.pth photo.jpg --points 120,80 --out predictions
  samtrain annotate official.pth images/ --out coco.json --points-per-side 32
  samtrain export official.pth --format onnx --out onnx/
  samtrain plan model=sam_vit_h trainer=gpu --memory 24GiB
"""


def _train(cfg: Any) -> float | None:
    from samtrain.commands.train import train

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


def _eval(cfg: Any) -> None:
    from samtrain.commands.eval import evaluate

    evaluate(cfg)


# Hydra names the job (hydra.job.name, the <run>/<job>.log file) after the task function's module:
# these names make `samtrain train|eval` write train.log|eval.log, as `python train.py|eval.py` do.
_train.__module__ = "samtrain.commands.train"
_eval.__module__ = "samtrain.commands.eval"
TASKS: dict[str, Callable[[Any], Any]] = {"train": _train, "eval": _eval}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtrain",
        description="Train and evaluate Segment Anything (SAM) models (Hydra-configured).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, summary in COMMANDS.items():
        # No help of their own here: `samtrain <command> --help` is Hydra's help (train, eval) or
        # the command's argparse help.
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("samtrain")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samtrain`` console script; ``argv`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Only the subcommand is parsed here; the rest (overrides, Hydra flags) is Hydra's.
    split = next((i for i, arg in enumerate(args) if not arg.startswith("-")), len(args))
    namespace = parser.parse_args(args[: split + 1])
    command, overrides = namespace.command, args[split + 1 :]
    # Each command imports its own dependencies (Hydra, torch) when it runs: `samtrain --help` stays quick.
    if command in ARGPARSE_COMMANDS:
        module = importlib.import_module(f"samtrain.commands.{ARGPARSE_COMMANDS[command]}")
        return module.main(overrides)
    try:
        conf = config_dir()
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2

    import hydra

    app = hydra.main(version_base="1.3", config_path=str(conf), config_name=command)(TASKS[command])
    saved = sys.argv
    sys.argv = [f"samtrain {command}", *overrides]  # hydra.main reads its arguments from sys.argv
    try:
        app()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
