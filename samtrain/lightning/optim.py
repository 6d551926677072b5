"""Parameter groups and learning-rate schedules for SAM training (SAM paper, appendix A)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

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
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    encoder_lr: float | None = None,
    layer_decay_module: str = "image_encoder",
    layer_decay_overrides: Mapping[str, float] | None = None,
) -> list[dict]:
    """Optimizer groups for a Sam (or Sam2): decay / no-decay, the encoder's own lr, and layer-wise
    lr decay for its blocks.

    With ``layer_decay`` the module ``layer_decay_module`` (a timm model: SAM's ViT
    ``image_encoder``, SAM 2's Hiera ``image_encoder.trunk``) uses timm's
    ``param_groups_layer_decay`` (block i of L gets lr * layer_decay ** (L - i), the stem
    layer_decay ** (L + 1)); ``layer_decay_overrides`` maps fnmatch patterns of full parameter
    names to the scale they take instead (SAM 2: ``{"*pos_embed*": 1.0}``). Every parameter under
    ``image_encoder.`` trains at ``encoder_lr`` (times its scale; None: ``lr``), the rest at ``lr``.
    Frozen parameters are left out. Each group carries its own "lr".
    """
    encoder_lr = lr if encoder_lr is None else encoder_lr
    groups: list[dict] = []
    try:
        decayed = model.get_submodule(layer_decay_module)
    except AttributeError as error:
        raise ValueError(
            f"layer_decay_module {layer_decay_module!r}: {type(model).__name__} has no such submodule ({error})"
        ) from None
    prefix = f"{layer_decay_module}."
    use_layer_decay = layer_decay is not None and any(p.requires_grad for p in decayed.parameters())
    if use_layer_decay:
        groups = layer_decay_groups(
            decayed,
            prefix=prefix,
            lr=encoder_lr if prefix.startswith("image_encoder.") else lr,
            weight_decay=weight_decay,
            layer_decay=layer_decay,
            overrides=layer_decay_overrides or {},
        )
    rest = [(n, p) for n, p in model.named_parameters() if not (use_layer_decay and n.startswith(prefix))]
    if encoder_lr == lr:
        return groups + decay_groups(rest, weight_decay=weight_decay, lr=lr)
    encoder_rest = [(n, p) for n, p in rest if n.startswith("image_encoder.")]
    others = [(n, p) for n, p in rest if not n.startswith("image_encoder.")]
    return (
        groups
        + decay_groups(encoder_rest, weight_decay=weight_decay, lr=encoder_lr)
        + decay_groups(others, weight_decay=weight_decay, lr=lr)
    )


def layer_decay_groups(
    module: nn.Module,
    *,
    prefix: str,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    overrides: Mapping[str, float],
) -> list[dict]:
    """timm's layer-decay groups of ``module`` (its parameters named ``prefix`` + name in the model),
    trainable parameters only, each group with ``lr * scale``; a parameter whose full name matches an
    ``overrides`` pattern takes that pattern's scale in a group of its own kind."""
    names = {id(p): prefix + n for n, p in module.named_parameters()}
    no_decay = [n for n, p in module.named_parameters() if no_weight_decay(n, p)]
    groups: list[dict] = []
    overridden: dict[tuple[str, float], dict] = {}
    for group in param_groups_layer_decay(
        module, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
    ):
        params = []
        for param in group["params"]:
            if not param.requires_grad:
                continue
            pattern = next((pat for pat in overrides if fnmatch.fnmatchcase(names[id(param)], pat)), None)
            if pattern is None:
                params.append(param)
                continue
            key = (pattern, group["weight_decay"])
            entry = overridden.setdefault(
                key,
                {"params": [], "weight_decay": group["weight_decay"], "lr": lr * float(overrides[pattern])},
            )
            entry["params"].append(param)
        if params:
            groups.append(
                {"params": params, "weight_decay": group["weight_decay"], "lr": lr * group["lr_scale"]}
            )
    return groups + list(overridden.values())


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


# Every schedule below is a factory for Hydra (`_target_` + `_partial_: true` with its own
# arguments); the module calls it with the optimizer and the run's total optimizer steps.


def warmup_length(total_steps: int, warmup_steps: int | None, warmup_fraction: float | None) -> int:
    """Warmup steps: ``warmup_steps``, or ``warmup_fraction`` of the run when that is given instead,
    capped at a tenth of the run so that short runs still train."""
    if (warmup_steps is None) == (warmup_fraction is None):
        raise ValueError(
            f"give the warmup as warmup_steps or warmup_fraction, not both or neither "
            f"(warmup_steps={warmup_steps}, warmup_fraction={warmup_fraction})"
        )
    if warmup_fraction is not None and not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    length = warmup_steps if warmup_steps is not None else round(warmup_fraction * total_steps)
    return min(int(length), max(1, total_steps // 10))


def milestone_steps(milestones: Sequence[float], unit: str, total_steps: int) -> list[int]:
    """Milestones as optimizer steps: ``unit`` "step" takes them as they are (positive integers),
    "fraction" as fractions of ``total_steps`` in (0, 1], rounded to the nearest step."""
    if unit == "step":
        if any(m != int(m) or m <= 0 for m in milestones):
            raise ValueError(f"milestones in steps must be positive integers, got {list(milestones)}")
        return [int(m) for m in milestones]
    if unit == "fraction":
        if any(not 0 < m <= 1 for m in milestones):
            raise ValueError(f"milestones as fractions of the run must be in (0, 1], got {list(milestones)}")
        return [round(m * total_steps) for m in milestones]
    raise ValueError(f"milestone_unit must be 'step' or 'fraction', got {unit!r}")


def step_schedule(
    optimizer: Optimizer,
    *,
    total_steps: int,
    milestones: Sequence[float] = (2 / 3, 86666 / 90000),
    milestone_unit: str = "fraction",
    gamma: float = 0.1,
    warmup_steps: int | None = 250,
    warmup_fraction: float | None = None,
) -> LambdaLR:
    """SAM's schedule, per optimizer step: linear warmup, then the lr times ``gamma`` at each
    milestone (SAM: x0.1 at 60k and 86,666 of 90k iterations). ``milestones`` are steps or
    fractions of ``total_steps`` by ``milestone_unit`` (see :func:`milestone_steps`); the warmup
    by :func:`warmup_length`."""
    warmup = warmup_length(total_steps, warmup_steps, warmup_fraction)
    steps = milestone_steps(milestones, milestone_unit, total_steps)
    return LambdaLR(optimizer, warmup_step_decay(warmup, steps, gamma))


def cosine_schedule(
    optimizer: Optimizer,
    *,
    total_steps: int,
    min_ratio: float = 0.0,
    warmup_steps: int | None = 250,
    warmup_fraction: float | None = None,
) -> LambdaLR:
    """Per optimizer step: linear warmup (:func:`warmup_length`), then half-cycle cosine from the
    peak lr down to ``min_ratio`` of it at ``total_steps`` (MAE's schedule)."""
    warmup = warmup_length(total_steps, warmup_steps, warmup_fraction)
    return LambdaLR(optimizer, warmup_cosine(warmup, total_steps, min_ratio))


def constant_schedule(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_steps: int | None = 250,
    warmup_fraction: float | None = None,
) -> LambdaLR:
    """Per optimizer step: linear warmup (:func:`warmup_length`), then the peak lr throughout."""
    warmup = warmup_length(total_steps, warmup_steps, warmup_fraction)
    return LambdaLR(optimizer, warmup_step_decay(warmup, [], 1.0))
