"""samtrain's Lightning callbacks, one module per concern.

- :mod:`~samtrain.lightning.callbacks.gallery`: :class:`PredictionGallery`, pictures of a few fixed
  validation objects with the box and click predictions at each validation during fit.
- :mod:`~samtrain.lightning.callbacks.curves`: :class:`MetricCurves`, ``curves.png`` of the training loss
  and the validation metrics at the end of fit; :func:`read_metrics_csv`.
- :mod:`~samtrain.lightning.callbacks.wandb_artifacts`: :class:`WandbCheckpointArtifact`, the last and best
  checkpoints as wandb artifacts at the end of fit; :func:`log_wandb_artifact`.
- :mod:`~samtrain.lightning.callbacks.skipped`: :class:`SkippedSamplesBudget`, counts the samples the
  loaders could not read over all ranks and stops the run past a budget.
- :mod:`~samtrain.lightning.callbacks.embedding_cache`: :class:`EmbeddingCache`, cached-embedding mode
  (the frozen image encoder runs once per image, at setup).

The first three only show a run: they work on global rank zero and never fail it (an error is
logged as a warning). The last two run on every rank and change the run: SkippedSamplesBudget
raises by design, on every rank at the same step; EmbeddingCache replaces the datasets.

:func:`~samtrain.interactive.protocols.trace_interaction` and :func:`~samtrain.plots.plot_curves`, which the
callbacks use, live in :mod:`samtrain.interactive.protocols` and :mod:`samtrain.plots`; they stay importable
from here.
"""

from samtrain.interactive.protocols import trace_interaction
from samtrain.lightning.callbacks.curves import MetricCurves, read_metrics_csv
from samtrain.lightning.callbacks.embedding_cache import EmbeddingCache
from samtrain.lightning.callbacks.gallery import PredictionGallery
from samtrain.lightning.callbacks.skipped import SkippedSamplesBudget
from samtrain.lightning.callbacks.wandb_artifacts import (
    WandbCheckpointArtifact,
    log_wandb_artifact,
    wandb_run_id,
)
from samtrain.plots import plot_curves

__all__ = [
    "EmbeddingCache",
    "MetricCurves",
    "PredictionGallery",
    "SkippedSamplesBudget",
    "WandbCheckpointArtifact",
    "log_wandb_artifact",
    "plot_curves",
    "read_metrics_csv",
    "trace_interaction",
    "wandb_run_id",
]
