"""Figures of evaluation results, written as image files (no display needed)."""

from __future__ import annotations

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
