"""Cached-embedding benchmark, three steps: `python -m bench.cached` (see --help).

The cache only applies with a frozen image encoder, so its fair baseline is the frozen-encoder
step without a cache, not full fine-tuning. Three steps, each one optimisation step (1 + 8 + 2
decoder passes over K masks per image with mask feedback, loss, backward, AdamW):

- full: full fine-tuning, the image encoder's forward and backward, AdamW over every parameter;
- frozen: the encoder frozen (``model.freeze=[image_encoder]``), its forward run without a graph
  on every step, AdamW over the prompt encoder and mask decoder;
- cached: the same frozen model reading the embedding from the memory-mapped cache
  (samtrain.data.embedding_cache, built in a temporary folder) instead of running the encoder.

FLOPs (forward + backward) are counted by torch's FlopCounterMode on the meta device: exact and
independent of the machine's load. Times (median of interleaved rounds after a warm-up step) are
taken for the steps whose saved activations fit in 80% of the available memory. vit_b at 1024 px,
one synthetic image (bench.common) with 1, 2 and 16 masks by default; ``--variant sam2.1_hiera_*``
measures SAM 2.1, whose cache holds its three feature levels. Prints Markdown tables.
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
from samtrain.models import SAM2_VARIANTS, SAM_VARIANTS, build_sam

STEPS = ("full", "frozen", "cached")


class Preprocessed:
    """Stands for the eval transform of the synthetic samples (already preprocessed, no augmentation)."""

    train = False

    def __repr__(self) -> str:
        return "Preprocessed()"


class SyntheticSamples(Dataset):
    """The images and masks of a synthetic batch as items of the SAM sample contract (the cache
    key's dataset contract: no sample-changing argument but the batch, no file read)."""

    SAMPLE_ARGS: tuple[str, ...] = ("seed",)
    NON_SAMPLE_ARGS: tuple[str, ...] = ("batch",)
    transform = Preprocessed()

    def __init__(self, *, batch: dict, seed: int) -> None:
        self.batch = batch
        self.seed = seed

    def source_files(self) -> list[Path]:
        return []

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


def _count(fn, *, backward: bool = True) -> tuple[float, float]:
    """FLOPs of fn() (and the backward of its outputs' sum), and the bytes autograd saves for it."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = fn()
        if backward:
            sum(o.sum() for o in outputs).backward()
    return float(counter.get_total_flops()), float(saved)


def meta_counts(variant: str, image_size: int, images: int, masks: int, passes: int) -> dict[str, float]:
    """GFLOPs of each step's parts and the saved activations (GB) of each step, traced on the meta
    device (nothing is computed). Encoder: forward + backward (full) or forward without a graph
    (frozen). Decoder side: the image prepared once (``prepare_image``), then ``passes`` decoder
    passes, each counted with 3 points and a mask prompt (a click pass), forward + backward; the
    same in all three steps. Saved bytes are an upper bound (a tensor saved twice counts twice)."""
    size, n = image_size, images * masks
    with torch.device("meta"):
        net = build_sam(variant, image_size=image_size)
        x = torch.zeros(images, 3, size, size)
        enc_flops, enc_saved = _count(lambda: net.feature_levels(net.image_encoder(x)))
        with torch.no_grad():
            frozen_flops, _ = _count(lambda: net.feature_levels(net.image_encoder(x)), backward=False)
            features = net.image_encoder(x)
        prep_flops, prep_saved = _count(lambda: net.prepare_image(features).tensors())
        image = net.prepare_image(features)
        points = (torch.zeros(n, 3, 2), torch.ones(n, 3, dtype=torch.long))
        mask_inputs = torch.zeros(n, 1, size // 4, size // 4)
        indices = torch.arange(images).repeat_interleave(masks)
        dec_flops, dec_saved = _count(
            lambda: net.decode_masks(image, points=points, mask_inputs=mask_inputs, image_indices=indices)
        )
    decoder_gflop = (prep_flops + passes * dec_flops) / 1e9
    decoder_gb = (prep_saved + passes * dec_saved) / 1e9
    return {
        "encoder_train_gflop": enc_flops / 1e9,
        "encoder_forward_gflop": frozen_flops / 1e9,
        "decoder_gflop": decoder_gflop,
        "gflop": {
            "full": enc_flops / 1e9 + decoder_gflop,
            "frozen": frozen_flops / 1e9 + decoder_gflop,
            "cached": decoder_gflop,
        },
        "saved_gb": {"full": enc_saved / 1e9 + decoder_gb, "frozen": decoder_gb, "cached": decoder_gb},
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


def measure(args, masks: int, steps: tuple[str, ...], folder: Path) -> dict:
    """Median seconds of each of ``steps``, the time to read one cached item, the cache's MiB per image."""
    batch = synthetic_batch(args.images, masks, args.image_size)
    frozen = make_module(args.variant, args.image_size, ("image_encoder",))
    samples = SyntheticSamples(batch=batch, seed=0)
    ensure_embedding_cache(samples, frozen.net, folder, dtype=args.dtype, batch_size=1)
    cache = CachedEmbeddingDataset(folder)
    rest = {k: v for k, v in batch.items() if k != "image"}

    def cached_batch() -> dict:
        embedding, *finer = (
            torch.stack(level) for level in zip(*map(cache.feature_levels, range(len(cache))), strict=True)
        )
        return {**rest, "image_embedding": embedding, **({"high_res_features": finer} if finer else {})}

    makers = {
        "full": lambda: make_step(make_module(args.variant, args.image_size, ()), lambda: batch),
        "frozen": lambda: make_step(frozen, lambda: batch),
        "cached": lambda: make_step(frozen, cached_batch),
    }
    result = interleaved_medians({name: makers[name]() for name in steps}, args.repeats)
    result["item"] = timed(lambda: cache[0], 5)
    result["disk_mib"] = sum(f.stat().st_size for f in folder.iterdir()) / len(cache) / 2**20
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b is not None else "-"


def seconds(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "not timed"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="vit_b", choices=[*SAM_VARIANTS, *SAM2_VARIANTS])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=1, help="images per batch")
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 2, 16], help="masks per image (K)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed rounds (the steps alternate) after one warm-up step each",
    )
    parser.add_argument("--flops-only", action="store_true", help="only the meta-device counts (seconds)")
    args = parser.parse_args()
    recipe = PromptRecipe()
    passes = 1 + recipe.num_click_passes + recipe.num_mask_only_passes
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, fp32 compute, {args.dtype} cache, "
        f"{available_gb() or 0:.0f} GB available"
    )
    cases = {}
    for masks in args.masks:
        case = f"{args.variant} {args.image_size}px, {args.images} img x {masks} masks, {passes} passes"
        cases[masks] = (case, meta_counts(args.variant, args.image_size, args.images, masks, passes))
    print("\nGFLOP per step, counted on the meta device (forward + backward):\n")
    print(
        "| case | encoder fwd+bwd / fwd | decoder side | full | frozen | cached "
        "| full / cached | **frozen / cached** | full / frozen |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case, c in cases.values():
        g = c["gflop"]
        print(
            f"| {case} | {c['encoder_train_gflop']:.0f} / {c['encoder_forward_gflop']:.0f} "
            f"| {c['decoder_gflop']:.0f} | {g['full']:.0f} | {g['frozen']:.0f} | {g['cached']:.0f} "
            f"| {ratio(g['full'], g['cached'])} | **{ratio(g['frozen'], g['cached'])}** "
            f"| {ratio(g['full'], g['frozen'])} |",
            flush=True,
        )
    if args.flops_only:
        return
    print(
        f"\nSeconds per step (median of {args.repeats} interleaved rounds after a warm-up step each; "
        "a step is timed when its saved activations fit in 80% of the available memory):\n"
    )
    print(
        "| case | saved activations full / frozen / cached (GB) | full (s) | frozen (s) | cached (s) "
        "| full / cached | **frozen / cached** | cached item read (s) | cache per image |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for masks, (case, c) in cases.items():
        free = available_gb()
        steps = tuple(s for s in STEPS if free is None or c["saved_gb"][s] < 0.8 * free)
        saved = " / ".join(f"{c['saved_gb'][s]:.1f}" for s in STEPS)
        r: dict = {}
        if steps:
            with tempfile.TemporaryDirectory() as tmp:
                r = measure(args, masks, steps, Path(tmp) / "cache")
        t = {s: r.get(s) for s in STEPS}
        disk = f"{r['disk_mib']:.2f} MiB" if r else "-"
        print(
            f"| {case} | {saved} | {seconds(t['full'])} | {seconds(t['frozen'])} | {seconds(t['cached'])} "
            f"| {ratio(t['full'], t['cached'])} | **{ratio(t['frozen'], t['cached'])}** "
            f"| {seconds(r.get('item'))} | {disk} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
