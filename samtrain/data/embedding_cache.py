"""Cached image embeddings: the frozen image encoder runs once per image, and the prompt encoder and
mask decoder then train from the stored embeddings (SAM's full click recipe, no augmentation).

A cache folder holds one dataset (one split), all ``numpy`` files, nothing pickled::

    embeddings.npy  (N, C, S/16, S/16) float16 | float32   read memory-mapped (np.load(mmap_mode="r"))
    masks.npy       (total,) uint8                          every mask's COCO compressed-RLE counts, concatenated
    index.npz       ok (N,) bool, input_size (N, 2), original_size (N, 2), image_id (N,) int64,
                    mask_start (N + 1,) int64 (item i owns masks mask_start[i]:mask_start[i+1]),
                    rle_start (M + 1,) int64 (mask m's counts are masks[rle_start[m]:rle_start[m+1]])
    manifest.json   the cache key and what went into it; written last

The masks are cached too, as compressed RLE at the model resolution (S x S): then an item is read
without opening its image file, decoding the dataset's annotations or resizing anything, and RLE
keeps them small (about 1 KB per mask at 1024 px, against 128 KB as packed bits). Decoding them
back is exact.

The key hashes the encoder's weights (every state_dict tensor's bytes), the image size, the pixel
normalisation, the transform's repr, the dataset's identity (annotation file path, mtime and size,
image folder, length), the compute precision and the stored dtype. When a folder's manifest is
missing or its key differs, the cache is rebuilt: the old manifest is deleted first, the data files
are written under temporary names and moved into place with ``os.replace``, and the manifest comes
last, so an interrupted build never leaves a cache that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from samtrain.data.errors import SampleError

__all__ = [
    "CACHE_FORMAT",
    "CachedEmbeddingDataset",
    "build_embedding_cache",
    "cache_key",
    "encoder_fingerprint",
    "ensure_embedding_cache",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
EMBEDDINGS, MASKS, INDEX, MANIFEST = "embeddings.npy", "masks.npy", "index.npz", "manifest.json"


# ------------------------------------------------------------------------------------------------
# the cache key


def encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 over every state_dict entry of ``encoder``: name, dtype, shape and the tensor's bytes."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_identity(path: str | Path) -> dict:
    path = Path(path).resolve()
    stat = path.stat() if path.exists() else None
    return {
        "path": str(path),
        "mtime_ns": stat.st_mtime_ns if stat else None,
        "size": stat.st_size if stat else None,
    }


def dataset_identity(dataset: Dataset) -> dict:
    """What identifies a dataset's content: its ``cache_identity()`` when it has one, else its class,
    length, annotation file (path, mtime, size) and image folder when it has them."""
    identity: dict[str, Any] = {"class": type(dataset).__qualname__, "length": len(dataset)}
    custom = getattr(dataset, "cache_identity", None)
    if callable(custom):
        identity["custom"] = custom()
    for attr in ("annotation_file", "image_dir", "root"):
        value = getattr(dataset, attr, None)
        if value is not None:
            identity[attr] = (
                _file_identity(value) if attr == "annotation_file" else str(Path(value).resolve())
            )
    return identity


def _normalisation(transform: Any, net: nn.Module) -> dict:
    """The pixel mean/std the transform normalises with (its albumentations Normalize steps) and the
    model's own constants."""
    steps = getattr(getattr(transform, "pipeline", None), "transforms", [])
    found = [
        {"mean": np.asarray(s.mean, dtype=float).tolist(), "std": np.asarray(s.std, dtype=float).tolist()}
        for s in steps
        if hasattr(s, "mean") and hasattr(s, "std")
    ]
    model = {
        name: getattr(net, name).flatten().tolist()
        for name in ("pixel_mean", "pixel_std")
        if hasattr(net, name)
    }
    return {"transform": found, "model": model}


def check_eval_transform(dataset: Dataset) -> Any:
    """The dataset's transform; ValueError when it is missing or augments (``train=True``)."""
    transform = getattr(dataset, "transform", None)
    if transform is None:
        raise ValueError(
            f"embedding cache: {type(dataset).__name__} has no transform; it needs the SAM eval transform "
            "(samtrain.data.SamTransform with train=false)"
        )
    if getattr(transform, "train", False):
        raise ValueError(
            f"embedding cache: the transform of {type(dataset).__name__} augments ({transform!r}); cached "
            "embeddings cannot be augmented, use the eval transform (transform.train=false)"
        )
    return transform


def cache_key(
    net: nn.Module, dataset: Dataset, *, dtype: str, precision: str = "32-true"
) -> tuple[str, dict]:
    """(digest, components): the key of ``dataset``'s cache under ``net``'s image encoder."""
    transform = check_eval_transform(dataset)
    components = {
        "format": CACHE_FORMAT,
        "encoder": encoder_fingerprint(net.image_encoder),
        "image_size": int(net.image_size),
        "normalisation": _normalisation(transform, net),
        "transform": repr(transform),
        "dataset": dataset_identity(dataset),
        "precision": str(precision),
        "dtype": dtype,
    }
    digest = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()
    return digest, components


def _changed(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------------
# masks as RLE


def encode_masks(masks: torch.Tensor) -> list[bytes]:
    """bool (K, S, S) -> K compressed-RLE ``counts`` byte strings (pycocotools, column-major)."""
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
    return [rle["counts"] for rle in mask_utils.encode(fortran)]


def decode_masks(counts: list[bytes], size: int) -> torch.Tensor:
    """K compressed-RLE ``counts`` -> bool (K, size, size)."""
    if not counts:
        return torch.zeros(0, size, size, dtype=torch.bool)
    decoded = mask_utils.decode([{"size": [size, size], "counts": c} for c in counts])  # (S, S, K)
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool))


# ------------------------------------------------------------------------------------------------
# building


class _IndexedSamples(Dataset):
    """``(index, sample)`` pairs; an unreadable sample (SampleError) becomes ``(index, None)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict | None]:
        try:
            return index, self.dataset[index]
        except SampleError as err:
            log.warning("embedding cache: skipping sample %d: %s", index, err)
            return index, None


def _as_list(batch: list) -> list:
    return batch


@dataclass
class _Writer:
    """Accumulates items while the encoder runs; embeddings go straight into a memory-mapped file."""

    folder: Path
    dtype: str
    count: int

    def __post_init__(self) -> None:
        self.embeddings: np.memmap | None = None
        self.ok = np.zeros(self.count, dtype=bool)
        self.input_size = np.zeros((self.count, 2), dtype=np.int64)
        self.original_size = np.zeros((self.count, 2), dtype=np.int64)
        self.image_id = np.full(self.count, -1, dtype=np.int64)
        self.masks_per_item = np.zeros(self.count, dtype=np.int64)
        self.rle_lengths: list[int] = []
        self.rle_file = (self.folder / "masks.tmp.bin").open("wb")

    def add(self, index: int, sample: dict, embedding: np.ndarray) -> None:
        """One item in dataset order: its (C, h, w) embedding and its sample's metadata and masks."""
        if self.embeddings is None:
            self.embeddings = np.lib.format.open_memmap(
                self.folder / "embeddings.tmp.npy",
                mode="w+",
                dtype=DTYPES[self.dtype],
                shape=(self.count, *embedding.shape),
            )
        self.embeddings[index] = embedding
        if not np.isfinite(self.embeddings[index]).all():
            raise ValueError(
                f"embedding cache {self.folder}: item {index}'s embedding overflows {self.dtype}; use float32"
            )
        self.ok[index] = True
        self.input_size[index] = np.asarray(sample["input_size"])
        self.original_size[index] = np.asarray(sample["original_size"])
        self.image_id[index] = int(sample["image_id"])
        counts = encode_masks(sample["masks"])
        self.masks_per_item[index] = len(counts)
        for c in counts:
            self.rle_file.write(c)
            self.rle_lengths.append(len(c))

    def finish(self) -> dict:
        """Write every file under its final name (os.replace); returns the manifest's shape fields."""
        self.rle_file.close()
        if self.embeddings is None:
            raise ValueError(f"embedding cache {self.folder}: no sample of the dataset could be read")
        self.embeddings.flush()
        shape = list(self.embeddings.shape)
        del self.embeddings
        raw = self.folder / "masks.tmp.bin"
        total = int(sum(self.rle_lengths))
        blob = np.lib.format.open_memmap(
            self.folder / "masks.tmp.npy", mode="w+", dtype=np.uint8, shape=(total,)
        )
        if total:
            blob[:] = np.memmap(raw, dtype=np.uint8, mode="r", shape=(total,))
        blob.flush()
        del blob
        raw.unlink()
        with (self.folder / "index.tmp.npz").open("wb") as f:
            np.savez(
                f,
                ok=self.ok,
                input_size=self.input_size,
                original_size=self.original_size,
                image_id=self.image_id,
                mask_start=np.concatenate([[0], np.cumsum(self.masks_per_item)]).astype(np.int64),
                rle_start=np.concatenate([[0], np.cumsum(self.rle_lengths, dtype=np.int64)]).astype(np.int64),
            )
        for name in (EMBEDDINGS, MASKS, INDEX):
            stem, ext = name.split(".")
            os.replace(self.folder / f"{stem}.tmp.{ext}", self.folder / name)
        return {
            "embedding_shape": shape,
            "num_masks": len(self.rle_lengths),
            "num_skipped": int((~self.ok).sum()),
        }


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


@torch.no_grad()
def build_embedding_cache(
    dataset: Dataset,
    encoder: nn.Module,
    folder: str | Path,
    *,
    key: str,
    components: dict,
    dtype: str = "float16",
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict:
    """Run ``encoder`` (eval mode, no grad) over every item of ``dataset`` and write the cache folder.

    Args:
        dataset: map-style, items of the SAM sample contract from its eval transform.
        encoder: (B, 3, S, S) -> (B, C, S/16, S/16).
        folder: the cache folder (created); its old manifest is deleted before anything is written.
        key, components: from :func:`cache_key`, stored in the manifest.
        dtype: "float16" (half the disk) or "float32".
        forward_context: wraps each encoder call (e.g. the trainer's autocast).

    Returns:
        The manifest.
    """
    if dtype not in DTYPES:
        raise ValueError(f"embedding cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # from here on the folder is invalid until the end
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    loader = DataLoader(
        _IndexedSamples(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    writer = _Writer(folder=folder, dtype=dtype, count=len(dataset))
    was_training = encoder.training
    encoder.eval()
    start = time.perf_counter()
    try:
        for items in tqdm(loader, desc=f"embedding cache {folder}", unit="batch"):
            good = [(i, s) for i, s in items if s is not None]
            if not good:
                continue
            images = torch.stack([s["image"] for _, s in good]).to(device)
            with forward_context():
                embeddings = encoder(images).float().cpu().numpy()
            for (index, sample), embedding in zip(good, embeddings, strict=True):
                writer.add(index, sample, embedding)
        shapes = writer.finish()
    except BaseException:
        writer.rle_file.close()
        for leftover in folder.glob("*.tmp*"):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        encoder.train(was_training)
    manifest = {
        "key": key,
        "components": components,
        "dtype": dtype,
        "num_items": len(dataset),
        "build_seconds": round(time.perf_counter() - start, 3),
        **shapes,
    }
    _write_json_atomic(folder / MANIFEST, manifest)
    log.info(
        "embedding cache %s: %d images (%d unreadable), %d masks, built in %.1f s",
        folder,
        len(dataset),
        shapes["num_skipped"],
        shapes["num_masks"],
        manifest["build_seconds"],
    )
    return manifest


def _stale_reason(folder: Path, key: str, components: dict) -> str | None:
    """Why the cache in ``folder`` cannot be used (None: it can)."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"no manifest {path} (never built, or an earlier build was interrupted)"
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"unreadable manifest {path}: {err}"
    if manifest.get("key") != key:
        changed = _changed(manifest.get("components", {}), components)
        return f"its key differs (changed: {', '.join(changed) or 'unknown'})"
    try:
        embeddings = np.load(folder / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
        masks = np.load(folder / MASKS, mmap_mode="r", allow_pickle=False)
        with np.load(folder / INDEX, allow_pickle=False) as index:
            rle_total = int(index["rle_start"][-1])
    except (OSError, ValueError, KeyError) as err:
        return f"a data file is missing or unreadable: {err}"
    if list(embeddings.shape) != manifest.get("embedding_shape") or masks.shape != (rle_total,):
        return "the data files do not match the manifest"
    return None


def ensure_embedding_cache(
    dataset: Dataset,
    net: nn.Module,
    folder: str | Path,
    *,
    dtype: str = "float16",
    precision: str = "32-true",
    **build_kwargs,
) -> Path:
    """The cache folder of ``dataset`` under ``net``'s image encoder: reused when its key matches,
    else (re)built with :func:`build_embedding_cache` (the reason is logged). Returns ``folder``."""
    folder = Path(folder)
    key, components = cache_key(net, dataset, dtype=dtype, precision=precision)
    reason = _stale_reason(folder, key, components)
    if reason is None:
        log.info("embedding cache %s: up to date, reused", folder)
        return folder
    if folder.is_dir() and any(folder.iterdir()):
        log.warning("embedding cache %s: rebuilding, %s", folder, reason)
    else:
        log.info("embedding cache %s: building", folder)
    build_embedding_cache(
        dataset,
        net.image_encoder,
        folder,
        key=key,
        components=components,
        dtype=dtype,
        **build_kwargs,
    )
    return folder


# ------------------------------------------------------------------------------------------------
# reading


class CachedEmbeddingDataset(Dataset):
    """Items of the SAM sample contract read from a cache folder, with ``"image_embedding"`` float32
    (C, S/16, S/16) in place of ``"image"``: ``masks`` bool (K, S, S), ``input_size`` (2,),
    ``original_size`` (2,), ``image_id``. An item that was unreadable when the cache was built raises
    :class:`SampleError` (``SkipBadSamples`` skips and counts it, as for the plain dataset).

    Files are opened memory-mapped on first use in each process (DataLoader workers open their own).

    Args:
        folder: a cache folder written by :func:`build_embedding_cache`.
        source: the dataset the cache was built from (kept for reference; never read here).
    """

    def __init__(self, folder: str | Path, *, source: Dataset | None = None) -> None:
        self.folder = Path(folder)
        self.source = source
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"embedding cache {self.folder} has no {MANIFEST}; build it first")
        self.manifest = json.loads(manifest_path.read_text())
        self.image_size = int(self.manifest["components"]["image_size"])
        self._arrays: tuple | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.manifest["num_items"])

    def _open(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        if self._arrays is None or self._pid != os.getpid():
            embeddings = np.load(self.folder / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
            masks = np.load(self.folder / MASKS, mmap_mode="r", allow_pickle=False)
            with np.load(self.folder / INDEX, allow_pickle=False) as f:
                index = {k: f[k] for k in f.files}
            self._arrays, self._pid = (embeddings, masks, index), os.getpid()
        return self._arrays

    def __getstate__(self) -> dict:
        # Workers reopen the files: memory maps never travel, nor the source dataset (not read here).
        return {**self.__dict__, "_arrays": None, "_pid": None, "source": None}

    def embedding(self, index: int) -> torch.Tensor:
        """Item ``index``'s embedding: float32 (C, S/16, S/16), copied out of the memory map."""
        return torch.from_numpy(np.array(self._open()[0][index], dtype=np.float32))

    def mask_counts(self, index: int) -> Iterator[bytes]:
        _, blob, idx = self._open()
        starts = idx["rle_start"]
        for m in range(idx["mask_start"][index], idx["mask_start"][index + 1]):
            yield blob[starts[m] : starts[m + 1]].tobytes()

    def __getitem__(self, index: int) -> dict:
        idx = self._open()[2]
        if not idx["ok"][index]:
            raise SampleError(self.folder, f"item {index} was unreadable when the cache was built")
        return {
            "image_embedding": self.embedding(index),
            "masks": decode_masks(list(self.mask_counts(index)), self.image_size),
            "input_size": torch.from_numpy(idx["input_size"][index].copy()),
            "original_size": torch.from_numpy(idx["original_size"][index].copy()),
            "image_id": int(idx["image_id"][index]),
        }


# ------------------------------------------------------------------------------------------------
# wiring into a Lightning run

SPLITS = ("train", "val", "test")


def check_frozen_encoder(net: nn.Module) -> None:
    """ValueError unless every parameter of ``net.image_encoder`` is frozen (cached embeddings
    cannot carry gradients to the encoder, nor follow its weights as they change)."""
    trainable = [n for n, p in net.image_encoder.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            "cached-embedding mode needs a frozen image encoder: add image_encoder to model.freeze "
            f"({len(trainable)} encoder parameters train, e.g. {trainable[:3]})"
        )


@contextlib.contextmanager
def _module_on(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``module`` to ``device`` for the block, then back where it was."""
    param = next(module.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


def attach_embedding_caches(
    trainer: Any,
    net: nn.Module,
    root: str | Path,
    *,
    dtype: str = "float16",
    batch_size: int = 8,
    num_workers: int = 0,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, CachedEmbeddingDataset]:
    """Replace each ``<split>_dataset`` of ``trainer.datamodule`` by its :class:`CachedEmbeddingDataset`
    in ``root/<split>``, building or refreshing the cache first.

    Global rank zero builds (on the trainer's device, under its precision); the other ranks wait at
    a barrier and then read the same folder. Datasets that are already cached are re-checked against
    their source (a changed encoder rebuilds them).
    """
    check_frozen_encoder(net)
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        raise ValueError("cached-embedding mode needs a datamodule (trainer.fit(module, datamodule=...))")
    attached = {}
    for split in splits:
        dataset = getattr(datamodule, f"{split}_dataset", None)
        if dataset is None:
            continue
        source = dataset.source if isinstance(dataset, CachedEmbeddingDataset) else dataset
        folder = Path(root) / split
        if trainer.is_global_zero:
            device = trainer.strategy.root_device
            with _module_on(net.image_encoder, device):
                ensure_embedding_cache(
                    source,
                    net,
                    folder,
                    dtype=dtype,
                    precision=str(trainer.precision),
                    batch_size=batch_size,
                    num_workers=num_workers,
                    device=device,
                    forward_context=trainer.precision_plugin.forward_context,
                )
        trainer.strategy.barrier(f"embedding_cache_{split}")
        attached[split] = CachedEmbeddingDataset(folder, source=source)
        setattr(datamodule, f"{split}_dataset", attached[split])
    return attached
