"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a SAM or a SAM 2.1: the units and the methods
that gather their weights.

Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp2``) ``SamModule.configure_model`` calls
:func:`fully_shard_sam` on each rank's mesh. The units are each image-encoder block (SAM's ViT
blocks, SAM 2.1's Hiera blocks), then the rest of the image encoder, the prompt encoder and the
mask decoder. The training step calls methods of the last two in place of ``forward``; they are
registered so that FSDP2 gathers the unit's weights around them as well.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

FORWARD_METHODS = {"prompt_encoder": ("get_dense_pe",), "mask_decoder": ("prepare_image", "decode")}
UNITS = ("image_encoder", "prompt_encoder", "mask_decoder")


def fully_shard_sam(net: nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``net`` (a Sam or Sam2) in place over ``mesh``; a second call does nothing."""
    if is_fully_sharded(net):
        return
    for block in net.image_encoder.blocks:
        fully_shard(block, mesh=mesh)
    for name in UNITS:
        part = getattr(net, name)
        fully_shard(part, mesh=mesh)
        for method in FORWARD_METHODS.get(name, ()):
            register_fsdp_forward_method(part, method)


def is_fully_sharded(net: nn.Module) -> bool:
    return isinstance(net.image_encoder, FSDPModule)


def gathered_state(net: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a net sharded by :func:`fully_shard_sam`, plain CPU tensors on rank zero
    (empty on the others), for the exports; None for a net that is not sharded. A collective:
    every rank must call it."""
    if not is_fully_sharded(net):
        return None
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
