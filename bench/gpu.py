"""What only a GPU can measure, in one run: `bash bench/gpu.sh` (or `python -m bench.gpu`).

Sections, each a subprocess with its own time limit (the whole run stays under 8 minutes on one
H100-class GPU), their output gathered into one Markdown file for BENCHMARKS.md:

1. samtrain against the official modules, the bf16 1024 px K=64 training step of vit_b
   (``bench.official --device cuda --dtype bf16``);
2. ``torch.cuda.max_memory_allocated`` per memory mode beside the planner's prediction
   (``bench.memory --device cuda --bf16 --no-time``) for vit_b, and for vit_h in the modes it needs;
3. the ``Sam.compile_parts`` (torch.compile) speed-up of the training step;
4. evaluation throughput: ``evaluate_batch`` (20-click curve and box protocol) in objects per second.

``--tiny`` (or ``SAMTRAIN_GPU_BENCH_TINY=1``) runs every section on the CPU with the tiny model at
64 px, so the script is tested where no GPU is lent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import synthetic_batch
from samtrain.interactive.protocols import evaluate_batch
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam

TINY_ENV = "SAMTRAIN_GPU_BENCH_TINY"


@dataclass(frozen=True)
class Sizes:
    device: str
    image_size: int
    masks: int
    repeats: int
    small: str  # the variant of the full comparison
    large: str  # the variant measured in the lean modes only
    large_masks: int
    timeout_s: int  # per section
    large_modes: tuple[str, ...] = ()
    small_modes: tuple[str, ...] = ()  # bench.memory's modes for the small variant


# vit_h at 1024 px, K=64, bf16 does not fit in plain mode (samtrain plan): the modes it needs. Each
# mode is a fresh process (~30 s with the planner's trace), so the run stays under 8 minutes.
LARGE_MODES = ("per-pass backward", "encoder ckpt + per-pass", "cached embeddings")
SMALL_MODES = ("plain", "per-pass backward", "encoder ckpt + per-pass", "decoder ckpt", "LoRA")
GPU = Sizes("cuda", 1024, 64, 3, "vit_b", "vit_h", 64, 170, large_modes=LARGE_MODES, small_modes=SMALL_MODES)
TINY = Sizes(
    "cpu",
    64,
    2,
    1,
    "vit_t",
    "vit_t",
    2,
    300,
    large_modes=("cached embeddings",),
    small_modes=("plain", "per-pass backward"),
)


def sections(s: Sizes) -> list[tuple[str, list[str]]]:
    """(title, command) of each subprocess section."""
    py = [sys.executable, "-m"]
    common = [f"--device={s.device}", f"--image-size={s.image_size}", "--images=1"]
    official = [
        *py,
        "bench.official",
        *common,
        f"--variant={s.small}",
        f"--masks={s.masks}",
        f"--repeats={s.repeats}",
    ]
    if s.device == "cuda":
        official.append("--dtype=bf16")
    else:
        official += ["--warmup=0", "--matmul-sizes", "128", "--no-isolate"]
    memory = [*py, "bench.memory", *common, "--bf16", "--no-time"]
    return [
        (f"samtrain vs official modules, {s.small} {s.image_size} px, K={s.masks}", official),
        (
            f"memory per mode, {s.small}: measured vs planned",
            [*memory, f"--variant={s.small}", f"--masks={s.masks}", "--modes", *s.small_modes],
        ),
        (
            f"memory per mode, {s.large}: measured vs planned",
            [*memory, f"--variant={s.large}", f"--masks={s.large_masks}", "--modes", *s.large_modes],
        ),
        (
            "compile speed-up and evaluation throughput",
            [*py, "bench.gpu", "--worker", *(["--tiny"] if s.device == "cpu" else [])],
        ),
    ]


def run_section(title: str, command: list[str], timeout_s: int) -> str:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        body = (
            done.stdout.strip()
            if done.returncode == 0
            else f"failed (exit {done.returncode}):\n```\n{done.stderr[-3000:]}\n```"
        )
    except subprocess.TimeoutExpired:
        body = f"timed out after {timeout_s} s"
    took = time.perf_counter() - start
    return f"### {title}\n\n`{' '.join(command[1:])}` ({took:.0f} s)\n\n{body}\n"


def step_seconds(module: SamModule, batch: dict, repeats: int, sync) -> float:
    """Median seconds of a bf16-autocast training step (interactive_loss + backward + AdamW)."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    device = batch["masks"].device.type
    times = []
    for i in range(repeats + 2):  # two warm-up steps (compilation happens there)
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = module.interactive_loss(batch)
        loss.backward()
        optimizer.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_and_eval(s: Sizes) -> str:
    """The compile speed-up of the training step and the evaluation throughput, as Markdown rows."""
    device = torch.device(s.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = {k: v.to(device) for k, v in synthetic_batch(1, s.masks, s.image_size).items()}
    module = SamModule(net=build_sam(s.small, image_size=s.image_size), optimizer=torch.optim.AdamW)
    module = module.to(device)
    module.decoder_backward_per_pass = True
    eager = step_seconds(module, batch, s.repeats, sync)
    # The tiny CPU run checks the path with a backend that needs no C++ compiler (seconds, not minutes).
    module.net.compile_parts(**({"backend": "aot_eager"} if device.type == "cpu" else {}))
    compiled = step_seconds(module, batch, s.repeats, sync)
    module.net.eval()
    objects, start = 0, time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(s.repeats):
            out = evaluate_batch(module.net, batch, max_clicks=20)
            objects += out["ious"].shape[0]
    sync()
    eval_s = time.perf_counter() - start
    return "\n".join(
        [
            f"{s.small} {s.image_size} px, 1 image x {s.masks} masks, bf16 autocast, per-pass backward; {device}",
            "",
            "| measure | value |",
            "|---|---|",
            f"| training step, eager (s) | {eager:.3f} |",
            f"| training step, compile_parts (s) | {compiled:.3f} |",
            f"| compile speed-up | {eager / compiled:.2f}x |",
            f"| evaluation, 20 clicks + box (objects / s) | {objects / eval_s:.1f} |",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=bool(os.environ.get(TINY_ENV)),
        help=f"the tiny model on the CPU (also ${TINY_ENV}=1)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_gpu.md"), help="the Markdown file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    sizes = TINY if args.tiny else GPU
    if args.worker:
        print(compile_and_eval(sizes))
        return None
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit(f"bench/gpu.sh: no GPU here; --tiny (or {TINY_ENV}=1) runs it on the CPU")
    where = torch.cuda.get_device_name() if sizes.device == "cuda" else "CPU (tiny config)"
    parts = [f"# bench/gpu.sh on {where}, torch {torch.__version__}\n"]
    for title, command in sections(sizes):
        parts.append(run_section(title, command, sizes.timeout_s))
        print(parts[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    print(f"written: {args.out}")
    return args.out


if __name__ == "__main__":
    main()
