"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a SAM or a SAM 2.1: the units and the methods
that gather their weights.

Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp2``) ``SamModule.configure_model`` calls
:func:`fully_shard_sam` on each rank's mesh. The units are each image-encoder block (SAM's ViT
blocks, SAM 2.1's Hiera blocks), then the rest of the image encoder, the prompt encoder and the
mask decoder. The training step calls methods of the last two in place of ``forward``; they are
registered so that FSDP2 gathers the unit's weights around them as well.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

FORWARD_METHODS = {"prompt_encoder": ("get_dense_pe",), "mask_decoder": ("prepare_image", "decode")}
UNITS = ("image_encoder", "prompt_encoder", "mask_decoder")


def fully_shard_sam(net: nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``net`` (a Sam or Sam2) in place over ``mesh``; a second call does nothing."""
    if isinstance(net.image_encoder, FSDPModule):
        return
    for block in net.image_encoder.blocks:
        fully_shard(block, mesh=mesh)
    for name in UNITS:
        part = getattr(net, name)
        fully_shard(part, mesh=mesh)
        for method in FORWARD_METHODS.get(name, ()):
            register_fsdp_forward_method(part, method)
