"""samtrain against the official segment-anything modules: `python -m bench.official [--help]`.

Both models carry identical weights (samtrain's random init, exported with
``export_sam_checkpoint`` and loaded strictly into the official ``Sam``), and the two sides take
turns in every timing round. Three measurements:

1. encoder forward (no grad) on B images;
2. decoder forward + backward for K masks per image, one pass, one positive point per mask
   (multimask output): samtrain runs all B x K masks in one call that reads each mask's image
   embedding by index; the official ``MaskDecoder`` is called once per image, as it is meant to
   be (it repeats that image's embedding for each of the image's prompts);
3. the full training step of SAM's recipe: encoder, first prompt point or box, 8 error-click
   passes and 2 mask-only passes with mask feedback, multimask output for single-point prompts,
   20 * focal + dice on the best output, IoU MSE, backward, AdamW step. samtrain's side is
   ``SamModule.interactive_loss``. The official side is ``simulate_interaction`` with a decode
   callable written the way users fine-tune with the official modules (:class:`OfficialDecoder`): per image and per prompt kind (point-first or box-first
   masks), ``prompt_encoder(points, boxes, masks)`` then ``mask_decoder(image_embeddings=emb[i:i+1],
   ...)``. Both sides use samtrain's prompt sampler and samtrain's loss with the same generators,
   so they draw the same prompts and only the model path differs.

The step is split into data (batch transfer), encoder (forward + backward), decoder loop (the rest),
sampler, loss (forward; its backward is part of the decoder loop) and optimizer. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` over one step; the matmul peak is measured with large
square matmuls on the same device, dtype and threads. Peak memory: ``torch.cuda.max_memory_allocated``
on a GPU; on the CPU, each side runs in a fresh process and reports its peak resident set size.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import multiprocessing
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import samtrain.interactive.simulate as simulate
from bench.common import FunctionClock, proc_status_bytes, synthetic_batch
from bench.mae import time_steps
from bench.run import SAMPLERS
from samtrain.frame import valid_regions
from samtrain.interactive.simulate import Interaction, PromptRecipe, Prompts, simulate_interaction
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam, export_sam_checkpoint
from samtrain.models.sam.prompt_encoder import POSITIVE

SIDES = ("official", "samtrain")
CATEGORIES = ("data", "encoder", "decoder loop", "sampler", "loss", "optimizer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

aten = torch.ops.aten
# FlopCounterMode has no formula for the CPU flash-attention kernels that SDPA runs on the CPU.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v)
    ),
}


@dataclass
class Config:
    variant: str = "vit_b"
    image_size: int = 256
    images: int = 2
    masks: int = 16
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    matmul_sizes: tuple[int, ...] = (2048, 4096)
    isolate_memory: bool = True  # CPU: measure each side's memory and FLOPs in a fresh process
    lr: float = 1e-5

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def sync_fn(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def autocast(cfg: Config):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.device).type, dtype=cfg.torch_dtype)


# ---------------------------------------------------------------------------------------------- models


def load_official():
    """The official segment_anything builders (a test dependency: ``pip install -e .[dev]``)."""
    try:
        from tests.oracle import build_official_sam
    except BaseException as err:  # pytest.importorskip raises a BaseException when it is missing
        raise SystemExit(
            f"bench.official needs the official segment-anything package ({err}); "
            "install the test extras: pip install -e '.[dev]'"
        ) from None
    return build_official_sam


def build_official(variant: str, image_size: int, weights: Path) -> torch.nn.Module:
    """The official Sam at any size, loaded strictly from an official-layout checkpoint."""
    official = load_official()(variant, image_size)
    official.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    official.image_size = image_size  # what SamModule reads from its net
    return official.train()


def build_pair(variant: str, image_size: int, weights: Path | None = None, seed: int = 0):
    """(official Sam, samtrain Sam) with identical weights, in training mode on the CPU: samtrain's
    random init, exported with ``export_sam_checkpoint`` (to ``weights`` when given) and loaded
    strictly into the official model."""
    load_official()
    torch.manual_seed(seed)
    ours = build_sam(variant, image_size=image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_sam_checkpoint(ours, weights if weights is not None else Path(tmp) / "w.pth")
        official = build_official(variant, image_size, path)
    return official, ours.train()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- steps


class Breakdown:
    """Wall time per category of one step. ``sync`` makes the readings the device's."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)

    @contextlib.contextmanager
    def time(self, category: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[category] += time.perf_counter() - start


class EncoderTimer:
    """Times an encoder's forward (hooks) and backward: from the moment the gradient of its output
    is complete (decoder and loss backward done) to the end of ``loss.backward()``."""

    def __init__(self, encoder: torch.nn.Module, sync) -> None:
        self.sync = sync
        self.forward_s = 0.0
        self.backward_start: float | None = None
        self._start = 0.0
        encoder.register_forward_pre_hook(self._pre)
        encoder.register_forward_hook(self._post)

    def _pre(self, module, args):
        self.sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.sync()
        self.forward_s += time.perf_counter() - self._start
        if output.requires_grad:
            output.register_hook(self._grad_ready)

    def _grad_ready(self, grad):
        self.sync()
        self.backward_start = time.perf_counter()

    def take(self, backward_end: float) -> float:
        """Forward + backward seconds since the last take."""
        seconds = self.forward_s + (backward_end - self.backward_start if self.backward_start else 0.0)
        self.forward_s, self.backward_start = 0.0, None
        return seconds


class OfficialDecoder:
    """The decode callable of ``simulate_interaction`` written the way users fine-tune with the
    official modules: per image and prompt kind (point-first or box-first masks),
    ``prompt_encoder(points, boxes, masks)`` then the official ``MaskDecoder.predict_masks`` (all four
    outputs, as ``decode_masks`` returns; its ``forward`` is this and a slice) on ``emb[i:i+1]``,
    which it repeats for each prompt. The masks are grouped at the first call (pass 0 fixes each
    mask's prompt kind)."""

    def __init__(self, sam: torch.nn.Module, embeddings: torch.Tensor, image_indices: torch.Tensor) -> None:
        self.sam = sam
        self.embeddings = embeddings
        self.image_indices = image_indices
        self.calls = None

    def group(self, labels: torch.Tensor):
        """[(image, is point-first, mask indices)] and the inverse permutation of their order."""
        is_point = labels[:, 0] == POSITIVE
        calls = []
        for image in range(self.embeddings.shape[0]):
            for point_kind in (True, False):
                index = torch.nonzero((self.image_indices == image) & (is_point == point_kind)).flatten()
                if len(index):
                    calls.append((image, point_kind, index))
        order = torch.cat([c[2] for c in calls])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return calls, inverse

    def __call__(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        sam = self.sam
        coords, labels = prompts.coords, prompts.labels
        if self.calls is None:
            self.calls = self.group(labels)
        calls, inverse = self.calls
        image_pe = sam.prompt_encoder.get_dense_pe()
        low_res, iou_pred = [], []
        for image, point_kind, index in calls:
            c, lab = coords[index], labels[index]
            if point_kind:  # [point, padding, clicks...]: the official encoder pads at the end itself
                points, boxes = (
                    (torch.cat([c[:, :1], c[:, 2:]], 1), torch.cat([lab[:, :1], lab[:, 2:]], 1)),
                    None,
                )
            else:  # [box corners, clicks...]
                points = (c[:, 2:], lab[:, 2:]) if c.shape[1] > 2 else None
                boxes = c[:, :2].reshape(-1, 4)
            masks = None if prompts.mask_input is None else prompts.mask_input[index]
            sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
            low, iou = sam.mask_decoder.predict_masks(
                image_embeddings=self.embeddings[image : image + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
            )
            low_res.append(low)
            iou_pred.append(iou)
        return torch.cat(low_res)[inverse], torch.cat(iou_pred)[inverse]


def official_interaction(sam: torch.nn.Module, batch: dict, *, seed: int = 0, step: int = 0) -> Interaction:
    """SAM's recipe (``simulate_interaction``: sampler, schedule, feedback, loss) through the official
    modules, with exactly the arguments ``SamModule.interactive_loss`` passes for this batch."""
    image_indices = batch["mask_image_index"]
    embeddings = sam.image_encoder(batch["image"])  # the batch's images are normalised and padded
    return simulate_interaction(
        OfficialDecoder(sam, embeddings, image_indices),
        batch["masks"],
        valid=valid_regions(batch["input_size"], sam.image_encoder.img_size)[image_indices],
        mask_keys=SamModule.batch_mask_keys(batch),
        seed=seed,
        step=step,
    )


class StepRunner:
    """One side's full training step (``interactive_loss``, backward, AdamW), with its breakdown
    recorded per call. The sampler and the loss are timed where ``samtrain.interactive.simulate`` calls them."""

    def __init__(self, side: str, net: torch.nn.Module, batch: dict, cfg: Config) -> None:
        self.device = torch.device(cfg.device)
        self.cfg = cfg
        self.sync = sync_fn(self.device)
        self.batch_host = batch
        self.net = net.to(self.device)
        self.side = side
        self.module = SamModule(net=self.net, optimizer=functools.partial(torch.optim.AdamW)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr)
        self.encoder_timer = EncoderTimer(self.net.image_encoder, self.sync)
        self.records: list[dict[str, float]] = []
        self.losses: list[float] = []

    def __call__(self) -> None:
        clock = Breakdown(self.sync)
        self.sync()
        start = time.perf_counter()
        with clock.time("data"):
            batch = to_device(self.batch_host, self.device)
        sampler = FunctionClock(simulate, SAMPLERS, self.sync)
        loss_clock = FunctionClock(simulate, ("sam_loss",), self.sync)
        with sampler.installed(), loss_clock.installed(), autocast(self.cfg):
            if self.side == "official":
                loss = official_interaction(self.net, batch).loss
            else:
                loss, _ = self.module.interactive_loss(batch)
        clock.seconds["sampler"] += sampler.seconds
        clock.seconds["loss"] += loss_clock.seconds
        loss.backward()
        self.sync()
        backward_end = time.perf_counter()
        clock.seconds["encoder"] += self.encoder_timer.take(backward_end)
        with clock.time("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        total = time.perf_counter() - start
        clock.seconds["decoder loop"] = total - sum(
            v for k, v in clock.seconds.items() if k != "decoder loop"
        )
        self.records.append({**clock.seconds, "total": total})
        self.losses.append(loss.item())


# ---------------------------------------------------------------------------------------------- pieces


def time_encoder(nets: dict, images: torch.Tensor, cfg: Config) -> dict[str, float]:
    sync = sync_fn(images.device)

    def run(net):
        with torch.no_grad(), autocast(cfg):
            net.image_encoder(images)
        sync()

    return time_steps(
        {k: functools.partial(run, v) for k, v in nets.items()}, warmup=cfg.warmup, iters=cfg.repeats
    )


def time_decoder(nets: dict, embeddings: torch.Tensor, batch: dict, cfg: Config) -> dict[str, float]:
    """Decoder forward + backward, one pass, one positive point per mask, multimask output."""
    sync = sync_fn(embeddings.device)
    gt, image_of_mask = batch["masks"], batch["mask_image_index"]
    points = gt.flatten(1).float().argmax(1)  # a pixel inside each mask (its first)
    coords = torch.stack([points % gt.shape[-1], points // gt.shape[-1]], -1).float()[:, None]
    labels = torch.ones_like(coords[..., 0], dtype=torch.long)
    per_image = [torch.nonzero(image_of_mask == i).flatten() for i in range(embeddings.shape[0])]

    def official(sam):
        total = 0.0
        with autocast(cfg):
            for image, index in enumerate(per_image):
                sparse, dense = sam.prompt_encoder(
                    points=(coords[index], labels[index]), boxes=None, masks=None
                )
                low_res, iou_pred = sam.mask_decoder(
                    image_embeddings=embeddings[image : image + 1],
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=True,
                )
                total = total + low_res.float().mean() + iou_pred.float().mean()
        total.backward()
        sam.zero_grad(set_to_none=True)
        sync()

    def ours(sam):
        with autocast(cfg):
            low_res, iou_pred = sam.decode_masks(
                embeddings, points=(coords, labels), image_indices=image_of_mask
            )
            total = low_res[:, 1:].float().mean() + iou_pred[:, 1:].float().mean()
        total.backward()
        sam.zero_grad(set_to_none=True)
        sync()

    fns = {
        "official": functools.partial(official, nets["official"]),
        "samtrain": functools.partial(ours, nets["samtrain"]),
    }
    return time_steps(fns, warmup=cfg.warmup, iters=cfg.repeats)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=(2048, 4096), repeats: int = 3) -> float:
    """Best FLOP/s of square matmuls on the device in dtype, with the current threads."""
    sync = sync_fn(device)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def make_runner(side: str, net, batch, cfg: Config) -> StepRunner:
    return StepRunner(side, net, batch, cfg)


def count_flops(runner: StepRunner) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        runner()
    runner.records.pop()
    return counter.get_total_flops()


# The operators whose FLOPs FlopCounterMode counts: matmuls, attention kernels, convolutions.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
MATMUL_OP_PREFIXES = (
    "aten::_scaled_dot_product",
    "aten::_flash_attention",
    "aten::_efficient_attention",
    "aten::mkldnn_convolution",
    "aten::cudnn_convolution",
    "aten::convolution_backward",
)


def matmul_kernel_profile(runner: StepRunner) -> tuple[float, int]:
    """Seconds one profiled step spends inside matmul, attention and convolution kernels (their
    own time; device time on a GPU), and how many such kernel calls it made. Nearly all the step's
    FLOPs are theirs, so FLOPs over this time is the fraction of peak the step would reach if
    everything else took no time."""
    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        runner()
    runner.records.pop()
    kernels = [e for e in prof.key_averages() if e.key in MATMUL_OPS or e.key.startswith(MATMUL_OP_PREFIXES)]
    micros = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in kernels)
    return micros / 1e6, sum(e.count for e in kernels)


def memory_and_flops(runner: StepRunner) -> dict:
    """FLOPs of one step (the first, which also creates the AdamW state) and the peak memory of
    two steps: CUDA max_memory_allocated, or on the CPU this process's peak RSS."""
    device = runner.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = proc_status_bytes("VmRSS")
    flops = count_flops(runner)
    runner()
    runner.records.pop()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = {"peak_bytes": torch.cuda.max_memory_allocated(device), "memory": "cuda"}
    else:
        peak = {"peak_bytes": proc_status_bytes("VmHWM"), "rss_before_step": rss_before, "memory": "rss"}
    matmul_s, matmul_calls = matmul_kernel_profile(runner)
    return {"flops": flops, **peak, "matmul_s": matmul_s, "matmul_calls": matmul_calls}


def _isolated_side(side: str, weights: str, cfg: Config, threads: int) -> dict:
    """Run in a fresh process: one side's FLOPs and peak RSS."""
    torch.set_num_threads(threads)
    if side == "official":
        net = build_official(cfg.variant, cfg.image_size, Path(weights))
    else:
        net = build_sam(cfg.variant, image_size=cfg.image_size, checkpoint=weights).train()
    batch = synthetic_batch(cfg.images, cfg.masks, cfg.image_size)
    return memory_and_flops(make_runner(side, net, batch, cfg))


# ---------------------------------------------------------------------------------------------- run


@dataclass
class Results:
    cfg: Config
    threads: int
    passes: int
    n_masks: int
    encoder_s: dict[str, float]
    decoder_s: dict[str, float]
    step_s: dict[str, float]
    breakdown: dict[str, dict[str, float]]
    memory: dict[str, dict]
    matmul_peak: float
    matmul_peak_dtype: float | None
    losses: dict[str, float] = field(default_factory=dict)


def run(cfg: Config) -> Results:
    device = torch.device(cfg.device)
    sync = sync_fn(device)
    threads = torch.get_num_threads()
    batch = synthetic_batch(cfg.images, cfg.masks, cfg.image_size)
    passes = 1 + PromptRecipe().num_click_passes + PromptRecipe().num_mask_only_passes

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        official, ours = build_pair(cfg.variant, cfg.image_size, weights)
        nets = {"official": official.to(device), "samtrain": ours.to(device)}
        images = batch["image"].to(device)
        encoder_s = time_encoder(nets, images, cfg)
        with torch.no_grad():
            embeddings = ours.image_encoder(images)
        decoder_s = time_decoder(nets, embeddings, to_device(batch, device), cfg)

        runners = {side: make_runner(side, nets[side], batch, cfg) for side in SIDES}
        step_s = time_steps(runners, warmup=cfg.warmup, iters=cfg.repeats)
        if device.type == "cuda":  # the breakdown above synchronised; the step times come from clean runs
            for runner in runners.values():
                runner.sync = lambda: None
                runner.encoder_timer.sync = lambda: None
            step_s = time_steps(runners, warmup=0, iters=cfg.repeats)
            for runner in runners.values():
                del runner.records[-cfg.repeats :]
        breakdown = {}
        for side, runner in runners.items():
            records = runner.records[cfg.warmup :]
            breakdown[side] = {k: statistics.mean(r[k] for r in records) for k in (*CATEGORIES, "total")}
        losses = {side: runner.losses[0] for side, runner in runners.items()}

        if cfg.isolate_memory and device.type == "cpu":
            del runners, nets, official, ours
            memory = {}
            ctx = multiprocessing.get_context("spawn")
            for side in SIDES:
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    memory[side] = pool.submit(_isolated_side, side, str(weights), cfg, threads).result()
        else:
            memory = {side: memory_and_flops(runner) for side, runner in runners.items()}
    sync()
    peak = matmul_peak(device, torch.float32, cfg.matmul_sizes)
    peak_dtype = matmul_peak(device, cfg.torch_dtype, cfg.matmul_sizes) if cfg.dtype != "fp32" else None
    return Results(
        cfg=cfg,
        threads=threads,
        passes=passes,
        n_masks=batch["masks"].shape[0],
        encoder_s=encoder_s,
        decoder_s=decoder_s,
        step_s=step_s,
        breakdown=breakdown,
        memory=memory,
        matmul_peak=peak,
        matmul_peak_dtype=peak_dtype,
        losses=losses,
    )


def machine(cfg: Config, threads: int) -> str:
    if cfg.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(cfg.device))}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {threads} threads, torch {torch.__version__}"


def report(r: Results) -> str:
    cfg = r.cfg
    mp = r.n_masks * r.passes
    o, s = "official", "samtrain"
    lines = [
        f"samtrain vs official segment-anything: {cfg.variant} at {cfg.image_size} px, {cfg.images} images x "
        f"{cfg.masks} masks, {r.passes} passes, {cfg.dtype}, {cfg.device}; {machine(cfg, r.threads)}; "
        f"median of {cfg.repeats} interleaved rounds after {cfg.warmup} warm-up",
        "Official side: the official modules driven per image and prompt kind; both sides use samtrain's "
        "prompt sampler and loss (same draws), so only the model path differs.",
        "",
        "| measurement | official | samtrain | samtrain speed-up |",
        "|---|---:|---:|---:|",
    ]
    rows = [
        ("encoder forward (s)", r.encoder_s),
        (f"decoder fwd+bwd, {r.n_masks} masks, 1 pass (s)", r.decoder_s),
        ("full training step (s)", r.step_s),
    ]
    for name, t in rows:
        lines.append(f"| {name} | {t[o]:.3f} | {t[s]:.3f} | {t[o] / t[s]:.2f}x |")
    lines.append(
        f"| full step: masks x passes / s | {mp / r.step_s[o]:.1f} | {mp / r.step_s[s]:.1f} "
        f"| {r.step_s[o] / r.step_s[s]:.2f}x |"
    )
    lines += ["", "Step breakdown (mean s per step, share of the instrumented step):", ""]
    lines += ["| part | official | samtrain |", "|---|---:|---:|"]
    for k in CATEGORIES:
        b_o, b_s = r.breakdown[o], r.breakdown[s]
        lines.append(
            f"| {k} | {b_o[k]:.3f} ({b_o[k] / b_o['total']:.1%}) | {b_s[k]:.3f} ({b_s[k] / b_s['total']:.1%}) |"
        )
    lines += ["", "| resources per step | official | samtrain |", "|---|---:|---:|"]
    mem_kind = r.memory[o]["memory"]
    if mem_kind == "cuda":
        label = "peak memory (max_memory_allocated, GiB)"
    else:
        label = "peak RSS of a fresh process per side (GiB)" if cfg.isolate_memory else "peak RSS (GiB)"
    lines.append(
        f"| {label} | {r.memory[o]['peak_bytes'] / 2**30:.2f} | {r.memory[s]['peak_bytes'] / 2**30:.2f} |"
    )
    if mem_kind == "rss":
        lines.append(
            "| of which resident before the first step (models, data) | "
            f"{r.memory[o]['rss_before_step'] / 2**30:.2f} | {r.memory[s]['rss_before_step'] / 2**30:.2f} |"
        )
    lines.append(
        f"| FLOPs (FlopCounterMode, G) | {r.memory[o]['flops'] / 1e9:.1f} | {r.memory[s]['flops'] / 1e9:.1f} |"
    )
    achieved = {k: r.memory[k]["flops"] / r.step_s[k] for k in SIDES}
    lines.append(f"| achieved GFLOP/s | {achieved[o] / 1e9:.1f} | {achieved[s] / 1e9:.1f} |")
    lines.append(
        f"| of the fp32 matmul peak ({r.matmul_peak / 1e9:.1f} GFLOP/s) | {achieved[o] / r.matmul_peak:.1%} "
        f"| {achieved[s] / r.matmul_peak:.1%} |"
    )
    if r.matmul_peak_dtype:
        lines.append(
            f"| of the {cfg.dtype} matmul peak ({r.matmul_peak_dtype / 1e9:.1f} GFLOP/s) "
            f"| {achieved[o] / r.matmul_peak_dtype:.1%} | {achieved[s] / r.matmul_peak_dtype:.1%} |"
        )
    kernel_s = {k: r.memory[k]["matmul_s"] for k in SIDES}
    peak = r.matmul_peak_dtype or r.matmul_peak
    lines.append(
        "| time in matmul, attention and convolution kernels (profiled step, s) "
        f"| {kernel_s[o]:.3f} | {kernel_s[s]:.3f} |"
    )
    lines.append(
        "| FLOPs / that time, of the peak: the ceiling were all other work free "
        f"| {r.memory[o]['flops'] / kernel_s[o] / peak:.1%} | {r.memory[s]['flops'] / kernel_s[s] / peak:.1%} |"
    )
    lines += [
        "",
        f"First step's loss: official {r.losses[o]:.6f}, samtrain {r.losses[s]:.6f} "
        "(same weights, draws and prompt tokens: the two model paths compute the same step).",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.official",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--variant", default="vit_b", choices=["vit_t", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--masks", type=int, default=16, help="masks per image (K)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each side once per round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (fp32: none)")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="CPU: measure memory and FLOPs in this process, not a fresh one",
    )
    a = parser.parse_args(argv)
    return Config(
        variant=a.variant,
        image_size=a.image_size,
        images=a.images,
        masks=a.masks,
        repeats=a.repeats,
        warmup=a.warmup,
        device=a.device,
        dtype=a.dtype,
        matmul_sizes=tuple(a.matmul_sizes),
        isolate_memory=not a.no_isolate,
    )


def main(argv: list[str] | None = None) -> Results:
    cfg = parse_args(argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    start = time.perf_counter()
    results = run(cfg)
    print(report(results))
    print(f"\n(benchmark wall time {time.perf_counter() - start:.0f} s; config {asdict(cfg)})", flush=True)
    return results


if __name__ == "__main__":
    main()
