"""Peak memory and time of one training step per memory mode: `python -m bench.memory`.

One step is SamModule.interactive_loss (encoder once, 1 + 8 + 2 decoder passes over every mask)
+ backward + AdamW step, on a synthetic batch (vit_b at 256 px, 2 images x 16 masks by default).
Time: one fresh subprocess runs ``--repeats`` rounds of one step per mode (plain, encoder /
decoder / both checkpointed, per-pass decoder backward), the modes interleaved on one module after
a warm-up step; the median per mode. Memory: a fresh subprocess per mode, one warm-up step (so
AdamW's state exists), then one step measured:

- tensor peak: resident tensors at the step's start (parameters, AdamW state) plus the most
  bytes of tensor storage that the step itself held alive at once. A TorchDispatchMode sees
  every op of the forward, the backward (recomputation included) and the optimizer, counts each
  new output storage once and subtracts it when the storage is freed (a weakref callback).
  Exact for tensors; kernels' own scratch buffers are not tensors and are not seen.
- RSS: the process's peak resident set during the step over its RSS at the start (Linux: VmHWM
  after resetting it through /proc/self/clear_refs), with glibc's mmap threshold fixed at 64 KiB
  so that freed tensors go back to the system. A cross-check; includes allocator overheads.
- on a GPU: torch.cuda.max_memory_allocated over the step (resident included).
- the planner (``samtrain plan``, samtrain.lightning.memory_plan): the same count made on fake
  tensors in this process, beside the measurement (``planner / measured``).

Besides the checkpointing switches (timed and measured), the modes that train less are measured
too: frozen encoder, cached embeddings (the batch carries the encoder's output), LoRA (rank 8 on
qkv, with encoder checkpointing). ``--bf16`` runs the forward under bf16 autocast (bf16-mixed).

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from bench.common import proc_status_bytes, synthetic_batch
from samtrain.interactive.simulate import PromptRecipe
from samtrain.lightning.memory_plan import StoragePeak, plan_step, storage_bytes
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam

MODES = {
    "plain": {},
    "encoder ckpt": {"encoder_checkpointing": True},
    "decoder ckpt": {"decoder_checkpointing": True},
    "both": {"encoder_checkpointing": True, "decoder_checkpointing": True},
    "per-pass backward": {"decoder_backward_per_pass": True},
    "encoder ckpt + per-pass": {"encoder_checkpointing": True, "decoder_backward_per_pass": True},
    "frozen encoder": {"freeze": ["image_encoder"]},
    "cached embeddings": {"freeze": ["image_encoder"]},
    "LoRA": {"encoder_checkpointing": True},
}
TIMED_MODES = tuple(MODES)[:6]  # the switches that change time only, not what trains
LORA = {"rank": 8, "alpha": 16, "targets": ["qkv"], "dropout": 0.0}
GIB = 2**30


def recipe(args: argparse.Namespace) -> PromptRecipe:
    return PromptRecipe(num_click_passes=args.click_passes, num_mask_only_passes=args.mask_only_passes)


def net_kwargs(mode: str) -> dict:
    return {"lora": LORA} if mode == "LoRA" else {}


def cached(mode: str) -> bool:
    return mode == "cached embeddings"


def resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of parameters, buffers, gradients and optimizer state."""
    tensors = [*module.parameters(), *module.buffers(), *(p.grad for p in module.parameters())]
    tensors += [v for state in optimizer.state.values() for v in state.values()]
    return storage_bytes(tensors)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def setup_step(args: argparse.Namespace, mode: str):
    """A SamModule in the given mode and a function running one full training step (warmed up)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    module = SamModule(
        net=build_sam(args.variant, image_size=args.image_size, **net_kwargs(mode)),
        optimizer=torch.optim.AdamW,
        prompts=recipe(args),
        **MODES[mode],
    ).to(device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    batch = {k: v.to(device) for k, v in synthetic_batch(args.images, args.masks, args.image_size).items()}
    if cached(mode):
        with torch.no_grad():
            batch["image_embedding"] = module.net.image_encoder(batch.pop("image"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = module.interactive_loss(batch)
        loss.backward()
        optimizer.step()
        sync()

    step()  # warm-up: AdamW's state, allocator and kernel caches
    optimizer.zero_grad(set_to_none=True)
    return module, optimizer, step


def plan_memory(args: argparse.Namespace, mode: str) -> dict:
    """The planner's prediction for the same step (samtrain.lightning.memory_plan, fake tensors)."""

    def make_module(net):
        return SamModule(
            net=net, optimizer=partial(torch.optim.AdamW, lr=1e-5), prompts=recipe(args), **MODES[mode]
        )

    memory = plan_step(
        lambda: build_sam(args.variant, image_size=args.image_size, **net_kwargs(mode)),
        make_module,
        images=args.images,
        masks_per_image=args.masks,
        image_size=args.image_size,
        cached_embeddings=cached(mode),
        precision="bf16-mixed" if args.bf16 else "32-true",
    )
    return {"planned_resident": memory.resident, "planned_step_peak": memory.step_peak}


def set_mode(module: SamModule, mode: str) -> None:
    switches = MODES[mode]
    module.net.image_encoder.set_grad_checkpointing(switches.get("encoder_checkpointing", False))
    module.decoder_checkpointing = switches.get("decoder_checkpointing", False)
    module.decoder_backward_per_pass = switches.get("decoder_backward_per_pass", False)


def measure_time(args: argparse.Namespace) -> dict[str, float]:
    """Median step seconds of each mode that only switches checkpointing (``TIMED_MODES``), the modes
    interleaved on one module so that the machine's drift hits them alike."""
    module, _, step = setup_step(args, "plain")
    modes = [m for m in args.modes if m in TIMED_MODES]
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            set_mode(module, mode)
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t) for mode, t in times.items()}


def measure_memory(args: argparse.Namespace, mode: str) -> dict:
    """Resident bytes at a step's start and the step's own peak (see the module docstring)."""
    module, optimizer, step = setup_step(args, mode)
    result = {"resident": resident_bytes(module, optimizer)}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        step()
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    rss_start = proc_status_bytes("VmRSS")
    rss_ok = reset_peak_rss() and rss_start is not None
    with StoragePeak() as tracker:
        step()
    result["step_peak"] = tracker.peak
    if rss_ok:
        result["rss_peak_over_start"] = proc_status_bytes("VmHWM") - rss_start
    return result


def measure_memory_all(args: argparse.Namespace) -> dict[str, dict]:
    """``measure_memory`` of every mode one after the other in this process (what a test can afford;
    the table measures each mode in a fresh process)."""
    results = {}
    for mode in args.modes:
        results[mode] = measure_memory(args, mode)
        gc.collect()
    return results


def run_worker(args: argparse.Namespace, worker: str, env: dict[str, str] | None = None):
    """Run ``--worker time``, ``--worker MODE`` or ``--worker memory`` (every mode, one process) in a
    fresh subprocess; its JSON result."""
    command = [sys.executable, "-m", "bench.memory", "--worker", worker, *worker_args(args)]
    done = subprocess.run(
        command, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"worker {worker!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Only the memory runs fix glibc's mmap threshold: an mmap and fresh zeroed pages for every tensor
# would slow a step several times over.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def worker_args(args: argparse.Namespace) -> list[str]:
    return [
        f"--variant={args.variant}",
        f"--image-size={args.image_size}",
        f"--images={args.images}",
        f"--masks={args.masks}",
        f"--repeats={args.repeats}",
        f"--device={args.device}",
        "--modes",
        *args.modes,
        *([f"--threads={args.threads}"] if args.threads else []),
        *(["--bf16"] if args.bf16 else []),
        f"--click-passes={args.click_passes}",
        f"--mask-only-passes={args.mask_only_passes}",
    ]


HEADER = (
    "| mode | step (s) | time vs plain | peak (GiB) | peak vs plain | step's own tensors (GiB) "
    "| RSS peak over start (GiB) | planner: peak (GiB) | planner / measured |\n|---|---|---|---|---|---|---|---|---|"
)


def row(mode: str, r: dict, plain: dict, gpu: bool) -> str:
    """One Markdown row; peak = CUDA's peak allocation, or resident + the step's own tensor peak."""

    def total(m: dict) -> int:
        return m["cuda_peak"] if gpu else m["resident"] + m["step_peak"]

    rss = r.get("rss_peak_over_start")
    step_s, plain_s = r.get("step_s"), plain.get("step_s")
    timing = (
        "| n/a | n/a " if step_s is None or not plain_s else f"| {step_s:.2f} | {step_s / plain_s - 1:+.0%} "
    )
    planned = r["planned_resident"] + r["planned_step_peak"]
    return (
        f"| {mode} {timing}"
        f"| {total(r) / GIB:.2f} | {total(r) / total(plain) - 1:+.0%} | {r['step_peak'] / GIB:.2f} "
        f"| {'n/a' if rss is None else f'{rss / GIB:.2f}'} | {planned / GIB:.2f} | {planned / total(r):.3f} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="vit_b")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--masks", type=int, default=16, help="masks per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--click-passes", type=int, default=8, help="decoder passes that add a click")
    parser.add_argument("--mask-only-passes", type=int, default=2, help="decoder passes that add none")
    parser.add_argument("--bf16", action="store_true", help="the forward under bf16 autocast (bf16-mixed)")
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--worker", choices=["time", "memory", *MODES], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker == "time":
            result = measure_time(args)
        elif args.worker == "memory":
            result = measure_memory_all(args)
        else:
            result = measure_memory(args, args.worker)
        print(json.dumps(result))
        return
    gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine())
    print(
        f"{args.variant} {args.image_size}px, {args.images} img x {args.masks} masks, 1 + 8 + 2 passes; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, {'bf16-mixed' if args.bf16 else 'fp32'}; "
        f"peak = {'torch.cuda.max_memory_allocated' if gpu else 'resident tensors + the step own tensor peak'}"
    )
    times = {} if args.no_time else run_worker(args, "time")
    results = {
        mode: {**run_worker(args, mode, MEMORY_ENV), **plan_memory(args, mode), "step_s": times.get(mode)}
        for mode in args.modes
    }
    if args.no_time:
        results = {mode: {k: v for k, v in r.items() if k != "step_s"} for mode, r in results.items()}
    print(HEADER)
    reference = results.get("plain") or next(
        iter(results.values())
    )  # "vs plain": vs the first mode without plain
    print("\n".join(row(mode, r, reference, gpu) for mode, r in results.items()))


if __name__ == "__main__":
    main()
