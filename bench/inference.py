"""Inference figures: automatic-mask-generator time per image, samtrain against the official
SamAutomaticMaskGenerator on the same weights, and ONNX decoder latency against torch.

    python -m bench.inference [--variants vit_b vit_t] [--points-per-side 16] [--repeats 1]

Weights are random (samtrain's, exported; the official model loads the export strictly), so the
IoU and stability filters are off (0): every mask goes through the post-processing, the most
work a generator does per point. The image is data/sample/val/001001.jpg upscaled to 1024 px on
its long side. Compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samtrain.data.image_io import read_rgb_image
from samtrain.frame import resize_longest_side
from samtrain.inference.automatic import AutomaticMaskGenerator
from samtrain.inference.onnx import DecoderGraph, decoder_example, export_decoder
from samtrain.models import build_sam, export_sam_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def generator_row(variant: str, image: np.ndarray, points_per_side: int, repeats: int) -> dict:
    import segment_anything

    torch.manual_seed(0)
    ours = build_sam(variant, image_size=1024).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_sam_checkpoint(ours, Path(tmp) / "model.pth")
        official = segment_anything.sam_model_registry.get(variant)
        if official is None:  # vit_t is samtrain's: the official Sam built to its spec
            from tests.oracle import build_official_sam

            official = build_official_sam(variant, 1024)
            official.load_state_dict(torch.load(path, weights_only=True))
        else:
            official = official(checkpoint=str(path))
    official.eval()
    kwargs = dict(points_per_side=points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    theirs_s, theirs = timed(
        lambda: segment_anything.SamAutomaticMaskGenerator(official, **kwargs).generate(image), repeats
    )
    ours_s, mine = timed(lambda: AutomaticMaskGenerator(ours, **kwargs).generate(image), repeats)
    with torch.no_grad():
        x = torch.zeros(1, 3, 1024, 1024)
        encoder_s, _ = timed(lambda: ours.image_encoder(x), repeats)
    return {
        "variant": variant,
        "points": points_per_side**2,
        "official_s": theirs_s,
        "samtrain_s": ours_s,
        "encoder_s": encoder_s,
        "masks": (len(theirs), len(mine)),
    }


def onnx_decoder_row(repeats: int, num_points: int = 2) -> dict:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_sam("vit_t", image_size=1024).eval()  # the decoder is the same for every variant
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(str(export_decoder(model, Path(tmp) / "decoder.onnx")))
    inputs = decoder_example(model, num_points)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    graph = DecoderGraph(model)
    session.run(None, feed)
    with torch.no_grad():
        graph(*inputs)
        torch_s, _ = timed(lambda: graph(*inputs), repeats)
        emb, coords, labels = inputs[0], inputs[1], inputs[2].long()
        decode_s, _ = timed(
            lambda: model.decode_masks(emb, points=(coords, labels), pad_points=False), repeats
        )
    onnx_s, _ = timed(lambda: session.run(None, feed), repeats)
    return {"onnx_ms": 1e3 * onnx_s, "torch_graph_ms": 1e3 * torch_s, "decode_masks_ms": 1e3 * decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["vit_b", "vit_t"])
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    image = resize_longest_side(read_rgb_image(ROOT / "data/sample/val/001001.jpg"), 1024)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {image.shape[1]}x{image.shape[0]}"
    )
    print(
        "| model | points | official s/image | samtrain s/image | ratio | encoder s | masks (official, samtrain) |"
    )
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants:
        r = generator_row(variant, image, args.points_per_side, args.repeats)
        print(
            f"| {variant} 1024 px | {r['points']} | {r['official_s']:.2f} | {r['samtrain_s']:.2f} | "
            f"{r['official_s'] / r['samtrain_s']:.2f}x | {r['encoder_s']:.2f} | {r['masks']} |",
            flush=True,
        )
    r = onnx_decoder_row(repeats=max(20, args.repeats))
    print("\n| decoder, 1 prompt of 2 points, 1024 px | ms |\n|---|---|")
    for name, value in r.items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
