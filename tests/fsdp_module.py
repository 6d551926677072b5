"""A SamModule sharded with FSDP2's ``fully_shard`` in ``configure_model``, as Lightning's
ModelParallelStrategy requires (tests: the 2-process CPU FSDP run)."""

from __future__ import annotations

from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from samtrain.lightning.sam_module import SamModule

# Methods the training step calls instead of ``forward``: FSDP2 gathers the unit's weights around
# them too once registered.
FORWARD_METHODS = {"prompt_encoder": ("get_dense_pe",), "mask_decoder": ("prepare_image", "decode")}


class FullyShardedSamModule(SamModule):
    """FSDP2 units: each image-encoder block, then the image encoder, the prompt encoder and the
    mask decoder (the training step calls each of these directly, never ``Sam.forward``)."""

    def configure_model(self) -> None:
        if isinstance(self.net.image_encoder, FSDPModule):
            return  # Lightning calls this hook for every fit and validate
        mesh = self.device_mesh["data_parallel"]
        for block in self.net.image_encoder.blocks:  # SAM's ViT blocks or SAM 2.1's Hiera blocks
            fully_shard(block, mesh=mesh)
        for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
            part = getattr(self.net, name)
            fully_shard(part, mesh=mesh)
            for method in FORWARD_METHODS.get(name, ()):
                register_fsdp_forward_method(part, method)
