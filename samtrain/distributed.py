"""Rank, world size and the sharded-strategy check, in one place.

Rank and world size come from the default ``torch.distributed`` process group, which every
launcher (Lightning's strategies, torchrun) has set up before a loader or a step asks; without
one they are 0 and 1. Nothing here imports Lightning: a strategy is recognised by its class.
"""

from __future__ import annotations

import torch.distributed as dist

# Strategies that shard the model over the ranks (by class name, subclasses included).
SHARDED_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes of the default process group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Waits for every rank (nothing without a process group)."""
    if is_initialized():
        dist.barrier()


def is_sharded(trainer) -> bool:
    """Whether the trainer shards the model over the ranks (FSDP, DeepSpeed, model parallel): then
    every rank must run every forward pass in step, as each gathers weights from all the others."""
    strategy = getattr(trainer, "strategy", None)
    return strategy is not None and any(cls.__name__ in SHARDED_STRATEGIES for cls in type(strategy).__mro__)


def refuse_empty_batch_if_sharded(trainer, stage: str) -> None:
    """RuntimeError for a ``stage`` batch with no readable sample under a sharded strategy: the rank
    cannot run the model's forward with the others, and skipping it would leave them waiting."""
    if is_sharded(trainer):
        raise RuntimeError(
            f"a {stage} batch on rank {rank()} holds no readable sample; under "
            f"{type(trainer.strategy).__name__} every rank must run each forward pass in step, so it "
            "cannot be skipped: repair the data (`samtrain check-data` lists each problem) or train with DDP"
        )
