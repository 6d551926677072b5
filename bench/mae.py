"""MAE step benchmark: `python -m bench.mae [--variant vit_b --image-size 224 --batch-size 8]`.

Times one MAE training step (forward + backward: encoder on the visible 25% of the patches, the
decoder on all of them, the masked-patch loss) against a forward + backward of the same timm ViT
on every token at the same batch (the cost MAE avoids), and prints Markdown table rows with the
step times and images/s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from samtrain.models.mae import build_mae


def time_steps(fns: dict, *, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds of each fn() over iters rounds after warmup rounds; the fns take turns in
    every round, so that drift in the machine's load affects them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mae", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vit_b")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    mae = build_mae(
        args.variant,
        image_size=args.image_size,
        decoder_depth=args.decoder_depth,
        decoder_dim=args.decoder_dim,
        mask_ratio=args.mask_ratio,
    ).to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def mae_step():
        mae.zero_grad(set_to_none=True)
        mae(images).loss.backward()
        sync()

    def full_step():  # the same ViT on every token (no masking, no decoder)
        mae.zero_grad(set_to_none=True)
        mae.encoder.forward_features(images).square().mean().backward()
        sync()

    def encoder_only_step():  # the MAE encoder's share: visible tokens only
        mae.zero_grad(set_to_none=True)
        mae.forward_encoder(images, args.mask_ratio)[0].square().mean().backward()
        sync()

    medians = time_steps(
        {
            "MAE step (encoder on visible + decoder)": mae_step,
            "  of which encoder on visible tokens": encoder_only_step,
            "full-token ViT forward + backward": full_step,
        },
        warmup=args.warmup,
        iters=args.iters,
    )
    rows = list(medians.items())
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {args.threads} threads"
    )
    print(
        f"\n{args.variant} MAE at {args.image_size} px, batch {args.batch_size}, mask ratio {args.mask_ratio}, "
        f"decoder {args.decoder_depth}x{args.decoder_dim}, {where}, median of {args.iters}\n"
    )
    print("| step | time (s) | images/s | vs full |")
    print("|---|---:|---:|---:|")
    full = rows[-1][1]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {args.batch_size / seconds:.1f} | {full / seconds:.2f}x |")


if __name__ == "__main__":
    main()
