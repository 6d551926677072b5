"""``samtrain plan``: the peak memory of one training step per memory mode, traced on fake tensors.

::

    samtrain plan model=sam_vit_h trainer=gpu                 # the peak of each mode, per device
    samtrain plan model=sam_vit_h trainer=gpu --memory 24GiB  # and the fastest configuration that fits
    samtrain plan ... --json                                  # the same as JSON
    samtrain plan --table                                     # vit_b/l/h x 16/24/40/80 GiB cards

The arguments other than the options below are Hydra overrides of the training config
(conf/train.yaml), as for ``samtrain train``. The batch shapes come from it: images per device
(``data.batch_size``), masks per image (``data.train_dataset.transform.max_masks``), the image size
(``model.net.image_size``), the precision (``trainer.precision``) and the model's switches. No
weights are loaded and nothing is computed (see :mod:`samtrain.lightning.memory_plan`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from samtrain.commands.config import config_dir
from samtrain.lightning.memory_plan import StepMemory, plan_step

GIB = 2**30
CARDS_GIB = (16, 24, 40, 80)
TABLE_VARIANTS = ("vit_b", "vit_l", "vit_h")
LORA = "{rank:8,alpha:16,targets:[qkv],dropout:0.0}"
CACHE_CALLBACK = (
    "+callbacks.embedding_cache={_target_:samtrain.lightning.callbacks.EmbeddingCache,"
    "dir:'${paths.log_dir}/embedding_cache/${task_name}'}"
)
SWITCHES = ("encoder_checkpointing", "decoder_checkpointing", "decoder_backward_per_pass")


@dataclass(frozen=True)
class Mode:
    """A memory mode: its switches, the overrides that select it and its measured time cost
    (``bench.memory``, BENCHMARKS.md "Activation checkpointing": step time over plain)."""

    name: str
    switches: dict = field(default_factory=dict)  # SamModule keyword arguments
    time_cost: float = 0.0
    full_finetuning: bool = True  # False: trains less than the whole model
    freeze_encoder: bool = False
    cached_embeddings: bool = False
    lora: bool = False

    def settings(self) -> tuple:
        """What the trace depends on (two modes with equal settings trace the same step)."""
        switches = tuple(bool(self.switches.get(k, False)) for k in SWITCHES)
        return switches, self.freeze_encoder, self.cached_embeddings, self.lora

    def overrides(self) -> list[str]:
        out = [f"model.{k}={str(self.switches.get(k, False)).lower()}" for k in SWITCHES]
        if self.freeze_encoder:
            out.append("model.freeze=[image_encoder]")
        if self.lora:
            out.append(f"model.net.lora={LORA}")
        if self.cached_embeddings:
            out += [
                "data.train_dataset.transform.train=false",
                "callbacks.prediction_gallery=null",
                CACHE_CALLBACK,
            ]
        return out


PER_PASS = {"decoder_backward_per_pass": True}
ENCODER = {"encoder_checkpointing": True}
# Full fine-tuning modes, fastest first (bench.memory, vit_b 256 px: per-pass -2%, encoder ckpt +
# per-pass +11%, encoder ckpt +14%, decoder ckpt +21%, both +30%).
MODES = (
    Mode("plain"),
    Mode("per-pass backward", PER_PASS, 0.0),
    Mode("encoder ckpt + per-pass", {**ENCODER, **PER_PASS}, 0.11),
    Mode("encoder ckpt", ENCODER, 0.14),
    Mode("decoder ckpt", {"decoder_checkpointing": True}, 0.21),
    Mode("both ckpt", {**ENCODER, "decoder_checkpointing": True}, 0.30),
    Mode("frozen encoder + per-pass", PER_PASS, full_finetuning=False, freeze_encoder=True),
    Mode(
        "cached embeddings + per-pass",
        PER_PASS,
        full_finetuning=False,
        freeze_encoder=True,
        cached_embeddings=True,
    ),
    Mode("LoRA + encoder ckpt + per-pass", {**ENCODER, **PER_PASS}, 0.11, full_finetuning=False, lora=True),
)
FULL_MODES = tuple(m for m in MODES if m.full_finetuning)
MODE_NAMES = tuple(m.name for m in MODES)


@dataclass(frozen=True)
class Shape:
    """The batch shape per device: images, masks per image, image size."""

    images: int
    masks: int
    image_size: int

    def overrides(self) -> list[str]:
        return [f"data.batch_size={self.images}", f"data.train_dataset.transform.max_masks={self.masks}"]


@dataclass
class Setup:
    """What the composed config says about a run: the model, the shape, the precision, the strategy."""

    cfg: DictConfig
    shape: Shape
    precision: str
    strategy: str  # single | ddp | fsdp
    world_size: int
    gradient_as_bucket_view: bool = False


def compose_train_config(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def read_setup(cfg: DictConfig, world_size: int | None = None) -> Setup:
    """The shapes, precision and strategy of a composed training config. ``world_size`` defaults to
    ``trainer.devices * trainer.num_nodes`` when those are numbers, else 8."""
    transform = OmegaConf.select(cfg, "data.train_dataset.transform") or {}
    images = int(cfg.data.batch_size)
    target = str(
        OmegaConf.select(cfg, "trainer.strategy._target_") or OmegaConf.select(cfg, "trainer.strategy") or ""
    )
    sharded = any(name in target.upper() for name in ("FSDP", "MODELPARALLEL"))  # FSDP1, FSDP2
    strategy = "fsdp" if sharded else "ddp" if "DDP" in target.upper() else "single"
    if world_size is None:
        devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
        world_size = int(devices) * int(nodes) if isinstance(devices, int) else 8
    global_batch = cfg.data.get("global_batch_size")
    if global_batch:
        images = max(1, int(global_batch) // world_size)
    return Setup(
        cfg=cfg,
        shape=Shape(
            images=images, masks=int(transform.get("max_masks", 64)), image_size=int(cfg.model.net.image_size)
        ),
        precision=str(cfg.trainer.precision),
        strategy=strategy,
        world_size=world_size,
        gradient_as_bucket_view=bool(
            OmegaConf.select(cfg, "trainer.strategy.gradient_as_bucket_view") or False
        ),
    )


def configured_mode(cfg: DictConfig) -> Mode:
    """The mode the config itself selects."""
    freeze = list(cfg.model.get("freeze") or [])
    return Mode(
        "configured",
        {k: bool(cfg.model.get(k, False)) for k in SWITCHES},
        freeze_encoder="image_encoder" in freeze,
        cached_embeddings="embedding_cache" in (cfg.get("callbacks") or {}),
        lora=bool(cfg.model.net.get("lora")),
    )


def plan_mode(setup: Setup, mode: Mode, shape: Shape | None = None) -> StepMemory:
    """Trace one step of the configured SamModule in ``mode`` at ``shape`` (default: the config's)."""
    shape = shape or setup.shape
    model_cfg = setup.cfg.model
    net_cfg = OmegaConf.merge(model_cfg.net, {"checkpoint": None, "encoder_init": None})
    if mode.lora and not net_cfg.get("lora"):
        net_cfg.lora = OmegaConf.create(LORA.replace(":", ": "))
    net_cfg.image_size = shape.image_size
    freeze = [p for p in (model_cfg.get("freeze") or []) if not (mode.lora and p == "image_encoder")]
    if mode.freeze_encoder and "image_encoder" not in freeze:
        freeze.append("image_encoder")
    switches = (
        {k: bool(mode.switches.get(k, False)) for k in SWITCHES}
        if mode.name != "configured"
        else mode.switches
    )

    def make_module(net):
        return hydra.utils.instantiate(model_cfg, net=net, freeze=freeze, compile=False, **switches)

    return plan_step(
        lambda: hydra.utils.instantiate(net_cfg),
        make_module,
        images=shape.images,
        masks_per_image=shape.masks,
        image_size=shape.image_size,
        cached_embeddings=mode.cached_embeddings,
        precision=setup.precision,
        world_sizes=(setup.world_size,) if setup.strategy == "fsdp" else (),
    )


def plan_modes(
    setup: Setup, modes: Sequence[Mode], shape: Shape | None = None, *, jobs: int | None = None
) -> dict[str, StepMemory]:
    """:func:`plan_mode` of each mode, ``jobs`` traces at a time (default: one per CPU core).

    A trace is single-threaded Python dispatch, so modes run in parallel processes, forked from a
    fresh server that has imported the planner once (no fork of a process that computed).
    Modes with the same settings as an earlier one are traced once."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(modes)))
    distinct: dict[tuple, Mode] = {}
    for mode in modes:
        distinct.setdefault(mode.settings(), mode)
    if jobs == 1 or len(distinct) == 1:
        traced = {key: plan_mode(setup, mode, shape) for key, mode in distinct.items()}
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(max_workers=min(jobs, len(distinct)), mp_context=context) as pool:
            futures = {key: pool.submit(plan_mode, setup, mode, shape) for key, mode in distinct.items()}
            traced = {key: future.result() for key, future in futures.items()}
    return {mode.name: traced[mode.settings()] for mode in modes}


def device_peak(setup: Setup, memory: StepMemory) -> float:
    """Bytes per device under the configured strategy."""
    if setup.strategy == "ddp":
        return memory.ddp_peak(setup.gradient_as_bucket_view)
    if setup.strategy == "fsdp":
        return memory.fsdp_peak(setup.world_size)
    return memory.peak


def mode_record(setup: Setup, mode: Mode, memory: StepMemory, shape: Shape | None = None) -> dict:
    shape = shape or setup.shape
    record = {
        "name": mode.name,
        "overrides": mode.overrides() + (shape.overrides() if shape != setup.shape else []),
        "peak_bytes": int(device_peak(setup, memory)),
        "single_device_peak_bytes": memory.peak,
        "ddp_peak_bytes": memory.ddp_peak(setup.gradient_as_bucket_view),
        "parameter_bytes": memory.parameters,
        "optimizer_state_bytes": memory.optimizer_state,
        "gradient_bytes": memory.trainable_parameters,
        "step_peak_bytes": memory.step_peak,
        "time_cost": mode.time_cost,
        "full_finetuning": mode.full_finetuning,
        "images": shape.images,
        "masks_per_image": shape.masks,
    }
    if setup.strategy == "fsdp":
        record["fsdp_peak_bytes"] = int(memory.fsdp_peak(setup.world_size))
    return record


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB' (10**9), '24G' (GiB), '512MiB', a plain number of bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB)")
    number, prefix, binary = match.groups()
    power = "KMGT".find(prefix.upper()) + 1 if prefix else 0
    decimal = text.strip().upper().endswith("B") and not binary
    return int(float(number) * ((1000 if decimal else 1024) ** power))


def smaller_shapes(shape: Shape, min_masks: int = 8) -> list[Shape]:
    """The shapes to try when nothing fits, most work per step first: one image per device (the rest
    by gradient accumulation), then half the masks per image, down to ``min_masks``."""
    shapes = [shape]
    if shape.images > 1:
        shapes.append(Shape(1, shape.masks, shape.image_size))
    masks = shape.masks
    while masks // 2 >= min_masks:
        masks //= 2
        shapes.append(Shape(1, masks, shape.image_size))
    return shapes


def allowed(setup: Setup, mode: Mode) -> bool:
    """Whether SamModule accepts the mode under the configured run: per-pass backward works neither
    with FSDP nor with fp16 mixed precision (its gradients would bypass the scaler); cached
    embeddings do not run under FSDP (they train the decoder side only, which needs no sharding)."""
    per_pass = mode.switches.get("decoder_backward_per_pass", False)
    if mode.cached_embeddings and setup.strategy == "fsdp":
        return False
    return not (per_pass and (setup.strategy == "fsdp" or setup.precision == "16-mixed"))


def fastest_fit(
    setup: Setup, budget: float, traced: dict[str, StepMemory], *, jobs: int | None = None
) -> dict | None:
    """The fastest full fine-tuning configuration whose peak fits ``budget`` bytes: the modes in
    order of time cost at the configured shape, then at :func:`smaller_shapes`. The leanest mode
    decides whether a shape can fit at all, so a shape that cannot costs one trace; in a shape that
    can, the modes are traced in order, a round of ``jobs`` at a time (see :func:`plan_modes`)."""
    modes = [m for m in FULL_MODES if allowed(setup, m)]
    leanest = next(m for m in modes if m.name in ("encoder ckpt + per-pass", "both ckpt"))
    for shape in smaller_shapes(setup.shape):
        cache = traced if shape == setup.shape else {}
        if leanest.name not in cache:
            cache[leanest.name] = plan_mode(setup, leanest, shape)
        if device_peak(setup, cache[leanest.name]) > budget:
            continue
        for i, mode in enumerate(modes):
            if mode.name not in cache:  # this one and the next untraced ones, a round of jobs
                ahead = [m for m in modes[i:] if m.name not in cache][: jobs or os.cpu_count() or 1]
                cache.update(plan_modes(setup, ahead, shape, jobs=jobs))
            if device_peak(setup, cache[mode.name]) <= budget:
                record = mode_record(setup, mode, cache[mode.name], shape)
                if shape.images < setup.shape.images:
                    record["overrides"].append(f"trainer.accumulate_grad_batches={setup.shape.images}")
                return record
    return None


def format_table(setup: Setup, records: list[dict]) -> str:
    s = setup.shape
    where = {
        "single": "one device",
        "ddp": f"per device, DDP x {setup.world_size}",
        "fsdp": f"per device, FSDP x {setup.world_size}",
    }[setup.strategy]
    lines = [
        f"{setup.cfg.model.net.variant} {s.image_size}px, {s.images} image(s) x {s.masks} masks per device, "
        f"{setup.precision}; predicted peak tensor memory {where} (traced on fake tensors)",
        "| mode | peak (GiB) | params + optimiser (GiB) | step's own (GiB) | time vs plain | overrides |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['peak_bytes'] / GIB:.2f} "
            f"| {(r['parameter_bytes'] + r['optimizer_state_bytes']) / GIB:.2f} | {r['step_peak_bytes'] / GIB:.2f} "
            f"| {'+' if r['time_cost'] >= 0 else ''}{r['time_cost']:.0%} | `{' '.join(r['overrides'])}` |"
        )
    return "\n".join(lines)


def card_table(
    overrides: Sequence[str], world_size: int | None, headroom: float, *, jobs: int | None = None
) -> str:
    """What fits on which card for full fine-tuning (vit_b/l/h x 16/24/40/80 GiB), predicted."""
    lines = [
        "| model | " + " | ".join(f"{c} GiB" for c in CARDS_GIB) + " |",
        "|---|" + "---|" * len(CARDS_GIB),
    ]
    for variant in TABLE_VARIANTS:
        setup = read_setup(compose_train_config([f"model=sam_{variant}", *overrides]), world_size)
        traced: dict[str, StepMemory] = {}
        cells = []
        for card in CARDS_GIB:
            fit = fastest_fit(setup, card * GIB * (1 - headroom), traced, jobs=jobs)
            cells.append("does not fit" if fit is None else fit_cell(setup, fit))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_cell(setup: Setup, fit: dict) -> str:
    shape = (
        ""
        if fit["masks_per_image"] == setup.shape.masks and fit["images"] == setup.shape.images
        else (f", {fit['images']} img x {fit['masks_per_image']} masks")
    )
    return f"{fit['name']}{shape} ({fit['peak_bytes'] / GIB:.1f} GiB)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtrain plan",
        description="Predict the peak memory per device of one training step per memory mode, traced on "
        "fake tensors (no weights, no compute). The other arguments are Hydra overrides of the training "
        "config (e.g. model=sam_vit_h trainer=gpu data.batch_size=1).",
    )
    parser.add_argument("--memory", type=parse_bytes, help="device memory, e.g. 24GiB: print the fastest fit")
    parser.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="share of --memory kept free for what is not a tensor (CUDA context, allocator) (default 0.1)",
    )
    parser.add_argument(
        "--world-size", type=int, help="ranks for DDP/FSDP (default: trainer.devices x num_nodes, or 8)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODE_NAMES,
        help="plan only these modes (default: the configured one and all)",
    )
    parser.add_argument(
        "--jobs", type=int, help="modes traced at a time, each in a process (default: one per CPU core)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--table", action="store_true", help="vit_b/l/h x 16/24/40/80 GiB cards, full fine-tuning"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args, overrides = build_parser().parse_known_args(list(argv))
    if args.table:
        print(card_table(overrides, args.world_size, args.headroom, jobs=args.jobs))
        return 0
    setup = read_setup(compose_train_config(overrides), args.world_size)
    modes = (
        [configured_mode(setup.cfg), *MODES]
        if args.modes is None
        else [m for m in MODES if m.name in args.modes]
    )
    modes = [m for m in modes if allowed(setup, m)]
    if setup.cfg.model.net.get("lora"):  # SamModule refuses to freeze an encoder that has LoRA layers
        modes = [m for m in modes if not m.freeze_encoder]
    traced = plan_modes(setup, modes, jobs=args.jobs)
    records = [mode_record(setup, m, traced[m.name]) for m in modes]
    result: dict = {"modes": records}
    if args.memory is not None:
        budget = args.memory * (1 - args.headroom)
        result["memory_bytes"], result["budget_bytes"] = args.memory, int(budget)
        result["fits"] = fastest_fit(setup, budget, traced, jobs=args.jobs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_table(setup, records))
    if args.memory is not None:
        print(format_fit(result["fits"], args.memory, budget))
    return 0


def format_fit(fit: dict | None, memory: int, budget: float) -> str:
    head = f"\n{memory / GIB:.1f} GiB ({budget / GIB:.1f} GiB for tensors):"
    if fit is None:
        return f"{head} no full fine-tuning configuration fits; see the frozen, cached and LoRA modes above"
    return (
        f"{head} {fit['name']}, {fit['peak_bytes'] / GIB:.2f} GiB predicted\n  {' '.join(fit['overrides'])}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
