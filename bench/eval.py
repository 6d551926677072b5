"""Evaluation throughput: `python -m bench.eval` (see --help).

One synthetic image of the DAVIS size (480 x 854 by default) with N elliptic objects goes through
the evaluation of `samtrain eval` (samtrain.interactive.protocols.evaluate_sample: one image
embedding, the RITM click protocol at the original resolution with 20 clicks, the box protocol),
vit_b at 1024 px by default, random weights. Reports the image encoder's time, the time of the
protocols for all objects, and objects x clicks per second with and without the encoder (the
encoder runs once per image, so the second figure is what more objects per image cost). The
protocol's share spent in the distance transforms (the CPU part of the clicker) is also shown.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from bench.common import FunctionClock
from samtrain.interactive import protocols
from samtrain.models import build_sam


def synthetic_image(height: int, width: int, objects: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random (H, W, 3) uint8 image and (N, H, W) bool ellipses of varied size painted on it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((objects, height, width), dtype=bool)
    for i in range(objects):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[masks[i]] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image, masks


def run(
    variant: str, image_size: int, height: int, width: int, objects: int, clicks: int, device: str
) -> dict:
    torch.manual_seed(0)
    model = build_sam(variant, image_size=image_size).to(device).eval()
    image, masks = synthetic_image(height, width, objects)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        protocols.embed_image(model, image)  # warm-up
        sync()
        start = time.perf_counter()
        protocols.embed_image(model, image)
        sync()
        encoder_s = time.perf_counter() - start
        clock = FunctionClock(protocols, ["ritm_next_clicks"], sync=sync)
        with clock.installed():
            start = time.perf_counter()
            protocols.evaluate_sample(model, image, masks, max_clicks=clicks)
            sync()
            total_s = time.perf_counter() - start
    protocol_s = total_s - encoder_s
    return {
        "encoder_s": encoder_s,
        "protocol_s": protocol_s,
        "clicker_s": clock.seconds,
        "per_s": objects * clicks / total_s,
        "per_s_without_encoder": objects * clicks / protocol_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="vit_b")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    r = run(args.variant, args.image_size, args.height, args.width, args.objects, args.clicks, args.device)
    print(
        f"\n{args.variant} at {args.image_size} px, {args.objects} objects x {args.clicks} clicks on a "
        f"{args.width}x{args.height} image, {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)\n"
    )
    print("| quantity | value |\n|---|---:|")
    print(f"| image encoder, one image | {r['encoder_s']:.2f} s |")
    print(f"| click + box protocols, all objects | {r['protocol_s']:.2f} s |")
    print(f"| of which the clicker's distance transforms | {r['clicker_s']:.2f} s |")
    print(f"| objects x clicks / s (with the encoder) | {r['per_s']:.1f} |")
    print(f"| objects x clicks / s (protocols only) | {r['per_s_without_encoder']:.1f} |")
    return r


if __name__ == "__main__":
    main()
