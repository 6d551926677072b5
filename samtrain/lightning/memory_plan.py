"""The memory of one training step, counted op by op on fake tensors: no weights, no compute.

:func:`plan_step` builds a :class:`SamModule` whose parameters, buffers, optimiser state and batch
are ``FakeTensorMode`` tensors (shapes, dtypes and storages, no data), runs one real training step
on them (``interactive_loss`` under the configured autocast, backward, optimiser step) and counts,
with :class:`StoragePeak`, every tensor storage each op creates and when it is freed. The count is
the one ``bench.memory`` makes on real tensors, so the two agree to the byte where the ops agree.

What a fake trace cannot know is decided like this: structural random draws (those made with an
explicit ``torch.Generator``: the click schedule, the ground-truth-prompt coin) run on real tensors,
as do the ops on their results; everything else is fake. The CUDA caching allocator's rounding and
kernels' scratch buffers are not tensors and are not counted (``bench/gpu.sh`` measures them).

Per device under data parallelism (:func:`distributed_peaks`): DDP adds its gradient buckets (one
more copy of the trainable parameters' gradients unless ``gradient_as_bucket_view``); FSDP
(FULL_SHARD, one unit per encoder block) divides parameters, gradients and optimiser state by the
world size and adds back the units it gathers: the root unit (every parameter outside the blocks),
two blocks (the running one and the prefetched one) and one block's unsharded gradients.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from samtrain.lightning.sam_module import SamModule

# Lightning's precision names -> the autocast dtype of the forward pass (None: no autocast) and the
# dtype the parameters are kept in.
PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype]] = {
    "32-true": (None, torch.float32),
    "32": (None, torch.float32),
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
}  # SamModule refuses half-precision weights (bf16-true, 16-true)
PRIM_DEVICE = torch.ops.prim.device.default


@dataclass
class Allocation:
    """One tensor storage created during the step: its bytes and the op indices it lived between."""

    nbytes: int
    born: int
    died: int | None = None  # None: still alive at the end of the step
    kind: str = "activation"  # "activation" (anything transient) or "grad" (ends up as a .grad)


class StoragePeak(TorchDispatchMode):
    """The peak bytes of tensor storage alive at once among the storages that ops create while the
    mode is active, and every such storage's lifetime (:attr:`allocations`, in op indices).

    Each new output storage is counted once and subtracted when it is freed (a weakref callback);
    outputs that share an input's storage (views, in-place ops) are not new. Works on real and on
    fake tensors alike. With ``fake_mode`` (the planner's), ops whose tensor inputs are all real and
    structural draws (an explicit ``torch.Generator`` argument, no fake input) run on real tensors,
    so that the step's control flow can read them (``.tolist()``, ``bool()``).
    """

    def __init__(self, fake_mode: FakeTensorMode | None = None) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.seen = WeakIdKeyDictionary()
        self.allocations: list[Allocation] = []
        self.ops = 0
        self.current = 0
        self.peak = 0
        self.peak_op = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is PRIM_DEVICE:  # the autograd engine asks every fake tensor its device: nothing to count
            return func(*args, **kwargs)
        self.ops += 1
        if self.fake_mode is not None and runs_real(args, kwargs):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _is_dense(t)}
        for t in tree_leaves(out):
            if _is_dense(t):
                storage = t.untyped_storage()
                if id(storage) not in inputs and storage not in self.seen:
                    self._add(storage)
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        record = Allocation(nbytes=storage.nbytes(), born=self.ops)
        self.seen[storage] = record
        self.allocations.append(record)
        weakref.finalize(storage, partial(self._free, record))
        self.current += record.nbytes
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, self.ops

    def _free(self, record: Allocation) -> None:
        record.died = self.ops
        self.current -= record.nbytes

    def mark_grads(self, params) -> None:
        """Mark the storages of the parameters' ``.grad`` created during the step as gradients."""
        for p in params:
            if p.grad is not None and p.grad.untyped_storage() in self.seen:
                self.seen[p.grad.untyped_storage()].kind = "grad"

    def scaled_peak(self, scale: dict[str, float]) -> float:
        """The peak of the timeline with each kind's bytes multiplied by ``scale[kind]`` (default 1)."""
        events: list[tuple[int, int, float]] = []  # (op, 0 = alloc / 1 = free, bytes)
        for a in self.allocations:
            size = a.nbytes * scale.get(a.kind, 1.0)
            events.append((a.born, 0, size))
            if a.died is not None:
                events.append((a.died, 1, -size))
        current = peak = 0.0
        for _, _, size in sorted(events):
            current += size
            peak = max(peak, current)
        return peak

    def alive_at_peak(self, kind: str) -> int:
        """Bytes of the given kind alive at the (unscaled) peak."""
        return sum(
            a.nbytes
            for a in self.allocations
            if a.kind == kind and a.born <= self.peak_op and (a.died is None or a.died > self.peak_op)
        )


def runs_real(args, kwargs) -> bool:
    """Whether an op of a fake trace runs on real tensors: all its tensor inputs are real, or it has
    none and draws from an explicit generator (a structural draw)."""
    leaves = tree_leaves((args, kwargs))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if tensors:
        return not any(isinstance(t, FakeTensor) for t in tensors)
    return any(isinstance(x, torch.Generator) for x in leaves)


def _is_dense(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (None and meta tensors skipped)."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors if _is_dense(t)}
    return sum(storages.values())


@dataclass
class StepMemory:
    """One training step's memory, in bytes. ``peak`` = ``resident`` + ``step_peak``."""

    parameters: int  # parameters and buffers
    optimizer_state: int
    trainable_parameters: int  # bytes of the parameters that train (their gradients' size)
    step_peak: int  # the most bytes the step's own tensors held at once (activations, grads, ...)
    grads_at_peak: int  # of which gradients
    ops: int  # aten ops traced
    fsdp_step_peak: dict[int, float] = field(default_factory=dict)  # world size -> sharded step peak
    gathered_units: int = 0  # FSDP: the root unit + 2 blocks + 1 block's gradients, unsharded

    @property
    def resident(self) -> int:
        return self.parameters + self.optimizer_state

    @property
    def peak(self) -> int:
        return self.resident + self.step_peak

    def ddp_peak(self, gradient_as_bucket_view: bool = False) -> int:
        """Per device under DDP: the buckets hold one more copy of the gradients unless they are views."""
        return self.peak + (0 if gradient_as_bucket_view else self.trainable_parameters)

    def fsdp_peak(self, world_size: int) -> float:
        """Per device under FSDP FULL_SHARD over ``world_size`` ranks (see the module docstring)."""
        sharded = self.resident / world_size + self.fsdp_step_peak[world_size]
        return sharded + self.gathered_units * (1 - 1 / world_size)


def fake_module(module: nn.Module, fake_mode: FakeTensorMode) -> nn.Module:
    """Replace, in place, every parameter and buffer of a (meta) module by a fake CPU tensor of its
    shape and dtype (parameters keep ``requires_grad``)."""
    with fake_mode:
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    fake = torch.empty(p.shape, dtype=p.dtype)
                    sub._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return module


def synthetic_batch_shapes(
    net: nn.Module, *, images: int, masks_per_image: int, image_size: int, cached_embeddings: bool
) -> dict[str, torch.Tensor]:
    """A batch of the collate's keys and shapes, made by the current tensor mode (fake in the planner):
    image (B, 3, S, S) or the cached features of ``net`` (image_embedding (B, 256, S/16, S/16) and,
    for SAM 2.1, high_res_features), masks (B*K, S, S) bool, mask_image_index (B*K,),
    input_size (B, 2), image_id (B,)."""
    n = images * masks_per_image
    batch = {
        "masks": torch.zeros(n, image_size, image_size, dtype=torch.bool),
        "mask_image_index": torch.arange(images).repeat_interleave(masks_per_image),
        "input_size": torch.full((images, 2), image_size),
        "image_id": torch.arange(images),
    }
    image = torch.zeros(images, 3, image_size, image_size)
    if not cached_embeddings:
        return {**batch, "image": image}
    with torch.no_grad():  # the shapes only: under the planner's fake mode this costs nothing
        levels = [level.float() for level in net.feature_levels(net.image_encoder(image))]
    batch["image_embedding"] = levels[0]
    if len(levels) > 1:
        batch["high_res_features"] = levels[1:]
    return batch


def build_optimizer(module: SamModule) -> torch.optim.Optimizer:
    """The optimizer ``SamModule.configure_optimizers`` builds (without its scheduler)."""
    return module.optimizer_factory(params=module.param_groups())


def init_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One step on zero gradients, so the optimiser's state exists as at any step after the first."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_step(
    module: SamModule, optimizer: torch.optim.Optimizer, batch: dict, autocast: torch.dtype | None
) -> None:
    """One training step as Lightning runs it: the forward under autocast, backward, optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        loss, _ = module.interactive_loss(batch)
    loss.backward()
    optimizer.step()


def measure_step(
    module: SamModule,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    *,
    autocast: torch.dtype | None = None,
    fake_mode: FakeTensorMode | None = None,
    world_sizes: tuple[int, ...] = (),
) -> StepMemory:
    """Count one step's memory (the optimiser's state must already exist); real or fake tensors."""
    params = list(module.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        tracker = stack.enter_context(StoragePeak(fake_mode))
        run_step(module, optimizer, batch, autocast)
        tracker.mark_grads(params)
    units = gathered_unit_bytes(module)
    return StepMemory(
        parameters=storage_bytes([*params, *module.buffers()]),
        optimizer_state=storage_bytes(state),
        trainable_parameters=storage_bytes([p for p in params if p.requires_grad]),
        step_peak=tracker.peak,
        grads_at_peak=tracker.alive_at_peak("grad"),
        ops=tracker.ops,
        fsdp_step_peak={w: tracker.scaled_peak({"grad": 1 / w}) for w in world_sizes},
        gathered_units=units,
    )


def gathered_unit_bytes(module: SamModule) -> int:
    """FSDP's unsharded bytes at a time: the root unit (parameters outside the encoder blocks), two
    blocks' parameters (running and prefetched) and one block's gradients. The units are the image
    encoder's ``blocks`` (SAM's ViT blocks, SAM 2.1's Hiera blocks), as conf/trainer/fsdp.yaml wraps
    them and :func:`samtrain.lightning.sharding.fully_shard_sam` shards them."""
    blocks = list(module.net.image_encoder.blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = storage_bytes([p for p in module.net.parameters() if id(p) not in in_blocks])
    block = max((storage_bytes(list(b.parameters())) for b in blocks), default=0)
    block_grads = max(
        (storage_bytes([p for p in b.parameters() if p.requires_grad]) for b in blocks), default=0
    )
    return root + 2 * block + block_grads


@contextlib.contextmanager
def fake_step(
    build_net: Callable[[], nn.Module],
    make_module: Callable[[nn.Module], SamModule],
    *,
    images: int,
    masks_per_image: int,
    image_size: int,
    cached_embeddings: bool,
    precision: str = "32-true",
) -> Iterator[tuple[SamModule, torch.optim.Optimizer, dict, FakeTensorMode, torch.dtype | None]]:
    """A SamModule made by ``make_module(net)`` around a net that ``build_net()`` builds on the meta
    device (it must load no weights), made fake; its optimiser with its state; a fake batch: everything
    :func:`measure_step` needs, with no real memory."""
    autocast, param_dtype = precision_dtypes(precision)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.device("meta"):
        net = build_net()
    module = fake_module(make_module(net), fake_mode)
    with fake_mode:
        if param_dtype != torch.float32:
            module.to(param_dtype)
        module.train()
        optimizer = build_optimizer(module)
        init_optimizer_state(module, optimizer)
        batch = synthetic_batch_shapes(
            module.net,
            images=images,
            masks_per_image=masks_per_image,
            image_size=image_size,
            cached_embeddings=cached_embeddings,
        )
    yield module, optimizer, batch, fake_mode, autocast


def precision_dtypes(precision: str | int) -> tuple[torch.dtype | None, torch.dtype]:
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r}: samtrain trains (and the planner plans) {sorted(PRECISIONS)}"
        )
    return PRECISIONS[key]


def plan_step(
    build_net: Callable[[], nn.Module],
    make_module: Callable[[nn.Module], SamModule],
    *,
    images: int,
    masks_per_image: int,
    image_size: int,
    cached_embeddings: bool = False,
    precision: str = "32-true",
    world_sizes: tuple[int, ...] = (),
) -> StepMemory:
    """The memory of one training step of ``make_module(build_net())``, traced on fake tensors
    (see :func:`fake_step`)."""
    with fake_step(
        build_net,
        make_module,
        images=images,
        masks_per_image=masks_per_image,
        image_size=image_size,
        cached_embeddings=cached_embeddings,
        precision=precision,
    ) as (module, optimizer, batch, fake_mode, autocast):
        return measure_step(
            module, optimizer, batch, autocast=autocast, fake_mode=fake_mode, world_sizes=world_sizes
        )
