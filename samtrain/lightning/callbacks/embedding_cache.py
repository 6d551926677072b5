"""Cached-embedding mode: :class:`EmbeddingCache` runs the frozen image encoder once per image at
setup and trains the prompt encoder and mask decoder from the stored embeddings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from samtrain.data.embedding_cache import attach_embedding_caches, encoder_fingerprint

log = logging.getLogger(__name__)


class EmbeddingCache(pl.Callback):
    """Cached-embedding mode: at setup, the frozen image encoder runs once over every image of the
    datamodule's datasets (eval transform, no augmentation), the embeddings and masks go to
    ``<dir>/<split>`` (see :mod:`samtrain.data.embedding_cache`), and the datasets are replaced by
    readers of those caches, so each step runs the prompt encoder and mask decoder only.

    A cache is reused while its key (encoder weights, image size, preprocessing, dataset, precision,
    dtype) matches and rebuilt otherwise. The image encoder must be frozen (``model.freeze``).
    Runs on every rank (each builds or reads the caches of its datasets).

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
        if encoder_fingerprint(pl_module.net.image_encoder) != self.encoder_digest:
            log.warning("EmbeddingCache: the encoder changed after setup (checkpoint restore); re-checking")
            self._attach(trainer, pl_module)
