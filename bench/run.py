"""Training-step benchmark: `make bench` (or `python -m bench.run --help`).

Times SAM's full interactive training step (encoder once, 1 + 8 + 2 decoder passes over K masks
per image with mask feedback, loss, backward, AdamW step) on synthetic data and splits the step
into encoder, decoder loop, prompt sampler and optimizer. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import platform

import torch

import samtrain.interactive.simulate as simulate
from bench.common import FunctionClock, synthetic_batch, timed
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam

CASES = {"vit_t": (128, 4, 4), "vit_b": (256, 2, 16)}  # variant: (image size, images, masks per image)
SAMPLERS = ("sample_initial_prompts", "sample_error_points", "click_schedule", "step_generators")


class SamplerClock(FunctionClock):
    """Accumulates the wall time spent inside samtrain's prompt sampling functions."""

    def __init__(self) -> None:
        super().__init__(simulate, SAMPLERS)


def bench_case(variant: str, image_size: int, batch_size: int, masks: int, repeats: int) -> dict:
    torch.manual_seed(0)
    module = SamModule(
        net=build_sam(variant, image_size=image_size), optimizer=functools.partial(torch.optim.AdamW)
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    batch = synthetic_batch(batch_size, masks, image_size)
    passes = 1 + module.prompts.num_click_passes + module.prompts.num_mask_only_passes

    def step():
        loss, _ = module.interactive_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def encoder_only():
        embeddings = module.net.image_encoder(batch["image"])
        embeddings.sum().backward()

    clock = SamplerClock()
    with clock.installed():
        step_s = timed(step, repeats)
    sampler_s = clock.seconds / (repeats + 1)
    encoder_s = timed(encoder_only, repeats)
    optimizer.zero_grad()
    module.interactive_loss(batch)[0].backward()
    optimizer_s = timed(optimizer.step, repeats)
    n_masks = batch["masks"].shape[0]
    return {
        "case": f"{variant} {image_size}px, {batch_size} img x {masks} masks, {passes} passes",
        "step_s": step_s,
        "mask_passes_per_s": n_masks * passes / step_s,
        "encoder": encoder_s / step_s,
        "decoder_loop": (step_s - encoder_s - optimizer_s - sampler_s) / step_s,
        "sampler": sampler_s / step_s,
        "optimizer": optimizer_s / step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("| case | step (s) | masks x passes / s | encoder | decoder loop | prompt sampler | optimizer |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants:
        image_size, batch_size, masks = CASES[variant]
        r = bench_case(variant, image_size, batch_size, masks, args.repeats)
        print(
            f"| {r['case']} | {r['step_s']:.3f} | {r['mask_passes_per_s']:.1f} | {r['encoder']:.1%} "
            f"| {r['decoder_loop']:.1%} | {r['sampler']:.2%} | {r['optimizer']:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
