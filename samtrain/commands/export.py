"""``samtrain export CKPT --format official|safetensors|onnx|hf --out PATH``.

- ``official``: a ``.pth`` in the official key layout (``segment_anything`` loads it strictly); a
  SAM 2.1 model is written in sam2's layout, into ``--original`` (its official checkpoint, every
  video-memory key kept bit for bit, so ``build_sam2`` loads it strictly) when given;
- ``safetensors``: the same tensors as safetensors;
- ``onnx``: ``PATH`` a folder with ``encoder.onnx`` (image -> embeddings) and ``decoder.onnx``
  (the official ONNX interface: prompt encoder + mask decoder; SAM 2.1: the community SAM 2
  interface, three feature levels, object scores), see :mod:`samtrain.inference.onnx`;
- ``hf``: ``PATH`` a Hugging Face ``SamModel`` directory (config.json + model.safetensors), a
  ``Sam2Model`` one for SAM 2.1, see :mod:`samtrain.inference.hf`.

LoRA runs are written merged in every format.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from samtrain.commands.loading import add_model_arguments, load_model
from samtrain.inference.hf import save_hf_directory
from samtrain.inference.onnx import export_onnx
from samtrain.models import export_sam_checkpoint

FORMATS = ("official", "safetensors", "onnx", "hf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samtrain export", description="Export a SAM checkpoint.")
    add_model_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True, help="file (official, safetensors) or folder (onnx, hf)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--export-image-size",
        type=int,
        help="official/safetensors: the input size the file is made for (1024 for segment_anything)",
    )
    parser.add_argument(
        "--original",
        help="official/safetensors, SAM 2.1: the official sam2.1_hiera_*.pt to write the image parts into",
    )
    return parser


def export(args: argparse.Namespace) -> Path:
    if args.device is None:
        args.device = "cpu"
    model = load_model(args)
    out = Path(args.out)
    if args.format in ("official", "safetensors"):
        suffixes = (".pth", ".pt") if args.format == "official" else (".safetensors",)
        if out.suffix not in suffixes:
            raise ValueError(f"--format {args.format} writes a {' or '.join(suffixes)} file, got --out {out}")
        return export_sam_checkpoint(model, out, image_size=args.export_image_size, original=args.original)
    if args.format == "onnx":
        export_onnx(model, out, opset=args.opset)  # needs the onnx extra
        return out
    return save_hf_directory(model, out)  # needs the hf extra


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        path = export(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"samtrain export: {err}", flush=True)
        return 2
    print(f"wrote {path}", flush=True)
    return 0
