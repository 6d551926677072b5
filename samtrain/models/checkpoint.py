"""Checkpoint I/O in the official SAM key layout (``.pth``) or safetensors.

samtrain's image encoder is timm's samvit, whose MLP layers are named ``fc1/fc2`` where the
official encoder says ``lin1/lin2``; everything else keeps the official names. LoRA layers
(``samtrain.models.lora``) are merged into plain weights on export, and on loading a LoRA run's
checkpoint into a model without LoRA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from samtrain.models.hf_keys import read_hf_directory
from samtrain.models.lora import LORA_SUFFIXES, merge_lora_state

_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")  # DDP, wrappers, SamModule, torch.compile
_ENCODER_MLP = re.compile(r"^(image_encoder\.blocks\.\d+\.mlp\.)(lin|fc)([12]\.)")


@dataclass
class LoadReport:
    """What a checkpoint load did."""

    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # parts the model lacks (SAM 2 video memory)

    def __str__(self) -> str:
        lines = [f"{self.path}: loaded {self.loaded} tensors"]
        for name, keys in (
            ("resampled", self.resampled),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("ignored (video memory)", self.ignored),
        ):
            if keys:
                lines.append(key_list_line(name, keys))
        return "\n".join(lines)


def key_list_line(name: str, keys: list[str], shown: int = 8) -> str:
    """One line of a load report: ``  name (count): the first keys ...``."""
    more = " ..." if len(keys) > shown else ""
    return f"  {name} ({len(keys)}): {', '.join(keys[:shown])}{more}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from Lightning/trainer containers, prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or a pickle that weights_only refuses
        raise ValueError(f"checkpoint {path} could not be read: {unreadable_reason(err, path)}") from None
    for container in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return {strip_prefixes(k): v for k, v in state.items()}


def unreadable_reason(err: Exception, path: str | Path | None = None) -> str:
    """Why ``torch.load(weights_only=True)`` or safetensors refused the file at ``path``, in words,
    without torch's advice to load with ``weights_only=False`` (which would let the file run code).
    The file's first bytes tell a PyTorch archive (zip) or pickle from anything else."""
    text = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return (
            f"it holds a Python object ({unsafe.group(1)}), not only tensors and plain values, and "
            "samtrain loads tensors and plain values only (a checkpoint cannot run code)"
        )
    if "Safetensor" in type(err).__name__:
        return f"the file is not a complete safetensors file ({text})"
    head = file_head(path)
    if head == b"":
        return "the file is empty"
    if head is not None and not head.startswith((b"PK", b"\x80")):
        return f"the file is not a PyTorch checkpoint (it starts with {head[:8]!r})"
    if (head is not None and head.startswith(b"PK")) or isinstance(err, EOFError) or "zip archive" in text:
        return "the file is truncated or corrupted (not a complete PyTorch archive)"
    if "weights_only" in text:
        return "the file is not a PyTorch checkpoint that holds only tensors and plain values"
    first_line = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first_line[:300]}"


def file_head(path: str | Path | None, size: int = 16) -> bytes | None:
    """The first ``size`` bytes of a file (None: no path, or unreadable)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return None


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of any checkpoint samtrain loads, in the official key layout where they came
    that way: a file (:func:`read_state_dict`) or a Hugging Face ``SamModel`` directory."""
    path = Path(path)
    if path.is_dir():
        return read_hf_directory(path)
    return read_state_dict(path)


def strip_prefixes(key: str) -> str:
    """``key`` without the wrapper prefixes (DDP's ``module.``, ``model.``, ``net.``, torch.compile's)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def official_to_samtrain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SAM key names -> samtrain's (timm encoder MLP naming)."""
    return {_ENCODER_MLP.sub(r"\1fc\3", k): v for k, v in state.items()}


def samtrain_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """samtrain key names -> the official SAM layout."""
    return {_ENCODER_MLP.sub(r"\1lin\3", k): v for k, v in state.items()}


def resample_position_tensors(
    state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]
) -> list[str]:
    """Resample, in place, the encoder's absolute position embedding (1, h, w, C) and relative
    position tables (2k - 1, C) of a checkpoint to the model's grid. Returns the keys changed."""
    changed = []
    for key, value in state.items():
        target = model_state.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key == "image_encoder.pos_embed" and value.ndim == 4:
            state[key] = resample_abs_pos_embed_nhwc(value.float(), target.shape[1:3]).to(value.dtype)
        elif key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and value.ndim == 2:
            table = F.interpolate(value.float().T.unsqueeze(0), size=target.shape[0], mode="linear")
            state[key] = table.squeeze(0).T.to(value.dtype)
        else:
            continue
        changed.append(key)
    return changed


def load_sam_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load an official, exported, safetensors or Lightning checkpoint into a samtrain Sam.

    Raises ValueError when nothing matches, when shapes disagree after resampling, and (strict)
    when keys are missing or unexpected; the error lists the keys.
    """
    state = official_to_samtrain(read_checkpoint_state(path))
    model_state = model.state_dict()
    if not any(k.endswith(LORA_SUFFIXES) for k in model_state):
        state = merge_lora_state(state)
    report = LoadReport(path=str(path))
    report.resampled = resample_position_tensors(state, model_state)
    return load_matching_tensors(model, state, report, strict=strict, family="SAM")


def load_matching_tensors(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    report: LoadReport,
    *,
    strict: bool,
    family: str,
    first_keys: list[str] | None = None,
) -> LoadReport:
    """Load the tensors of ``state`` (samtrain's names) whose keys the model has, filling in
    ``report`` (missing, unexpected, loaded). ValueError naming ``report.path`` when no key matches
    (``first_keys``: what to show of the file, default its first keys), when a tensor has another
    shape, or, with ``strict``, when any key is missing or unexpected."""
    path, model_state = report.path, model.state_dict()
    report.missing = sorted(set(model_state) - set(state))
    report.unexpected = sorted(set(state) - set(model_state))
    matched = [k for k in state if k in model_state]
    if not matched:
        raise ValueError(
            f"checkpoint {path} matches none of the model's {len(model_state)} keys "
            f"(first keys in the file: {(first_keys or list(state))[:5]}); is it a {family} checkpoint?"
        )
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in matched
        if state[k].shape != model_state[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint {path} has tensors of the wrong shape (another variant?): "
            + "; ".join(mismatched[:8])
        )
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint {path} does not match the model strictly:\n{report}")
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    report.loaded = len(matched)
    return report


def exportable_state(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``state`` (default ``model.state_dict()``) detached, contiguous, on the CPU, LoRA merged.
    ValueError for a sharded model's own state (FSDP2 DTensors hold one rank's shard): pass its full
    state, gathered on every rank (``samtrain.lightning.sharding.gathered_state``)."""
    state = model.state_dict() if state is None else state
    sharded = [k for k, v in state.items() if type(v).__name__ == "DTensor"]
    if sharded:
        raise ValueError(
            f"the model is sharded ({sharded[0]} and {len(sharded) - 1} more are DTensors, one rank's "
            "shard each): export its full state, gathered on every rank (state=...)"
        )
    return merge_lora_state({k: v.detach().cpu().contiguous() for k, v in state.items()})


def write_state_dict(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors to ``path`` (safetensors when the suffix says so, else ``torch.save``) through a
    temporary file beside it, renamed into place: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file(state, str(tmp), metadata=metadata)
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path
