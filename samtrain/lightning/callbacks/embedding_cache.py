"""Cached-embedding mode: :class:`EmbeddingCache` runs the frozen image encoder once per image at
setup and trains the prompt encoder and mask decoder from the stored embeddings. The storage (key,
build, validation, reading) is :mod:`samtrain.data.embedding_cache`; this module is the wiring into
the trainer and the datamodule."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from samtrain.data.datamodule import SamDataModule
from samtrain.data.embedding_cache import (
    CachedEmbeddingDataset,
    encoder_fingerprint,
    ensure_embedding_cache,
)
from samtrain.distributed import is_sharded

log = logging.getLogger(__name__)


def check_frozen_encoder(net: nn.Module) -> None:
    """ValueError unless ``net`` is a SAM (or SAM 2.1) whose ``image_encoder`` parameters are all frozen (cached
    embeddings cannot carry gradients to the encoder, nor follow its weights as they change)."""
    trainable = [n for n, p in net.image_encoder.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            "cached-embedding mode needs a frozen image encoder: add image_encoder to model.freeze "
            f"({len(trainable)} encoder parameters train, e.g. {trainable[:3]})"
        )


@contextlib.contextmanager
def module_on(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``module`` to ``device`` for the block, then back where it was."""
    param = next(module.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


class EmbeddingCache(pl.Callback):
    """Cached-embedding mode: at setup, the frozen image encoder runs once over every image of the
    datamodule's datasets (eval transform, no augmentation), the embeddings and masks go to
    ``<dir>/<split>`` (see :mod:`samtrain.data.embedding_cache`), and the datamodule's datasets are
    replaced by readers of those caches (``SamDataModule.replace_datasets``), so each step runs the
    prompt encoder and mask decoder only.

    A cache is reused while its key matches (encoder weights, image size, preprocessing, transform,
    the dataset's class, sample-changing arguments and split, the content of every file it reads,
    precision, dtype) and rebuilt otherwise; the log says what changed. The image encoder must be
    frozen (``model.freeze``). Global rank zero builds (on the trainer's device, under its
    precision); the other ranks wait at a barrier and read the same folder.

    Args:
        dir: the cache root; one sub-folder per split.
        dtype: "float16" (at 1024 px 2 MiB per image, SAM 2.1's three levels 8 MiB) or "float32".
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

    def attach(self, trainer: pl.Trainer, net: nn.Module) -> dict[str, CachedEmbeddingDataset]:
        """Build or check the cache of each dataset of ``trainer.datamodule`` and swap it in. Datasets
        that are already cached are checked again against their source (a changed encoder rebuilds)."""
        check_frozen_encoder(net)
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, SamDataModule):
            raise ValueError(
                "cached-embedding mode needs a SamDataModule (trainer.fit(module, datamodule=...)), "
                f"got {type(datamodule).__name__}"
            )
        attached = {}
        for split, dataset in datamodule.datasets().items():
            source = dataset.source if isinstance(dataset, CachedEmbeddingDataset) else dataset
            folder = self.dir / split
            if trainer.is_global_zero:
                self.build(trainer, net, source, folder)
            trainer.strategy.barrier(f"embedding_cache_{split}")
            attached[split] = CachedEmbeddingDataset(folder, source=source)
        datamodule.replace_datasets(attached)
        digests = {d.manifest["components"]["encoder"] for d in attached.values()}
        self.encoder_digest = digests.pop() if len(digests) == 1 else None
        return attached

    def build(self, trainer: pl.Trainer, net: nn.Module, dataset, folder: Path) -> None:
        device = trainer.strategy.root_device
        with module_on(net.image_encoder, device):
            ensure_embedding_cache(
                dataset,
                net,
                folder,
                dtype=self.dtype,
                precision=str(trainer.precision),
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                device=device,
                forward_context=trainer.precision_plugin.forward_context,
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if is_sharded(trainer):
            raise ValueError(
                f"cached embeddings do not run under {type(trainer.strategy).__name__}: they train the "
                "prompt encoder and mask decoder only, which need no sharding; use trainer=ddp"
            )
        self.attach(trainer, pl_module.net)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run restores the weights after setup: a checkpoint with another encoder rebuilds.
        if encoder_fingerprint(pl_module.net.image_encoder) != self.encoder_digest:
            log.warning("EmbeddingCache: the encoder changed after setup (checkpoint restore); re-checking")
            self.attach(trainer, pl_module.net)
