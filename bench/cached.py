"""Cached-embedding benchmark: `python -m bench.cached` (see --help).

Times one training step of the full model (image encoder forward + backward, 1 + 8 + 2 decoder
passes over K masks with mask feedback, loss, backward, AdamW over every parameter) against the
cached-embedding step (the embedding read from the memory-mapped cache, the same decoder passes,
AdamW over the prompt encoder and mask decoder), vit_b at 1024 px by default, on a synthetic batch
(bench.common). The cache is built by samtrain.data.embedding_cache in a temporary folder. Also
reports the time to read one cached item (embedding + RLE masks; DataLoader workers do this in
parallel with the step) and the cache size per image. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from bench.common import synthetic_batch, timed
from samtrain.data.embedding_cache import CachedEmbeddingDataset, ensure_embedding_cache
from samtrain.interactive.simulate import PromptRecipe
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam


class Preprocessed:
    """Stands for the eval transform of the synthetic samples (already preprocessed, no augmentation)."""

    train = False

    def __repr__(self) -> str:
        return "Preprocessed()"


class SyntheticSamples(Dataset):
    """The images and masks of a synthetic batch as items of the SAM sample contract."""

    transform = Preprocessed()

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["image"])

    def __getitem__(self, index: int) -> dict:
        size = torch.as_tensor(self.batch["input_size"][index])
        return {
            "image": self.batch["image"][index],
            "masks": self.batch["masks"][self.batch["mask_image_index"] == index],
            "input_size": size,
            "original_size": size,
            "image_id": index,
        }


def make_module(variant: str, image_size: int, freeze: tuple[str, ...]) -> SamModule:
    torch.manual_seed(0)
    net = build_sam(variant, image_size=image_size)
    return SamModule(net=net, optimizer=functools.partial(torch.optim.AdamW), freeze=freeze)


def make_step(module: SamModule, make_batch):
    """A function running one optimisation step (AdamW over the trainable parameters) on make_batch()."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss, _ = module.interactive_loss(make_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, after one warm-up call each; the
    functions alternate within a round, so load from other processes hits them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _count(fn) -> tuple[float, float]:
    """FLOPs of fn() and the backward of its outputs' sum, and the bytes autograd saves for it."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = fn()
        sum(o.sum() for o in outputs).backward()
    return float(counter.get_total_flops()), float(saved)


def meta_counts(variant: str, image_size: int, images: int, masks: int, passes: int) -> dict[str, float]:
    """FLOPs (forward + backward) and saved activations of the encoder and of the decoder passes,
    traced on the meta device: nothing is computed, so the counts are exact and load-free. The
    decoder side is what a training step runs: the image prepared once (``Sam.prepare_image``), then
    ``passes`` decoder passes, each counted with 3 points and a mask prompt (a click pass). Saved
    bytes are an upper bound (tensors saved by two operations count twice)."""
    size, n = image_size, images * masks
    with torch.device("meta"):
        net = build_sam(variant, image_size=image_size)
        enc_flops, enc_saved = _count(lambda: (net.image_encoder(torch.zeros(images, 3, size, size)),))
        embeddings = torch.zeros(images, 256, size // 16, size // 16)
        prep_flops, prep_saved = _count(lambda: net.prepare_image(embeddings).tensors())
        image = net.prepare_image(embeddings)
        points = (torch.zeros(n, 3, 2), torch.ones(n, 3, dtype=torch.long))
        mask_inputs = torch.zeros(n, 1, size // 4, size // 4)
        indices = torch.arange(images).repeat_interleave(masks)
        dec_flops, dec_saved = _count(
            lambda: net.decode_masks(image, points=points, mask_inputs=mask_inputs, image_indices=indices)
        )
    decoder_saved = prep_saved + passes * dec_saved
    return {
        "encoder_gflop": enc_flops / 1e9,
        "decoder_gflop": (prep_flops + passes * dec_flops) / 1e9,
        "full_gb": (enc_saved + decoder_saved) / 1e9,
        "cached_gb": decoder_saved / 1e9,
    }


def available_gb() -> float | None:
    """MemAvailable from /proc/meminfo (None elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def measure(args, batch: dict, folder: Path) -> dict:
    full = make_module(args.variant, args.image_size, ())
    frozen = make_module(args.variant, args.image_size, ("image_encoder",))
    ensure_embedding_cache(SyntheticSamples(batch), frozen.net, folder, dtype=args.dtype, batch_size=1)
    cache = CachedEmbeddingDataset(folder)
    rest = {k: v for k, v in batch.items() if k != "image"}

    def cached_batch() -> dict:
        embeddings = torch.stack([cache.embedding(i) for i in range(len(cache))])
        return {**rest, "image_embedding": embeddings}

    steps = {"full": make_step(full, lambda: batch), "cached": make_step(frozen, cached_batch)}
    result = interleaved_medians(steps, args.repeats)
    result["item"] = timed(lambda: cache[0], 5)
    result["disk_mib"] = sum(f.stat().st_size for f in folder.iterdir()) / len(cache) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="vit_b", choices=["vit_t", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=1, help="images per batch")
    parser.add_argument("--masks", type=int, default=16, help="masks per image (K)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed rounds (full and cached step alternate) after one warm-up step each",
    )
    parser.add_argument("--flops-only", action="store_true", help="only the meta-device counts (seconds)")
    args = parser.parse_args()
    recipe = PromptRecipe()
    passes = 1 + recipe.num_click_passes + recipe.num_mask_only_passes
    case = f"{args.variant} {args.image_size}px, {args.images} img x {args.masks} masks, {passes} passes"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, fp32 compute, {args.dtype} cache"
    )
    c = meta_counts(args.variant, args.image_size, args.images, args.masks, passes)
    full, cached = c["encoder_gflop"] + c["decoder_gflop"], c["decoder_gflop"]
    print("\nCounted on the meta device (forward + backward; saved activations are an upper bound):\n")
    print("| case | encoder GFLOP | decoder GFLOP | full / cached FLOPs | saved activations full / cached |")
    print("|---|---|---|---|---|")
    print(
        f"| {case} | {c['encoder_gflop']:.0f} | {cached:.0f} | {full / cached:.2f}x "
        f"| {c['full_gb']:.1f} / {c['cached_gb']:.1f} GB |",
        flush=True,
    )
    if args.flops_only:
        return
    free = available_gb()
    if free is not None and c["full_gb"] > 0.8 * free:
        print(
            f"\nNot timed: the full step would save about {c['full_gb']:.0f} GB of activations and "
            f"{free:.0f} GB are available; try fewer --masks or a smaller --image-size."
        )
        return
    batch = synthetic_batch(args.images, args.masks, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args, batch, Path(tmp) / "cache")
    print(f"\nMeasured (median of {args.repeats} interleaved rounds after a warm-up step each):\n")
    print("| case | full step (s) | cached step (s) | speed-up | cached item read (s) | cache per image |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {case} | {r['full']:.3f} | {r['cached']:.3f} | {r['full'] / r['cached']:.2f}x "
        f"| {r['item']:.4f} | {r['disk_mib']:.2f} MiB |",
        flush=True,
    )


if __name__ == "__main__":
    main()
