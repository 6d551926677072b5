"""The evaluation run behind eval.py and `samtrain eval`: checkpoints x the val split of a data config.

Each checkpoint (official ``sam_vit_*.pth``, a samtrain export, a Lightning ``.ckpt``, or ``None``
for an untrained model) is loaded into ``build_sam(cfg.variant, cfg.image_size)`` and run through
:func:`samtrain.interactive.protocols.evaluate_batch` (the RITM click protocol and the box protocol) on every
batch of the datamodule's val loader. Written to ``cfg.paths.output_dir``:

- ``results.json``: per checkpoint the metrics of :class:`samtrain.interactive.metrics.InteractiveMetrics` and
  the full mIoU curve (mean IoU over objects after clicks 1..max_clicks);
- ``results.md``: a Markdown table, one row per checkpoint;
- ``miou_vs_clicks.png``: the curves, one line per checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from samtrain.interactive.metrics import InteractiveMetrics, threshold_name
from samtrain.interactive.protocols import evaluate_batch
from samtrain.models import build_sam
from samtrain.plots import plot_click_curves

log = logging.getLogger(__name__)

RANDOM = "random"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CURVES_PNG = "miou_vs_clicks.png"


# ---------------------------------------------------------------------------------------- inputs


def checkpoint_list(value: Any) -> list[str | None]:
    """The ``checkpoints`` config value as a list; ``None``/"random"/"null"/"none" mean untrained."""
    if value is None or isinstance(value, (str, Path)):
        value = [value]
    elif isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"checkpoints must be a non-empty list of paths (or null), got {value!r}")
    out: list[str | None] = []
    for item in value:
        if item is None or str(item).strip().lower() in (RANDOM, "null", "none", ""):
            out.append(None)
        else:
            out.append(str(Path(str(item)).expanduser()))
    return out


def checkpoint_names(checkpoints: Sequence[str | None], names: Sequence[str] | None = None) -> list[str]:
    """Display names: the shortest path suffix that tells the files apart ("last.ckpt",
    "run1/checkpoints/last.ckpt"), "random" for an untrained model, "#2", "#3" on repeats."""
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(checkpoints):
            raise ValueError(f"names has {len(names)} entries but checkpoints has {len(checkpoints)}")
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, got {names}")
        return names
    resolved = [None if c is None else Path(c).resolve() for c in checkpoints]
    distinct = {p for p in resolved if p is not None}
    labels = []
    for path in resolved:
        if path is None:
            labels.append(RANDOM)
            continue
        others = [q for q in distinct if q != path]
        depth = next(
            (d for d in range(1, len(path.parts)) if all(q.parts[-d:] != path.parts[-d:] for q in others)),
            len(path.parts),
        )
        labels.append("/".join(path.parts[-depth:]))
    seen: Counter[str] = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def resolve_device(name: str | None) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; otherwise the named device, checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(str(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device


def load_model(variant: str, image_size: int, checkpoint: str | None) -> torch.nn.Module:
    """``build_sam`` with the checkpoint's weights (random weights for None), with an eval-config hint
    on load errors (a checkpoint of another variant names the tensors whose shapes disagree)."""
    if checkpoint is None:
        return build_sam(variant, image_size=image_size)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    try:
        return build_sam(variant, image_size=image_size, checkpoint=checkpoint)
    except ValueError as err:
        raise ValueError(
            f"{err}\n(the eval config builds variant={variant} at image_size={image_size}; "
            "set variant= to the checkpoint's variant)"
        ) from err


# ---------------------------------------------------------------------------------------- the run


def evaluate_model(
    model: torch.nn.Module,
    batches: Iterable[dict],
    *,
    max_clicks: int,
    clicks: Sequence[int] = (1, 3, 5, 9),
    noc_thresholds: Sequence[float] = (0.85, 0.9),
    nof_thresholds: Sequence[float] = (0.9,),
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, Any]:
    """Both protocols over the batches.

    Returns:
        ``"metrics"`` (InteractiveMetrics' values as floats), ``"miou_curve"`` (``max_clicks``
        floats: mean IoU over objects after clicks 1..K), ``"num_objects"``, ``"num_images"``, ``"num_skipped"``,
        ``"seconds"``.
    """
    from tqdm import tqdm

    metrics = InteractiveMetrics(
        clicks=[k for k in clicks if k <= max_clicks],
        noc_thresholds=noc_thresholds,
        nof_thresholds=nof_thresholds,
    )
    curve_sum = torch.zeros(max_clicks, dtype=torch.float64)
    num_objects = num_images = num_skipped = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    if limit_batches is not None:
        total = limit_batches if total is None else min(total, limit_batches)
    start = time.perf_counter()
    model.eval()
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="batch", disable=not progress) as bar:
        for index, batch in enumerate(batches):
            if total is not None and index >= total:
                break
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            num_skipped += batch.get("num_skipped", 0)  # unreadable samples: logged with their files
            num_images += int(batch["image"].shape[0]) if "image" in batch else 0
            if "image" in batch and batch["masks"].shape[0] > 0:  # images without objects add nothing
                out = {
                    k: v.float().cpu() for k, v in evaluate_batch(model, batch, max_clicks=max_clicks).items()
                }
                metrics.update(out["ious"], box_ious=out["box_ious"], pred_ious=out["pred_ious"])
                curve_sum += out["ious"].double().sum(dim=0)
                num_objects += int(out["ious"].shape[0])
                bar.set_postfix(
                    {"objects": num_objects, "mIoU@1": f"{curve_sum[0].item() / num_objects:.3f}"}
                )
            bar.update(1)
    if num_objects == 0:
        raise ValueError(f"the val data held no objects to evaluate ({num_images} images)")
    return {
        "metrics": {k: float(v) for k, v in metrics.compute().items()},
        "miou_curve": (curve_sum / num_objects).tolist(),
        "num_objects": num_objects,
        "num_images": num_images,
        "num_skipped": num_skipped,
        "seconds": round(time.perf_counter() - start, 3),
    }


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate every checkpoint of the config; write the results; returns ``{name: metrics}``."""
    checkpoints = checkpoint_list(cfg.checkpoints)
    missing = [c for c in checkpoints if c is not None and not Path(c).is_file()]
    if missing:  # before any work, and all of them at once
        raise FileNotFoundError(
            f"checkpoint{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}"
        )
    names = checkpoint_names(checkpoints, cfg.get("names"))
    max_clicks = int(cfg.max_clicks)
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
    device = resolve_device(cfg.get("device"))
    datamodule = hydra.utils.instantiate(cfg.data)
    loader = datamodule.val_dataloader()

    runs: dict[str, dict[str, Any]] = {}
    for name, checkpoint in zip(names, checkpoints, strict=True):
        log.info("Evaluating %s (%s) on %s", name, checkpoint or "random weights", device)
        torch.manual_seed(int(cfg.get("seed", 0)))  # the same untrained model every time
        model = load_model(cfg.variant, int(cfg.image_size), checkpoint).to(device)
        run = evaluate_model(
            model,
            loader,
            max_clicks=max_clicks,
            clicks=list(cfg.clicks),
            noc_thresholds=list(cfg.noc_thresholds),
            nof_thresholds=list(cfg.nof_thresholds),
            device=device,
            limit_batches=cfg.get("limit_batches"),
            progress=bool(cfg.get("progress", True)),
            desc=name,
        )
        runs[name] = {"checkpoint": checkpoint, **run}
        del model

    write_results(cfg, runs, Path(cfg.paths.output_dir))
    return {name: run["metrics"] for name, run in runs.items()}


# ---------------------------------------------------------------------------------------- outputs


def metric_columns(cfg: DictConfig) -> list[tuple[str, str]]:
    """(metric key, column title) of the Markdown table, in order."""
    columns = [(f"mIoU@{k}", f"mIoU@{k}") for k in cfg.clicks if k <= cfg.max_clicks]
    columns += [(f"NoC@{threshold_name(t)}",) * 2 for t in cfg.noc_thresholds]
    columns += [(f"NoF@{threshold_name(t)}",) * 2 for t in cfg.nof_thresholds]
    columns += [("box_mIoU", "box mIoU"), ("iou_calibration", "IoU calibration")]
    return columns


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.startswith("NoF@"):
        return f"{value:.0f}"
    if key.startswith("NoC@"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown_table(cfg: DictConfig, runs: dict[str, dict[str, Any]]) -> str:
    """One row per checkpoint; columns mIoU@k, NoC@t, NoF@t, box mIoU, IoU calibration."""
    columns = metric_columns(cfg)
    lines = [
        "| checkpoint | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, run in runs.items():
        cells = [_fmt(key, run["metrics"].get(key)) for key, _ in columns]
        lines.append(f"| {name.replace('|', '/')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(cfg: DictConfig, runs: dict[str, dict[str, Any]], output_dir: Path) -> dict[str, Path]:
    """results.json, results.md and miou_vs_clicks.png in output_dir; prints the table and the paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    objects = {run["num_objects"] for run in runs.values()}
    setup = {
        "variant": cfg.variant,
        "image_size": int(cfg.image_size),
        "max_clicks": int(cfg.max_clicks),
        "val_dataset": OmegaConf.to_container(cfg.data.val_dataset, resolve=True),
    }
    paths = {
        "json": output_dir / RESULTS_JSON,
        "markdown": output_dir / RESULTS_MD,
        "plot": output_dir / CURVES_PNG,
    }
    paths["json"].write_text(json.dumps({**setup, "checkpoints": runs}, indent=2) + "\n")
    table = markdown_table(cfg, runs)
    heading = (
        f"SAM {cfg.variant} at {cfg.image_size} px, {'/'.join(map(str, sorted(objects)))} objects, "
        f"up to {cfg.max_clicks} clicks (RITM protocol); NoF counts objects"
    )
    paths["markdown"].write_text(f"# Evaluation\n\n{heading}\n\n{table}\n")
    plot_click_curves(
        {name: run["miou_curve"] for name, run in runs.items()},
        paths["plot"],
        title=f"mIoU vs. clicks ({cfg.variant}, {cfg.image_size} px)",
    )
    print(
        "\n".join(["", heading, "", table, "", *(f"{kind}: {path}" for kind, path in paths.items())]),
        flush=True,
    )
    return paths
