"""The official sam2 package as a test oracle: SAM 2.1 models of any trunk shape, built from the
official configs with Hydra overrides (samtrain never imports sam2)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sam2")
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from samtrain.models.sam2.build import HIERA_SPECS

CONFIGS = {
    "sam2.1_hiera_n": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
# What the official build_sam2 adds for image prediction (apply_postprocessing=True).
POSTPROCESSING = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]


@contextlib.contextmanager
def sam2_hydra():
    """sam2's own Hydra config module, initialised for the block (sam2 does so at import, and other
    tests may have cleared or replaced it); the previous Hydra state is restored afterwards."""
    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sam2", version_base="1.2"):
            yield
    finally:
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def overrides(variant: str, image_size: int) -> list[str]:
    """Hydra overrides that give the official config samtrain's trunk spec and image size."""
    spec = HIERA_SPECS[variant]
    trunk = "model.image_encoder.trunk"

    def seq(values) -> str:
        return "[" + ",".join(str(v) for v in values) + "]"

    return [
        f"++model.image_size={image_size}",
        f"{trunk}.embed_dim={spec.embed_dim}",
        f"{trunk}.num_heads={spec.num_heads}",
        f"{trunk}.stages={seq(spec.stages)}",
        f"{trunk}.global_att_blocks={seq(spec.global_att_blocks)}",
        f"++{trunk}.window_spec={seq(spec.window_spec)}",
        f"++{trunk}.window_pos_embed_bkg_spatial_size={seq(spec.global_pos_size)}",
        f"model.image_encoder.neck.backbone_channel_list={seq(spec.channels)}",
        *POSTPROCESSING,
    ]


def build_official_sam2(variant: str, image_size: int) -> nn.Module:
    """The official SAM2Base (image and video parts) with samtrain's variant spec, in eval mode."""
    with sam2_hydra():
        cfg = compose(config_name=CONFIGS[variant], overrides=overrides(variant, image_size))
        return instantiate(cfg.model, _recursive_=True).eval()


def official_build_sam2(variant: str, image_size: int, checkpoint: Path) -> nn.Module:
    """The official ``build_sam2`` (a strict ``load_state_dict`` of ``checkpoint``'s "model")."""
    from sam2.build_sam import build_sam2

    with sam2_hydra():
        return build_sam2(
            CONFIGS[variant],
            ckpt_path=str(checkpoint),
            device="cpu",
            hydra_overrides_extra=overrides(variant, image_size)[: -len(POSTPROCESSING)],
        )


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every floating-point parameter so none sits at its init (zero position embeddings,
    unit norms, zero no_mem_embed) and all of them matter."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.named_parameters():
        scale = 0.5 if "pos_embed" in name else 0.05
        tensor.add_(torch.randn(tensor.shape, generator=gen) * scale)
    return model


def official_and_samtrain(variant: str, image_size: int, directory: Path, seed: int = 0):
    """An official model with randomised weights, its checkpoint, and a samtrain Sam2 loaded from it."""
    from samtrain.models import build_sam

    torch.manual_seed(seed)
    official = randomise(build_official_sam2(variant, image_size), seed=seed)
    path = directory / "official.pt"
    torch.save({"model": official.state_dict()}, path)
    return official, path, build_sam(variant, image_size=image_size, checkpoint=path).eval()
