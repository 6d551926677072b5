"""Lightning callbacks that show a run: prediction pictures, metric curves, the checkpoint on wandb.

- :class:`PredictionGallery`: at each validation during fit, a grid of a few fixed validation
  objects with the ground truth and the predictions of the box prompt and of the click protocol
  (clicks drawn green/red, the box drawn), saved as ``<run dir>/gallery/epoch{epoch:03d}.png``
  and logged to every :class:`~pytorch_lightning.loggers.WandbLogger` as ``wandb.Image`` with
  ground-truth and prediction masks.
- :class:`MetricCurves`: at the end of fit, ``<run dir>/curves.png`` with the training loss and
  the validation metrics, also logged to wandb.
- :class:`WandbCheckpointArtifact`: at the end of fit, the last (and best) Lightning checkpoint
  as a wandb artifact of type ``"model"``; works offline (uploaded by ``wandb sync``).

All of them work on global rank zero only, and none of them fails the run: an error is logged
as a warning.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from samtrain import visualize as vis
from samtrain.evaluation import box_prediction, trace_clicks

__all__ = [
    "EmbeddingCache",
    "MetricCurves",
    "PredictionGallery",
    "SkippedSamplesBudget",
    "WandbCheckpointArtifact",
    "log_wandb_artifact",
    "read_metrics_csv",
    "trace_interaction",
]

log = logging.getLogger(__name__)

MASK_CLASSES = {0: "background", 1: "object"}


# ----------------------------------------------------------------------------------------------------------
# the evaluation protocols, recording prompts and predictions


@torch.no_grad()
def trace_interaction(
    model: Any,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    image_indices: torch.Tensor,
    input_sizes: torch.Tensor,
    num_clicks: int,
) -> dict[str, torch.Tensor]:
    """The box and click protocols of :mod:`samtrain.evaluation`, keeping every prompt and prediction.

    The same rules as :func:`samtrain.evaluation.click_curve` and :func:`samtrain.evaluation.box_iou`
    (centre clicks; the best multimask output at the first click, the single-mask output and the
    fed-back logits after it), for the few masks of a picture.

    Args:
        model: ``Sam`` (anything with ``image_size`` and ``decode_masks``).
        image_embeddings: ``(B, C, h, w)``.
        gt_masks: ``(N, S, S) bool`` in the padded model input frame.
        image_indices: ``(N,) int64``.
        input_sizes: ``(B, 2) int64`` ``(h, w)`` of each image's unpadded region.
        num_clicks: K >= 1.

    Returns:
        ``"boxes"`` ``(N, 4) float32`` xyxy with inclusive pixel corners, ``"box_masks"``
        ``(N, S, S) bool``, ``"box_ious"`` ``(N,) float32``; ``"click_coords"`` ``(N, K, 2) float32``
        ``(x, y)``, ``"click_labels"`` ``(N, K) int64`` (1 positive, 0 negative), ``"click_masks"``
        ``(N, K, S, S) bool`` (index k-1: after k clicks), ``"click_ious"`` ``(N, K) float32``.
    """
    kwargs = dict(image_indices=image_indices, input_sizes=input_sizes)
    clicks = trace_clicks(model, image_embeddings, gt_masks, max_clicks=num_clicks, keep_masks=True, **kwargs)
    boxes, box_masks, box_ious, _ = box_prediction(model, image_embeddings, gt_masks, **kwargs)
    return {
        "boxes": boxes,
        "box_masks": box_masks,
        "box_ious": box_ious,
        "click_coords": clicks.coords,
        "click_labels": clicks.labels,
        "click_masks": clicks.masks,
        "click_ious": clicks.ious,
    }


# ----------------------------------------------------------------------------------------------------------
# small helpers


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _run_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def _sharded(trainer: pl.Trainer) -> bool:
    """True for strategies whose rank zero cannot run the model alone (FSDP, DeepSpeed, ...)."""
    name = type(trainer.strategy).__name__
    return any(s in name for s in ("FSDP", "DeepSpeed", "ModelParallel"))


def _save_png(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def log_wandb_artifact(
    loggers: Iterable[Logger],
    path: str | Path,
    *,
    name: str | None = None,
    type: str = "model",
    aliases: Sequence[str] = ("latest",),
    metadata: dict | None = None,
    policy: str = "mutable",
) -> int:
    """Log a file as a wandb artifact to every WandbLogger among ``loggers``.

    Works offline: the artifact is recorded in the offline run and uploaded by ``wandb sync``.
    With ``policy="mutable"`` wandb copies the file to its staging folder (``$WANDB_DATA_DIR``),
    so later changes to it do not change the artifact; ``"immutable"`` references it in place.

    Args:
        path: the file.
        name: artifact name (default ``model-<run id>``, as Lightning's ``log_model`` names it).

    Returns:
        The number of runs it was logged to.
    """
    import wandb

    path = Path(path)
    count = 0
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        artifact = wandb.Artifact(name=name or f"model-{run.id}", type=type, metadata=metadata or {})
        artifact.add_file(str(path), name=path.name, policy=policy)
        run.log_artifact(artifact, aliases=list(aliases))
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------------
# the gallery


class PredictionGallery(pl.Callback):
    """Pictures of a fixed set of validation objects at each validation during fit.

    The set: the first ``num_images`` images that have masks in the first validation run (not
    the sanity check), at most ``max_masks`` masks each, kept on the CPU. Each object is a row:
    image | ground truth | box prediction (box drawn) | prediction after 1 click | after
    ``num_clicks`` clicks (clicks drawn: green positive, red negative); predictions are filled
    blue with the ground-truth contour in gold; labels give the IoU. The grid is saved as
    ``<dirpath>/<filename>.png`` and, for every WandbLogger, logged under ``log_key`` (one
    ``wandb.Image`` per object with ``ground_truth`` and ``prediction`` masks, the prediction
    after ``num_clicks`` clicks) and ``<log_key>_grid`` (the grid).

    Args:
        num_images: images in the set.
        max_masks: objects per image.
        num_clicks: clicks of the click protocol (panels after 1 and after ``num_clicks``).
        panel_size: the longer side of each panel in pixels (images are scaled to it).
        dirpath: where the PNGs go (default ``<trainer.default_root_dir>/gallery``).
        filename: format string with ``epoch`` and ``step``.
        log_key: wandb key.
    """

    def __init__(
        self,
        *,
        num_images: int = 4,
        max_masks: int = 2,
        num_clicks: int = 3,
        panel_size: int = 256,
        dirpath: str | Path | None = None,
        filename: str = "epoch{epoch:03d}",
        log_key: str = "val/gallery",
    ) -> None:
        if num_images < 1 or max_masks < 1 or num_clicks < 1:
            raise ValueError("num_images, max_masks and num_clicks must be >= 1")
        self.num_images = num_images
        self.max_masks = max_masks
        self.num_clicks = num_clicks
        self.panel_size = panel_size
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.log_key = log_key
        self.samples: list[dict[str, Any]] = []
        self._collecting = True

    # -------------------------------------------------------------- hooks

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            self._collecting
            and not trainer.sanity_checking
            and dataloader_idx == 0
            and trainer.is_global_zero
        ):
            self.collect(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._collecting = False  # the set is fixed after the first real validation run
        if trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero or not self.samples:
            return
        if _sharded(trainer):
            log.warning("PredictionGallery: skipped under %s", type(trainer.strategy).__name__)
            return
        try:
            self.write(trainer, pl_module)
        except Exception:
            log.warning("PredictionGallery failed; training goes on", exc_info=True)

    # -------------------------------------------------------------- work

    def collect(self, batch: dict) -> None:
        """Keep the images of ``batch`` that have masks, on the CPU, until there are ``num_images``."""
        if "image" not in batch:  # every sample was unreadable
            return
        for b in range(batch["image"].shape[0]):
            if len(self.samples) >= self.num_images:
                return
            masks = batch["masks"][batch["mask_image_index"] == b][: self.max_masks]
            if len(masks) == 0:
                continue
            image_id = batch["image_id"][b] if "image_id" in batch else len(self.samples)
            self.samples.append(
                {
                    # Copies: a view would keep the whole batch alive.
                    "image": batch["image"][b].detach().to("cpu", torch.float32, copy=True),
                    "masks": masks.detach().to("cpu", torch.bool, copy=True),
                    "input_size": batch["input_size"][b].detach().to("cpu", copy=True),
                    "image_id": int(image_id),
                }
            )

    def predict(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """Both protocols on the kept objects (model in eval mode, no grad), results on the CPU."""
        net = getattr(pl_module, "net", pl_module)
        was_training = net.training
        net.eval()
        try:
            param = next(net.image_encoder.parameters())
            images = torch.stack([s["image"] for s in self.samples]).to(param.device, param.dtype)
            masks = torch.cat([s["masks"] for s in self.samples]).to(param.device)
            counts = torch.tensor([len(s["masks"]) for s in self.samples])
            indices = torch.repeat_interleave(torch.arange(len(self.samples)), counts).to(param.device)
            sizes = torch.stack([s["input_size"] for s in self.samples]).to(param.device)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                embeddings = net.image_encoder(images)
                out = trace_interaction(
                    net,
                    embeddings,
                    masks,
                    image_indices=indices,
                    input_sizes=sizes,
                    num_clicks=self.num_clicks,
                )
        finally:
            net.train(was_training)
        out = {k: v.cpu() for k, v in out.items()}
        out["gt_masks"] = masks.cpu()
        out["image_indices"] = indices.cpu()
        return out

    def render(self, out: dict[str, torch.Tensor]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The grid ``(H, W, 3) uint8`` and, per object, what wandb gets (image, masks, caption)."""
        clicks_shown = sorted({1, self.num_clicks})
        rows, objects = [], []
        seen: dict[int, int] = defaultdict(int)
        for i, b in enumerate(out["image_indices"].tolist()):
            sample = self.samples[b]
            h, w = (int(v) for v in sample["input_size"])
            scale = self.panel_size / max(h, w)
            base = vis.resize_image(vis.unnormalize_image(sample["image"].numpy(), (h, w)), scale)

            def crop(mask: torch.Tensor, h=h, w=w, scale=scale) -> np.ndarray:
                return vis.resize_mask(mask[:h, :w].numpy(), scale)

            def to_panel(xy: np.ndarray, scale=scale) -> np.ndarray:
                return (xy + 0.5) * scale - 0.5  # pixel centres of the model frame -> of the panel

            gt = crop(out["gt_masks"][i])
            obj = seen[b]
            seen[b] += 1
            x1, y1, x2, y2 = out["boxes"][i].tolist()
            box = (x1 * scale, y1 * scale, (x2 + 1) * scale - 1, (y2 + 1) * scale - 1)
            row = [
                vis.label_panel(base, f"image {sample['image_id']} obj {obj}"),
                vis.label_panel(vis.overlay_mask(base, gt, vis.GT_COLOR), "ground truth"),
                vis.label_panel(
                    vis.draw_box(vis.overlay_masks(base, gt=gt, pred=crop(out["box_masks"][i])), box),
                    f"box IoU {float(out['box_ious'][i]):.2f}",
                ),
            ]
            coords = to_panel(out["click_coords"][i].numpy())
            labels = out["click_labels"][i].numpy()
            for k in clicks_shown:
                panel = vis.overlay_masks(base, gt=gt, pred=crop(out["click_masks"][i, k - 1]))
                panel = vis.draw_clicks(panel, coords[:k], labels[:k])
                noun = "click" if k == 1 else "clicks"
                row.append(vis.label_panel(panel, f"{k} {noun} IoU {float(out['click_ious'][i, k - 1]):.2f}"))
            rows.append(row)
            k = self.num_clicks
            size = (self.panel_size, self.panel_size)  # one size for all: wandb shows a list of images alike
            objects.append(
                {
                    "image": vis.pad_to(
                        vis.draw_clicks(base, coords[:k], labels[:k]), *size, vis.BACKGROUND_COLOR
                    ),
                    "masks": {
                        "ground_truth": {
                            "mask_data": vis.pad_to(gt.astype(np.uint8), *size),
                            "class_labels": MASK_CLASSES,
                        },
                        "prediction": {
                            "mask_data": vis.pad_to(
                                crop(out["click_masks"][i, k - 1]).astype(np.uint8), *size
                            ),
                            "class_labels": MASK_CLASSES,
                        },
                    },
                    "caption": (
                        f"image {sample['image_id']} obj {obj}: {k} clicks IoU "
                        f"{float(out['click_ious'][i, k - 1]):.2f}, box IoU {float(out['box_ious'][i]):.2f}"
                    ),
                }
            )
        return vis.make_grid(rows), objects

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Predict, render, save the PNG and log to wandb; returns the PNG's path."""
        grid, objects = self.render(self.predict(trainer, pl_module))
        dirpath = self.dirpath or _run_dir(trainer) / "gallery"
        name = self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step)
        path = _save_png(grid, dirpath / f"{name}.png")
        for logger in _wandb_loggers(trainer):
            logger.log_image(
                key=self.log_key,
                images=[o["image"] for o in objects],
                step=trainer.global_step,
                masks=[o["masks"] for o in objects],
                caption=[o["caption"] for o in objects],
            )
            logger.log_image(
                key=f"{self.log_key}_grid", images=[grid], step=trainer.global_step, caption=[name]
            )
        return path


# ----------------------------------------------------------------------------------------------------------
# curves


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A Lightning CSVLogger's ``metrics.csv`` -> ``{metric: [(step, value), ...]}`` (non-empty cells)."""
    history: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    history[key].append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return dict(history)


class MetricCurves(pl.Callback):
    """``curves.png`` at the end of fit: the training loss per step and the validation metrics.

    The history comes from the CSVLogger's ``metrics.csv`` when there is one (it also holds the
    part of a run before a resume); otherwise the callback records ``trainer.callback_metrics``
    itself (``train_keys`` every ``log_every_n_steps`` steps, ``val_prefix`` metrics after each
    validation). Validation metrics are plotted against the global step, so a validation before
    training is the point at step 0. The picture is also logged to every WandbLogger under
    ``log_key``.

    Args:
        path: the PNG (default ``<trainer.default_root_dir>/curves.png``).
        train_keys: training metrics to plot (those present).
        val_prefix: validation metrics to plot: every key with this prefix.
        log_key: wandb key.
    """

    def __init__(
        self,
        *,
        path: str | Path | None = None,
        train_keys: Sequence[str] = ("train/loss",),
        val_prefix: str = "val/",
        log_key: str = "curves",
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.train_keys = tuple(train_keys)
        self.val_prefix = val_prefix
        self.log_key = log_key
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def _recording(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and not any(isinstance(lg, CSVLogger) for lg in trainer.loggers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._recording(trainer) or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        for key in self.train_keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history[key].append((trainer.global_step, float(value)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._recording(trainer):
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith(self.val_prefix) and getattr(value, "numel", lambda: 1)() == 1:
                self.history[key].append((trainer.global_step, float(value)))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self.write(trainer)
        except Exception:
            log.warning("MetricCurves failed", exc_info=True)

    def read_history(self, trainer: pl.Trainer) -> dict[str, list[tuple[int, float]]]:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()  # flush what is pending (loggers are finalized after on_fit_end)
                path = Path(logger.log_dir) / "metrics.csv"
                if path.is_file():
                    return read_metrics_csv(path)
        return dict(self.history)

    def write(self, trainer: pl.Trainer) -> Path | None:
        history = self.read_history(trainer)
        train = {k: history[k] for k in self.train_keys if history.get(k)}
        val = {k: v for k, v in sorted(history.items()) if k.startswith(self.val_prefix) and v}
        if not train and not val:
            return None
        path = self.path or _run_dir(trainer) / "curves.png"
        plot_curves(train, val, path)
        for logger in _wandb_loggers(trainer):
            logger.log_image(key=self.log_key, images=[str(path)], step=trainer.global_step)
        return path


def plot_curves(
    train: dict[str, list[tuple[int, float]]], val: dict[str, list[tuple[int, float]]], path: str | Path
) -> Path:
    """Save a PNG: training metrics, validation IoU metrics (mIoU@k, box mIoU, ...) and the other
    validation metrics (NoC, NoF), each against the global step; ``(step, value)`` lists."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    val_iou = {k: v for k, v in val.items() if "IoU" in k or "calibration" in k}
    val_other = {k: v for k, v in val.items() if k not in val_iou}
    groups = [
        (g, t) for g, t in ((train, "training"), (val_iou, "validation"), (val_other, "validation")) if g
    ]
    fig = Figure(figsize=(5.5 * len(groups), 4.0), dpi=100, layout="constrained")
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
    out, current = [], math.nan
    for v in values:
        current = v if math.isnan(current) else (1 - alpha) * current + alpha * v
        out.append(current)
    return out


# ----------------------------------------------------------------------------------------------------------
# checkpoint artifact


class SkippedSamplesBudget(pl.Callback):
    """Adds up the samples the loaders could not read (``batch["num_skipped"]``), logs the totals
    (``data/skipped_train``, ``data/skipped_val``) and stops the run with a clear error once more
    than ``max_skipped`` training samples failed. Each skipped file and its reason is in the log."""

    def __init__(self, *, max_skipped: int = 100) -> None:
        self.max_skipped = max_skipped
        self.skipped = {"train": 0, "val": 0}

    def _count(self, pl_module: pl.LightningModule, batch: dict, stage: str) -> None:
        skipped = int(batch.get("num_skipped", 0))
        if not skipped:
            return
        self.skipped[stage] += skipped
        pl_module.log(f"data/skipped_{stage}", float(self.skipped[stage]), reduce_fx="max")
        if stage == "train" and self.skipped[stage] > self.max_skipped:
            raise RuntimeError(
                f"{self.skipped[stage]} training samples could not be read, more than the budget of "
                f"{self.max_skipped} (callbacks.skipped_samples.max_skipped); the log names each file and reason"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._count(pl_module, batch, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(pl_module, batch, "val")

    def state_dict(self) -> dict:
        return dict(self.skipped)

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped.update(state_dict)


class WandbCheckpointArtifact(pl.Callback):
    """At the end of fit, the last and the best checkpoint of each ModelCheckpoint as ``"model"``
    artifacts of every WandbLogger (aliases ``latest`` / ``best``; one version when they are the
    same file). Offline runs keep them for ``wandb sync``. Loggers with Lightning's own
    ``log_model`` on are left to it.

    Args:
        name: artifact name (default ``model-<run id>``).
        log_best: also log the best checkpoint when it differs from the last.
        policy: ``"mutable"`` (wandb copies the file into its staging folder until it is uploaded)
            or ``"immutable"`` (referenced in place: no copy, but the file must not change before
            ``wandb sync``).
    """

    def __init__(self, *, name: str | None = None, log_best: bool = True, policy: str = "mutable") -> None:
        self.name = name
        self.log_best = log_best
        self.policy = policy

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in _wandb_loggers(trainer) if not getattr(lg, "_log_model", False)]
        if not loggers:
            return
        try:
            for path, aliases, metadata in self.checkpoints(trainer):
                log_wandb_artifact(
                    loggers, path, name=self.name, aliases=aliases, metadata=metadata, policy=self.policy
                )
        except Exception:
            log.warning("WandbCheckpointArtifact failed", exc_info=True)

    def checkpoints(self, trainer: pl.Trainer) -> list[tuple[Path, list[str], dict]]:
        """``(path, aliases, metadata)`` of the files to log."""
        files: dict[Path, tuple[Path, list[str], dict]] = {}  # keyed by the resolved path
        for callback in trainer.checkpoint_callbacks:
            last = getattr(callback, "last_model_path", "")
            best = getattr(callback, "best_model_path", "") if self.log_best else ""
            score = getattr(callback, "best_model_score", None)
            for path, alias in ((last, "latest"), (best, "best")):
                if not path or not Path(path).is_file():
                    continue
                _, aliases, metadata = files.setdefault(Path(path).resolve(), (Path(path), [], {}))
                aliases.append(alias)
                metadata.update(global_step=trainer.global_step, monitor=getattr(callback, "monitor", None))
                if alias == "best" and score is not None:
                    metadata["score"] = float(score)
        return list(files.values())


class EmbeddingCache(pl.Callback):
    """Cached-embedding mode: at setup, the frozen image encoder runs once over every image of the
    datamodule's datasets (eval transform, no augmentation), the embeddings and masks go to
    ``<dir>/<split>`` (see :mod:`samtrain.data.embedding_cache`), and the datasets are replaced by
    readers of those caches, so each step runs the prompt encoder and mask decoder only.

    A cache is reused while its key (encoder weights, image size, preprocessing, dataset, precision,
    dtype) matches and rebuilt otherwise. The image encoder must be frozen (``model.freeze``).

    Args:
        dir: the cache root; one sub-folder per split.
        dtype: "float16" (2 MiB per image at 1024 px) or "float32".
        batch_size: images per encoder call while building.
        num_workers: DataLoader workers reading images while building.
    """

    def __init__(
        self, *, dir: str | Path, dtype: str = "float16", batch_size: int = 8, num_workers: int = 0
    ) -> None:
        self.dir = Path(dir)
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.encoder_digest: str | None = None

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from samtrain.data.embedding_cache import attach_embedding_caches

        attached = attach_embedding_caches(
            trainer,
            pl_module.net,
            self.dir,
            dtype=self.dtype,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        digests = {d.manifest["components"]["encoder"] for d in attached.values()}
        self.encoder_digest = digests.pop() if len(digests) == 1 else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attach(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run restores the weights after setup: a checkpoint with another encoder rebuilds.
        from samtrain.data.embedding_cache import encoder_fingerprint

        if encoder_fingerprint(pl_module.net.image_encoder) != self.encoder_digest:
            log.warning("EmbeddingCache: the encoder changed after setup (checkpoint restore); re-checking")
            self._attach(trainer, pl_module)
