"""Figures of training and evaluation results, written as image files (no display needed):
the mIoU-vs-clicks curves of an evaluation and the training curves of a run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_click_curves(
    curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "mIoU vs. clicks"
) -> Path:
    """One line per model of the mean IoU after clicks 1..K; written to ``path`` (PNG by suffix).

    Args:
        curves: ``{name: [mIoU after 1 click, after 2 clicks, ...]}``; curves may differ in length.
        path: the image file to write; its folder is created.
        title: the figure title.

    Returns:
        ``path`` as a Path.
    """
    # Figure + the Agg canvas directly: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not curves:
        raise ValueError("plot_click_curves needs at least one curve")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        values = [float(v) for v in curve]
        marker = "o" if len(values) <= 30 else None
        axes.plot(range(1, len(values) + 1), values, marker=marker, markersize=3, label=str(name))
    axes.set_xlabel("clicks")
    axes.set_ylabel("mIoU")
    axes.set_title(title)
    axes.set_ylim(0.0, 1.0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.savefig(path)
    return path


def plot_curves(
    train: Mapping[str, Sequence[tuple[int, float]]],
    val: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
) -> Path:
    """The curves of a run, one panel each for the training metrics, the validation IoU metrics
    (mIoU@k, box mIoU, calibration) and the other validation metrics (NoC, NoF), against the
    global step; training curves of more than 20 points are drawn with their EMA.

    Args:
        train: ``{metric: [(step, value), ...]}``.
        val: the same, for validation metrics.
        path: the image file to write; its folder is created.

    Returns:
        ``path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    val_iou = {k: v for k, v in val.items() if "IoU" in k or "calibration" in k}
    val_other = {k: v for k, v in val.items() if k not in val_iou}
    groups = [
        (g, t) for g, t in ((train, "training"), (val_iou, "validation"), (val_other, "validation")) if g
    ]
    fig = Figure(figsize=(5.5 * len(groups), 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (group, title) in zip(axes, groups, strict=True):
        for key, points in group.items():
            steps, values = zip(*points, strict=True)
            if group is train and len(points) > 20:
                ax.plot(steps, values, alpha=0.3, linewidth=0.8)
                ax.plot(steps, _ema(values), label=f"{key} (EMA)", color=ax.lines[-1].get_color())
            else:
                ax.plot(steps, values, marker="o" if group is not train else None, markersize=4, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average of ``values`` (the first value starts it)."""
    out, current = [], math.nan
    for v in values:
        current = v if math.isnan(current) else (1 - alpha) * current + alpha * v
        out.append(current)
    return out


def plot_worst_objects(panels: Sequence[Mapping], path: str | Path, *, columns: int = 4) -> Path:
    """A grid of objects, each its image with the ground truth tinted and the clicks numbered
    (green positive, red negative).

    Args:
        panels: dicts with ``"image"`` ``(H, W, 3) uint8``, ``"gt"`` ``(H, W) bool``, ``"coords"``
            ``(K, 2)`` pixel (x, y), ``"labels"`` ``(K,)`` 1/0 and ``"title"``.
        path: the PNG to write; its folder is created.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("plot_worst_objects needs at least one panel")
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        shown = np.asarray(panel["image"]).astype(np.float32) / 255.0
        gt = np.asarray(panel["gt"], dtype=bool)
        shown[gt] = 0.55 * shown[gt] + 0.45 * np.array([0.2, 0.5, 1.0])
        ax.imshow(shown)
        for k, ((x, y), label) in enumerate(zip(panel["coords"], panel["labels"], strict=True)):
            colour = "lime" if label == 1 else "red"
            ax.scatter([x], [y], s=28, c=colour, edgecolors="black", linewidths=0.6)
            ax.annotate(
                str(k + 1), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, color=colour
            )
        ax.set_title(str(panel["title"]), fontsize=7)
    for ax in axes:
        ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
