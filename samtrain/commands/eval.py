"""The evaluation run behind eval.py and `samtrain eval`: checkpoints x benchmarks.

Each checkpoint (official ``sam_vit_*.pth``, a samtrain export, a Lightning ``.ckpt``, or ``None``
for an untrained model) is loaded into ``build_sam(cfg.variant, cfg.image_size)`` and every object
of every image of each benchmark (``cfg.benchmarks``, or else the val split of ``cfg.data``) goes
through :func:`samtrain.interactive.protocols.evaluate_sample`: the RITM click protocol and the box
protocol at the image's original resolution (docs/evaluation.md). Written to ``cfg.paths.output_dir``:

- ``results.json``: the settings, and per benchmark and checkpoint the metrics of
  :func:`samtrain.interactive.metrics.protocol_summary` and the mIoU curve (clicks 1..max_clicks);
- ``results.md``: one table, a row per benchmark and checkpoint;
- ``<benchmark>/miou_vs_clicks.png``: the curves, a line per checkpoint;
- ``<benchmark>/<checkpoint>/objects.csv``: per object its size, box IoU and every click's
  position, label and IoU; ``worst_objects.png``: the objects of lowest final IoU with their clicks.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from samtrain.data.errors import SampleError
from samtrain.interactive.metrics import protocol_summary, threshold_name
from samtrain.interactive.protocols import evaluate_sample
from samtrain.models import build_sam
from samtrain.plots import plot_click_curves, plot_worst_objects

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


@dataclass
class ObjectRecords:
    """Every object of one benchmark for one checkpoint, in dataset order (N objects, K clicks)."""

    sample_index: list[int] = field(default_factory=list)  # the image's index in the dataset
    image_ids: list[int] = field(default_factory=list)
    object_index: list[int] = field(default_factory=list)  # the object's place in its image
    areas: list[int] = field(default_factory=list)
    ious: list[np.ndarray] = field(default_factory=list)  # (n, K) per image
    coords: list[np.ndarray] = field(default_factory=list)  # (n, K, 2) (x, y)
    labels: list[np.ndarray] = field(default_factory=list)  # (n, K)
    box_ious: list[np.ndarray] = field(default_factory=list)
    oracle_ious: list[np.ndarray] = field(default_factory=list)
    pred_ious: list[np.ndarray] = field(default_factory=list)  # the IoU head at click 1
    boundary: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def add(self, index: int, image_id: int, masks: np.ndarray, result: Any) -> None:
        n = len(masks)
        self.sample_index += [index] * n
        self.image_ids += [image_id] * n
        self.object_index += list(range(n))
        self.areas += [int(m.sum()) for m in masks]
        self.ious.append(result.clicks.ious)
        self.coords.append(result.clicks.coords)
        self.labels.append(result.clicks.labels)
        self.box_ious.append(result.box_ious)
        self.oracle_ious.append(result.clicks.oracle_iou)
        self.pred_ious.append(result.clicks.pred_ious[:, 0])
        for k, values in result.boundary_ious.items():
            self.boundary.setdefault(k, []).append(values)

    def joined(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name))


def objects_of(sample: dict, cap: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A raw sample's objects ``(N, H, W) bool`` (the first ``cap``; empty masks are no object) and
    their ground-truth boxes ``(N, 4)`` when the benchmark gives them."""
    masks = np.asarray(sample["masks"], dtype=bool)[:cap]
    boxes = None if sample.get("boxes") is None else np.asarray(sample["boxes"], dtype=np.float64)[:cap]
    keep = masks.reshape(len(masks), -1).any(axis=1)
    return masks[keep], None if boxes is None else boxes[keep]


def raw_dataset(dataset_cfg: DictConfig) -> Any:
    """The dataset of a config without its transform: samples at the original resolution."""
    cfg = OmegaConf.to_container(dataset_cfg, resolve=True)
    if "transform" in cfg or "_target_" in cfg:
        cfg["transform"] = None
    return hydra.utils.instantiate(cfg)


def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    *,
    protocol: dict[str, Any],
    max_objects_per_image: int | None = None,
    limit_images: int | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> tuple[ObjectRecords, dict[str, Any]]:
    """Both protocols on every object of every image of ``dataset`` (raw samples: ``"image"``
    ``(H, W, 3) uint8``, ``"masks"`` ``(K, H, W)``, optional ``"ignore"``); unreadable samples are
    logged with their file and counted. ``protocol``: keyword arguments of ``evaluate_sample``.

    Returns:
        the per-object records and ``{"num_images", "num_objects", "num_skipped", "seconds"}``.
    """
    from tqdm import tqdm

    records = ObjectRecords()
    total = len(dataset) if limit_images is None else min(len(dataset), int(limit_images))
    num_images = num_skipped = 0
    first_click_sum = 0.0
    start = time.perf_counter()
    model.eval()
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="image", disable=not progress) as bar:
        for index in range(total):
            bar.update(1)
            try:
                sample = dataset[index]
            except SampleError as err:
                log.warning("skipping %s", err)
                num_skipped += 1
                continue
            masks, boxes = objects_of(sample, max_objects_per_image)
            num_images += 1
            if len(masks) == 0:
                continue
            image, ignore = np.asarray(sample["image"]), sample.get("ignore")
            result = evaluate_sample(model, image, masks, ignore=ignore, boxes=boxes, **protocol)
            records.add(index, int(sample["image_id"]), masks, result)
            first_click_sum += float(result.clicks.ious[:, 0].sum())
            n = len(records.areas)
            bar.set_postfix({"objects": n, "mIoU@1": f"{first_click_sum / n:.3f}"})
    if not records.ious:
        raise ValueError(
            f"the benchmark held no objects to evaluate ({num_images} images, {num_skipped} unreadable)"
        )
    counts = {"num_images": num_images, "num_objects": len(records.areas), "num_skipped": num_skipped}
    return records, {**counts, "seconds": round(time.perf_counter() - start, 3)}


def summary(cfg: DictConfig, records: ObjectRecords) -> dict[str, float]:
    """The metrics of one benchmark and checkpoint (protocol_summary with the config's choices)."""
    return protocol_summary(
        records.joined("ious"),
        clicks=[int(k) for k in cfg.clicks],
        noc_thresholds=[float(t) for t in cfg.noc_thresholds],
        nof_definition=str(cfg.nof_definition),
        box_ious=records.joined("box_ious"),
        areas=np.asarray(records.areas),
        oracle_ious=records.joined("oracle_ious"),
        pred_ious=records.joined("pred_ious"),
        boundary_ious={k: np.concatenate(v) for k, v in records.boundary.items()},
    )


def benchmark_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """``{benchmark name: dataset config}``: ``cfg.benchmarks`` when it names any, else the val split."""
    chosen = cfg.get("benchmarks") or {}
    if chosen:
        return {str(name): dataset for name, dataset in chosen.items()}
    if cfg.data.get("val_dataset") is None:
        raise ValueError("nothing to evaluate: choose benchmark=<name> or a data config with a val_dataset")
    return {"val": cfg.data.val_dataset}


def protocol_options(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of ``evaluate_sample`` from the config."""
    return {
        "max_clicks": int(cfg.max_clicks),
        "threshold": float(cfg.threshold),
        "output_choice": str(cfg.output_choice),
        "mask_feedback": bool(cfg.mask_feedback),
        "boundary_clicks": [int(k) for k in cfg.boundary_clicks if int(k) <= int(cfg.max_clicks)],
        "max_pixels_per_pass": int(cfg.max_pixels_per_pass),
    }


def evaluate(cfg: DictConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate every checkpoint of the config on every benchmark; write the results.

    Returns:
        ``{benchmark: {checkpoint name: metrics}}``.
    """
    checkpoints = checkpoint_list(cfg.checkpoints)
    missing = [c for c in checkpoints if c is not None and not Path(c).is_file()]
    if missing:  # before any work, and all of them at once
        raise FileNotFoundError(
            f"checkpoint{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}"
        )
    names = checkpoint_names(checkpoints, cfg.get("names"))
    if int(cfg.max_clicks) < 1:
        raise ValueError(f"max_clicks must be >= 1, got {cfg.max_clicks}")
    device = resolve_device(cfg.get("device"))
    datasets = {name: raw_dataset(dataset) for name, dataset in benchmark_configs(cfg).items()}
    protocol = protocol_options(cfg)
    runs: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in datasets}
    output_dir = Path(cfg.paths.output_dir)
    for name, checkpoint in zip(names, checkpoints, strict=True):
        log.info("Evaluating %s (%s) on %s", name, checkpoint or "random weights", device)
        torch.manual_seed(int(cfg.get("seed", 0)))  # the same untrained model every time
        model = load_model(cfg.variant, int(cfg.image_size), checkpoint).to(device)
        for benchmark, dataset in datasets.items():
            records, counts = evaluate_model(
                model,
                dataset,
                protocol=protocol,
                max_objects_per_image=cfg.get("max_objects_per_image"),
                limit_images=cfg.get("limit_images"),
                progress=bool(cfg.get("progress", True)),
                desc=f"{benchmark} / {name}",
            )
            folder = output_dir / benchmark / _safe(name)
            write_objects_csv(records, folder / OBJECTS_CSV)
            if cfg.get("worst_objects", 0):
                plot_worst(model, datasets[benchmark], records, folder / WORST_PNG, int(cfg.worst_objects))
            runs[benchmark][name] = {
                "checkpoint": checkpoint,
                "metrics": summary(cfg, records),
                "miou_curve": records.joined("ious").mean(axis=0).tolist(),
                **counts,
            }
        del model
    write_results(cfg, runs, output_dir)
    return {b: {n: run["metrics"] for n, run in per.items()} for b, per in runs.items()}


# ---------------------------------------------------------------------------------------- outputs

OBJECTS_CSV = "objects.csv"
WORST_PNG = "worst_objects.png"


def _safe(name: str) -> str:
    """A checkpoint name as one folder name."""
    return re.sub(r"[^A-Za-z0-9_.#-]+", "_", name)


def write_objects_csv(records: ObjectRecords, path: Path) -> Path:
    """One row per object: image_id, object, area, box_iou, oracle_iou@1, pred_iou@1, then per click
    k: x_k, y_k, label_k, iou_k (pixels of the original image, label 1 positive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ious, coords, labels = (records.joined(n) for n in ("ious", "coords", "labels"))
    box, oracle, pred = (records.joined(n) for n in ("box_ious", "oracle_ious", "pred_ious"))
    clicks = ious.shape[1]
    header = ["image_id", "object", "area", "box_iou", "oracle_iou@1", "pred_iou@1"]
    header += [f"{f}_{k}" for k in range(1, clicks + 1) for f in ("x", "y", "label", "iou")]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(len(ious)):
            row = [records.image_ids[i], records.object_index[i], records.areas[i]]
            row += [f"{box[i]:.6f}", f"{oracle[i]:.6f}", f"{pred[i]:.6f}"]
            for k in range(clicks):
                row += [int(coords[i, k, 0]), int(coords[i, k, 1]), int(labels[i, k]), f"{ious[i, k]:.6f}"]
            writer.writerow(row)
    return path


def plot_worst(model: Any, dataset: Any, records: ObjectRecords, path: Path, count: int) -> Path:
    """The ``count`` objects of lowest final IoU: image, ground truth, final prediction and clicks."""
    ious = records.joined("ious")
    worst = np.argsort(ious[:, -1], kind="stable")[:count]
    panels = []
    for i in worst:
        sample = dataset[records.sample_index[i]]
        gt = objects_of(sample)[0][records.object_index[i]]
        panels.append(
            {
                "image": np.asarray(sample["image"]),
                "gt": gt,
                "coords": records.joined("coords")[i],
                "labels": records.joined("labels")[i],
                "title": f"image {records.image_ids[i]} #{records.object_index[i]}: IoU {ious[i, -1]:.3f}",
            }
        )
    return plot_worst_objects(panels, path)


def metric_columns(cfg: DictConfig) -> list[tuple[str, str]]:
    """(metric key, column title) of the Markdown table, in order."""
    columns = [(f"mIoU@{k}", f"mIoU@{k}") for k in cfg.clicks if k <= cfg.max_clicks]
    columns += [(f"NoC@{threshold_name(t)}",) * 2 for t in cfg.noc_thresholds]
    columns += [(f"NoF@{threshold_name(t)}",) * 2 for t in cfg.noc_thresholds]
    columns += [
        (f"boundary_mIoU@{k}", f"boundary mIoU@{k}") for k in cfg.boundary_clicks if k <= cfg.max_clicks
    ]
    columns += [("oracle_mIoU@1", "oracle mIoU@1"), ("box_mIoU", "box mIoU")]
    columns += [(f"box_mIoU_{s}", f"box {s}") for s in ("small", "medium", "large")]
    columns += [("iou_calibration", "IoU calibration")]
    return columns


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.startswith("NoF@"):
        return f"{value:.0f}"
    if key.startswith("NoC@"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown_table(cfg: DictConfig, runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per benchmark and checkpoint."""
    columns = metric_columns(cfg)
    lines = [
        "| benchmark | checkpoint | objects | " + " | ".join(title for _, title in columns) + " |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]
    for benchmark, per in runs.items():
        for name, run in per.items():
            cells = [_fmt(key, run["metrics"].get(key)) for key, _ in columns]
            lines.append(
                f"| {benchmark} | {name.replace('|', '/')} | {run['num_objects']} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def write_results(
    cfg: DictConfig, runs: dict[str, dict[str, dict[str, Any]]], output_dir: Path
) -> dict[str, Path]:
    """results.json, results.md and a curves PNG per benchmark; prints the table and the paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    setup = {
        "variant": cfg.variant,
        "image_size": int(cfg.image_size),
        "protocol": protocol_options(cfg),
        "nof_definition": str(cfg.nof_definition),
        "max_objects_per_image": cfg.get("max_objects_per_image"),  # null: every object scored
        "limit_images": cfg.get("limit_images"),  # null: every image
        "benchmarks": {
            name: OmegaConf.to_container(dataset, resolve=True)
            for name, dataset in benchmark_configs(cfg).items()
        },
    }
    paths = {"json": output_dir / RESULTS_JSON, "markdown": output_dir / RESULTS_MD}
    paths["json"].write_text(json.dumps({**setup, "results": runs}, indent=2) + "\n")
    table = markdown_table(cfg, runs)
    capped = cfg.get("max_objects_per_image") is not None or cfg.get("limit_images") is not None
    heading = (
        f"SAM {cfg.variant} at {cfg.image_size} px, RITM protocol at the original resolution, "
        f"{cfg.max_clicks} clicks, output choice {cfg.output_choice}, NoF: {cfg.nof_definition}"
        + (" (a capped quick run, not every object)" if capped else "")
    )
    paths["markdown"].write_text(f"# Evaluation\n\n{heading}\n\n{table}\n")
    for benchmark, per in runs.items():
        paths[f"plot {benchmark}"] = plot_click_curves(
            {name: run["miou_curve"] for name, run in per.items()},
            output_dir / benchmark / CURVES_PNG,
            title=f"{benchmark}: mIoU vs. clicks ({cfg.variant}, {cfg.image_size} px)",
        )
    print(
        "\n".join(["", heading, "", table, "", *(f"{kind}: {path}" for kind, path in paths.items())]),
        flush=True,
    )
    return paths
