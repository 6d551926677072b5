"""LoRA (Hu et al., arXiv 2106.09685) on the image encoder: low-rank updates of frozen linear layers.

A ``LoRALinear`` keeps the wrapped layer's ``weight`` and ``bias`` under their own names and adds
``lora_A`` (r, in), ``lora_B`` (out, r) and the buffer ``lora_scale`` (alpha / r), so a state
dict of a LoRA model holds the official keys plus three per adapted layer, and carries all a
merge needs: W' = W + lora_scale * B @ A. ``lora_B`` starts at zero, so a fresh adapter leaves
the model's outputs unchanged.

peft is not used: it needs transformers and accelerate, and its keys (``base_layer``,
``lora_A.default``) would move the official ``weight`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LORA_SUFFIXES = ("lora_A", "lora_B", "lora_scale")


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` with the base layer's weight and bias frozen.

    x: (..., in_features) -> (..., out_features).
    """

    def __init__(self, base: nn.Linear, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in the LoRA paper
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.lora_scale

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update of the weight, (out_features, in_features)."""
        return (self.lora_B @ self.lora_A) * self.lora_scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded into its weight."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def add_lora(
    encoder: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("qkv",),
    dropout: float = 0.0,
) -> list[str]:
    """Wrap, in place, every nn.Linear of ``encoder.blocks`` whose own name is in ``targets``
    (timm samvit: ``qkv``, ``proj``, ``fc1``, ``fc2``) in a LoRALinear, and freeze every other
    encoder parameter. Returns the names of the wrapped layers."""
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise ValueError(f"LoRA expects an encoder with .blocks (timm samvit), got {type(encoder).__name__}")
    encoder.requires_grad_(False)
    linears = [(n, m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    wrapped = []
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        if child in targets:
            parent = blocks.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout))
            wrapped.append(f"blocks.{name}")
    if not wrapped:
        available = sorted({n.rpartition(".")[2] for n, _ in linears})
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer; the blocks have {available}")
    return wrapped


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> int:
    """Replace, in place, every LoRALinear of ``model`` by a plain nn.Linear with merged weights.
    Returns how many were merged."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).merged())
    return len(names)


def merge_lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every LoRA layer's update folded into its ``weight`` and the LoRA keys
    dropped (a new dict; the tensors of other keys are shared). Plain state dicts pass unchanged."""
    merged = dict(state)
    for key in [k for k in state if k.endswith(".lora_A")]:
        prefix = key[: -len("lora_A")]
        missing = [prefix + s for s in ("weight", *LORA_SUFFIXES) if prefix + s not in state]
        if missing:
            raise ValueError(f"LoRA layer {prefix[:-1]} is incomplete in the state dict: no {missing}")
        a, b, scale = (merged.pop(prefix + s).float() for s in LORA_SUFFIXES)
        weight = merged[prefix + "weight"]
        merged[prefix + "weight"] = (weight.float() + scale * (b @ a)).to(weight.dtype)
    return merged
