"""Parameter groups and learning-rate schedules for SAM training (SAM paper, appendix A)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from timm.optim import param_groups_layer_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# Position embeddings, relative-position tables and learned tokens take no weight decay
# (neither do norms and biases: every 1-d tensor).
NO_DECAY_NAMES = ("pos_embed", "rel_pos_h", "rel_pos_w", "token", "point_embed", "no_mask_embed")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter takes no weight decay: 1-d tensors, positions, relative tables, tokens."""
    return param.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)


def sam_param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """Optimizer groups for a Sam: decay / no-decay, and layer-wise lr decay for the encoder.

    With ``layer_decay`` the encoder uses timm's ``param_groups_layer_decay`` (block i of L gets
    lr * layer_decay ** (L + 1 - i)); the prompt encoder and mask decoder keep the full lr.
    Frozen parameters are left out. Each group carries its own "lr".
    """
    groups: list[dict] = []
    encoder = model.image_encoder
    if layer_decay is not None and any(p.requires_grad for p in encoder.parameters()):
        no_decay = [n for n, p in encoder.named_parameters() if no_weight_decay(n, p)]
        for group in param_groups_layer_decay(
            encoder, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
        ):
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                groups.append(
                    {"params": params, "weight_decay": group["weight_decay"], "lr": lr * group["lr_scale"]}
                )
        rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    else:
        rest = list(model.named_parameters())
    return groups + decay_groups(rest, weight_decay=weight_decay, lr=lr)


def decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], *, weight_decay: float, **options
) -> list[dict]:
    """The trainable parameters split into a weight-decay group and a no-decay group (1-d tensors,
    positions, tokens: ``no_weight_decay``), empty groups left out; ``options`` go to both."""
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [{**g, **options} for g in groups if g["params"]]


def warmup_step_decay(warmup_steps: int, milestones: Sequence[int], gamma: float) -> Callable[[int], float]:
    """Linear warmup, then the lr times gamma at each milestone step (SAM: /10 twice)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** sum(step >= m for m in milestones)

    return factor


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warmup, then half-cycle cosine from 1 down to min_ratio at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: Optimizer,
    *,
    total_steps: int,
    kind: str = "step",
    warmup_steps: int = 250,
    milestones: Sequence[float] = (2 / 3, 86666 / 90000),
    gamma: float = 0.1,
    min_ratio: float = 0.0,
) -> LambdaLR:
    """A per-step LambdaLR. ``milestones`` are fractions of total_steps (SAM: 60k and 86.666k of 90k);
    the warmup is capped at a tenth of the run so that short runs still train."""
    warmup_steps = min(warmup_steps, max(1, total_steps // 10))
    if kind == "step":
        factor = warmup_step_decay(warmup_steps, [round(m * total_steps) for m in milestones], gamma)
    elif kind == "cosine":
        factor = warmup_cosine(warmup_steps, total_steps, min_ratio)
    elif kind == "constant":
        factor = warmup_step_decay(warmup_steps, [], 1.0)
    else:
        raise ValueError(f"unknown lr schedule {kind!r}; choose step, cosine or constant")
    return LambdaLR(optimizer, factor)
