"""MAE encoder weights -> SAM's image encoder (timm samvit).

The MAE encoder is a plain timm ViT; SAM's encoder is timm's samvit, whose blocks carry the
same tensors under the same names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1/fc2``) plus relative-position tables. So: blocks map one to one, the patch embedding
maps, the absolute position embedding (1, [1 +] L, C) loses its class token and is resampled to
samvit's (1, h, w, C) grid, relative-position tables start at zero and the neck keeps its fresh
initialisation. Accepted sources: samtrain's MAE (``MaskedAutoencoder`` state, a Lightning
checkpoint of ``MaeModule``, or the ``mae_encoder.safetensors`` that ``pretrain_mae.py`` writes),
timm's own MAE ViT weights (``vit_base_patch16_224.mae`` layout) and this module's own output.

Console: ``python -m samtrain.models.mae_transfer MAE_CKPT OUT.safetensors --variant vit_b
--image-size 1024`` writes the converted encoder (keys ``image_encoder.*``; loadable with
``build_sam(checkpoint=OUT, strict=False)``) and prints the report.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from samtrain.models.checkpoint import key_list_line, read_state_dict, strip_prefixes, write_state_dict
from samtrain.models.sam.image_encoder import ENCODER_SPECS, build_image_encoder

# Prefixes in front of the encoder's keys: MaeModule/MaskedAutoencoder, this module's output.
_ENCODER_PREFIXES = ("encoder.", "image_encoder.")
_REL_POS = re.compile(r"^blocks\.\d+\.attn\.rel_pos_[hw]$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class TransferReport:
    """What ``mae_to_sam_encoder`` did, by image-encoder key."""

    source: str = ""
    mapped: list[str] = field(default_factory=list)  # copied unchanged
    resampled: list[str] = field(default_factory=list)  # the position embedding
    zeroed: list[str] = field(default_factory=list)  # relative-position tables
    fresh: list[str] = field(default_factory=list)  # left as initialised (the neck)
    ignored: list[str] = field(default_factory=list)  # source keys with no place in samvit

    def __str__(self) -> str:
        lines = [
            f"MAE -> SAM encoder{' from ' + self.source if self.source else ''}: "
            f"{len(self.mapped)} mapped, {len(self.resampled)} resampled, {len(self.zeroed)} zeroed, "
            f"{len(self.fresh)} fresh, {len(self.ignored)} source keys ignored"
        ]
        for name in ("resampled", "zeroed", "fresh", "ignored"):
            keys = getattr(self, name)
            if keys:
                lines.append(key_list_line(name, keys))
        return "\n".join(lines)


def encoder_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder's tensors in timm layout (``blocks.N...``, ``pos_embed``, ...) from any accepted
    source; returns them and the keys that belong to something else (decoder, head, ...).
    Wrapper prefixes (``module.``, ``model.``, ``net.``, ``_orig_mod.``) are stripped first."""
    state = {strip_prefixes(k): v for k, v in state.items()}
    for prefix in _ENCODER_PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in state):
            inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            return inner, sorted(k for k in state if not k.startswith(prefix))
    if any(k.startswith("blocks.") for k in state):
        return dict(state), []
    raise ValueError(
        f"no ViT encoder blocks found (expected keys like 'blocks.0.attn.qkv.weight', optionally under "
        f"{_ENCODER_PREFIXES}); first keys: {list(state)[:5]}"
    )


def _pos_embed_to_nhwc(pos: torch.Tensor) -> torch.Tensor:
    """(1, [prefix +] h*w, C) or (1, h, w, C) -> (1, h, w, C), dropping class/prefix tokens."""
    if pos.ndim == 4:
        return pos
    if pos.ndim != 3:
        raise ValueError(f"position embedding of unexpected shape {tuple(pos.shape)}")
    num_tokens = pos.shape[1]
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:  # class (and register) tokens first
        side = math.isqrt(num_tokens - 1)
        while side * side > num_tokens - 1:
            side -= 1
    patches = pos[:, num_tokens - side * side :]
    return patches.reshape(1, side, side, pos.shape[-1])


def mae_to_sam_encoder(
    mae_state: dict[str, torch.Tensor], sam_model: nn.Module
) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """Convert MAE (or timm ViT) encoder weights for ``sam_model.image_encoder``.

    Returns the state dict of the keys it sets (mapped + resampled + zeroed; the neck and other
    fresh keys are left out, so load it with ``strict=False``) and a report. Raises ValueError on
    a width, depth or patch-size mismatch (another variant?).
    """
    encoder = getattr(sam_model, "image_encoder", sam_model)
    target = encoder.state_dict()
    source, ignored = encoder_state(mae_state)
    report = TransferReport(ignored=ignored)
    out: dict[str, torch.Tensor] = {}

    source_blocks = {int(m.group(1)) for k in source if (m := _BLOCK.match(k))}
    target_blocks = {int(m.group(1)) for k in target if (m := _BLOCK.match(k))}
    if source_blocks != target_blocks:
        raise ValueError(
            f"the MAE encoder has {len(source_blocks)} blocks, the SAM encoder {len(target_blocks)} "
            "(another variant?)"
        )
    errors = []
    for key, value in target.items():
        if _REL_POS.match(key):
            out[key] = torch.zeros_like(value)
            report.zeroed.append(key)
        elif key == "pos_embed":
            if "pos_embed" not in source:
                errors.append("pos_embed: missing in the MAE weights")
                continue
            pos = _pos_embed_to_nhwc(source["pos_embed"]).float()
            if pos.shape[-1] != value.shape[-1]:
                errors.append(f"pos_embed: width {pos.shape[-1]} vs {value.shape[-1]}")
                continue
            if pos.shape[1:3] != value.shape[1:3]:
                pos = resample_abs_pos_embed_nhwc(pos, list(value.shape[1:3]))
            out[key] = pos.to(value.dtype)
            report.resampled.append(key)
        elif key.startswith(("blocks.", "patch_embed.")):
            if key not in source:
                errors.append(f"{key}: missing in the MAE weights")
            elif source[key].shape != value.shape:
                errors.append(f"{key}: MAE {tuple(source[key].shape)} vs SAM {tuple(value.shape)}")
            else:
                out[key] = source[key].to(value.dtype)
                report.mapped.append(key)
        else:
            report.fresh.append(key)
    if errors:
        raise ValueError("MAE weights do not fit the SAM encoder: " + "; ".join(errors[:8]))
    report.ignored += sorted(k for k in source if k not in out and not _REL_POS.match(k))
    return out, report


def init_encoder_from_mae(model: nn.Module, path: str | Path) -> TransferReport:
    """Initialise ``model.image_encoder`` (a Sam, or the encoder itself) from MAE weights in a file
    (safetensors, or ``torch.load(weights_only=True)``: a Lightning checkpoint, a state dict, timm's
    MAE weights). Every mapped key is loaded; only the fresh keys (neck) may stay as they are."""
    state = read_state_dict(path)  # unwraps state_dict/model containers, strips module./model./net.
    converted, report = mae_to_sam_encoder(state, model)
    report.source = str(path)
    encoder = getattr(model, "image_encoder", model)
    result = encoder.load_state_dict(converted, strict=False)
    missing = sorted(set(result.missing_keys) - set(report.fresh))
    if missing or result.unexpected_keys:
        raise ValueError(
            f"MAE transfer left keys unset: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m samtrain.models.mae_transfer", description="Convert MAE encoder weights for SAM."
    )
    parser.add_argument("mae_ckpt", type=Path, help="MAE weights (.safetensors, .pth, Lightning .ckpt, timm)")
    parser.add_argument("out", type=Path, help="output file (.safetensors or .pth)")
    parser.add_argument("--variant", default="vit_b", choices=tuple(ENCODER_SPECS))
    parser.add_argument("--image-size", type=int, default=1024)
    args = parser.parse_args(argv)

    encoder = build_image_encoder(args.variant, image_size=args.image_size)
    converted, report = mae_to_sam_encoder(read_state_dict(args.mae_ckpt), encoder)
    report.source = str(args.mae_ckpt)
    state = {f"image_encoder.{k}": v.contiguous() for k, v in converted.items()}
    write_state_dict(state, args.out, metadata={"variant": args.variant, "image_size": str(args.image_size)})
    print(report)
    print(f"SAM image-encoder weights ({len(state)} tensors): {args.out}")


if __name__ == "__main__":
    main()
