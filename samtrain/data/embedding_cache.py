"""Cached image embeddings, the storage: build a cache folder, validate it against its key, read it.
Nothing here touches a trainer (the Lightning wiring is
:class:`samtrain.lightning.callbacks.EmbeddingCache`).

The frozen image encoder runs once per image, and the prompt encoder and mask decoder then train
from the stored embeddings (SAM's full click recipe, no augmentation). A cache folder holds one
dataset (one split), all ``numpy`` or JSON files, nothing pickled::

    embeddings.npy  (N, C, S/16, S/16) float16 | float32   read memory-mapped (np.load(mmap_mode="r"))
    embeddings.L.npy                                        level L >= 1 of a multi-level encoder
                    (SAM 2.1: 1 is (N, C/4, S/8, S/8), 2 is (N, C/8, S/4, S/4))
    masks.npy       (total,) uint8                          every mask's COCO compressed-RLE counts, concatenated
    index.npz       ok (N,) bool, input_size (N, 2), original_size (N, 2), image_id (N,) int64,
                    mask_start (N + 1,) int64 (item i owns masks mask_start[i]:mask_start[i+1]),
                    rle_start (M + 1,) int64 (mask m's counts are masks[rle_start[m]:rle_start[m+1]])
    sources.json    every file the dataset reads: its SHA-256 and the stat it was hashed at
    manifest.json   the cache key and what went into it; written last

An encoder's output is stored as the model's ``feature_levels`` of it (SAM: its one embedding;
SAM 2.1: the top level and its two finer levels, as the mask decoder reads them) and read back
with ``features_from_levels``.

The masks are cached too, as compressed RLE at the model resolution (S x S): then an item is read
without opening its image file, decoding the dataset's annotations or resizing anything, and RLE
keeps them small (about 1 KB per mask at 1024 px, against 128 KB as packed bits). Decoding them
back is exact.

The key covers everything that changes a cached item:

- the encoder's weights (every state_dict tensor's bytes), the image size, the pixel
  normalisation (the model's and the transform's), the transform's repr, the compute precision and
  the stored dtype;
- the dataset: its class, every constructor argument that changes a sample (its ``SAMPLE_ARGS``,
  the split among them; see :mod:`samtrain.data.base`) and its length;
- the content of every file it reads (its ``source_files()``): a SHA-256 per file, computed once
  and kept in ``sources.json``. A later check hashes again only the files whose size, mtime,
  ctime or inode changed, so a file rewritten in place with the same size and its mtime kept
  (``cp -p``, ``rsync -t``) is still seen (the ctime changes), and a file only touched is not
  rebuilt for (its hash is the same).

When only the content of per-item files changed (an image or mask rewritten; the dataset's
``sample_files(index)`` says which items read them), only those items are encoded again and the
rest is copied from the old cache; any other change rebuilds the whole cache. The log says what
changed. A rebuild deletes the old manifest first, writes the data files under temporary names,
moves them into place with ``os.replace`` and writes the manifest last, so an interrupted build
never leaves a cache that looks valid.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from samtrain.data.base import undeclared_arguments
from samtrain.data.errors import SampleError

__all__ = [
    "CACHE_FORMAT",
    "CachedEmbeddingDataset",
    "build_embedding_cache",
    "cache_key",
    "dataset_description",
    "encoder_fingerprint",
    "ensure_embedding_cache",
    "hash_source_files",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 3: one file per feature level
DTYPES = {"float16": np.float16, "float32": np.float32}
MASKS, INDEX = "masks.npy", "index.npz"
SOURCES, MANIFEST = "sources.json", "manifest.json"


def level_file(level: int) -> str:
    """The file of feature level ``level``: ``embeddings.npy`` for the top one."""
    return "embeddings.npy" if level == 0 else f"embeddings.{level}.npy"


def temporary(name: str) -> str:
    return f"{name}.tmp"


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


def canonical(value: Any) -> Any:
    """A JSON value that equals another's exactly when the two arguments select the same samples:
    paths absolute, sets sorted, tuples as lists, numpy scalars as Python numbers."""
    if isinstance(value, Path):
        return os.path.abspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(v) for v in value), key=repr)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def dataset_description(dataset: Dataset) -> dict:
    """The dataset's part of the key: its class, its ``SAMPLE_ARGS`` values and its length.
    ValueError when the dataset does not follow the contract of :mod:`samtrain.data.base`."""
    cls = type(dataset)
    name = f"{cls.__module__}.{cls.__qualname__}"
    problems = undeclared_arguments(cls)
    if not hasattr(cls, "SAMPLE_ARGS") or not callable(getattr(dataset, "source_files", None)):
        problems.insert(0, "it declares no SAMPLE_ARGS / source_files()")
    missing = [a for a in getattr(cls, "SAMPLE_ARGS", ()) if not hasattr(dataset, a)]
    problems += [f"SAMPLE_ARGS names {a!r}, which the instance does not keep" for a in missing]
    if problems:
        raise ValueError(
            f"embedding cache: {name} cannot be keyed: {'; '.join(problems)} (the dataset contract is in "
            "samtrain.data.base: SAMPLE_ARGS, NON_SAMPLE_ARGS, source_files())"
        )
    args = {a: canonical(getattr(dataset, a)) for a in cls.SAMPLE_ARGS}
    return {"class": name, "args": args, "length": len(dataset)}


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


def _file_name(path: str | Path) -> str:
    return os.path.abspath(path)


def _stat(path: str) -> list[int] | None:
    """What a cheap check compares: size, mtime, ctime (which ``cp -p`` / ``rsync -t`` cannot keep)
    and inode; None for a missing file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_source_files(paths: Iterable[str | Path], known: dict[str, dict] | None = None) -> dict[str, dict]:
    """``{absolute path: {"stat": [size, mtime_ns, ctime_ns, inode] | None, "sha256": str | None}}``
    for ``paths`` (None for a missing file). A file whose stat equals its entry in ``known`` keeps
    that entry's hash; the others are read and hashed (with a progress bar)."""
    known = known or {}
    table: dict[str, dict] = {}
    to_hash = []
    for name in sorted({_file_name(p) for p in paths}):
        stat = _stat(name)
        entry = known.get(name)
        if stat is None or (entry is not None and entry.get("stat") == stat):
            table[name] = {"stat": stat, "sha256": entry["sha256"] if stat is not None else None}
        else:
            to_hash.append((name, stat))
    for name, stat in tqdm(
        to_hash, desc="embedding cache: hashing source files", unit="file", disable=not to_hash
    ):
        table[name] = {"stat": stat, "sha256": _sha256(name)}
    return table


def files_digest(table: dict[str, dict]) -> str:
    """SHA-256 over every (path, content hash) of a source table."""
    pairs = sorted((name, entry["sha256"]) for name, entry in table.items())
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def cache_key(
    net: nn.Module, dataset: Dataset, *, dtype: str, precision: str = "32-true", sources: dict[str, dict]
) -> tuple[str, dict]:
    """(digest, components): the key of ``dataset``'s cache under ``net``'s image encoder, with
    ``sources`` its source files' table (:func:`hash_source_files`)."""
    transform = check_eval_transform(dataset)
    components = {
        "format": CACHE_FORMAT,
        "encoder": encoder_fingerprint(net.image_encoder),
        "image_size": int(net.image_size),
        "normalisation": _normalisation(transform, net),
        "transform": repr(transform),
        "dataset": dataset_description(dataset),
        "files": files_digest(sources),
        "precision": str(precision),
        "dtype": dtype,
    }
    digest = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()
    return digest, components


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def component_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Every leaf that differs between two key components, as ``"path: old -> new"``."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for k in sorted(set(old) | set(new)):
            changes += component_changes(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return changes
    if old == new:
        return []
    if prefix in ("encoder", "files"):  # digests say nothing readable
        return [f"{prefix} changed"]
    return [f"{prefix}: {_short(old)} -> {_short(new)}"]


def file_changes(old: dict[str, dict], new: dict[str, dict]) -> dict[str, list[str]]:
    """The paths ``changed`` (content), ``added`` and ``removed`` between two source tables."""
    return {
        "changed": sorted(n for n in set(old) & set(new) if old[n]["sha256"] != new[n]["sha256"]),
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
    }


def describe_file_changes(changes: dict[str, list[str]]) -> str:
    parts = []
    for kind, names in changes.items():
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{len(names)} {kind} ({shown})")
    return "files: " + "; ".join(parts)


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
    """``(index, sample)`` pairs of the items ``indices``; an unreadable sample (SampleError)
    becomes ``(index, None)``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, dict | None]:
        index = int(self.indices[position])
        try:
            return index, self.dataset[index]
        except SampleError as err:
            log.warning("embedding cache: skipping sample %d: %s", index, err)
            return index, None


def _as_list(batch: list) -> list:
    return batch


@dataclass
class _Writer:
    """Takes the items in dataset order; each feature level goes straight into a memory-mapped file."""

    folder: Path
    dtype: str
    count: int

    def __post_init__(self) -> None:
        self.levels: list[np.memmap] | None = None
        self.ok = np.zeros(self.count, dtype=bool)
        self.input_size = np.zeros((self.count, 2), dtype=np.int64)
        self.original_size = np.zeros((self.count, 2), dtype=np.int64)
        self.image_id = np.full(self.count, -1, dtype=np.int64)
        self.masks_per_item = np.zeros(self.count, dtype=np.int64)
        self.rle_lengths: list[int] = []
        self.rle_file = (self.folder / "masks.tmp.bin").open("wb")

    def _open(self, levels: Sequence[np.ndarray]) -> list[np.memmap]:
        return [
            np.lib.format.open_memmap(
                self.folder / temporary(level_file(i)),
                mode="w+",
                dtype=DTYPES[self.dtype],
                shape=(self.count, *level.shape),
            )
            for i, level in enumerate(levels)
        ]

    def _put(self, index: int, levels: Sequence[np.ndarray], meta: dict, counts: list[bytes]) -> None:
        if self.levels is None:
            self.levels = self._open(levels)
        if len(levels) != len(self.levels):
            raise ValueError(
                f"embedding cache {self.folder}: item {index} has {len(levels)} feature levels, "
                f"the first item {len(self.levels)}"
            )
        for stored, level in zip(self.levels, levels, strict=True):
            stored[index] = level
            if not np.isfinite(stored[index]).all():
                raise ValueError(
                    f"embedding cache {self.folder}: item {index}'s embedding overflows {self.dtype}; "
                    "use float32"
                )
        self.ok[index] = True
        self.input_size[index] = np.asarray(meta["input_size"])
        self.original_size[index] = np.asarray(meta["original_size"])
        self.image_id[index] = int(meta["image_id"])
        self.masks_per_item[index] = len(counts)
        for c in counts:
            self.rle_file.write(c)
            self.rle_lengths.append(len(c))

    def add(self, index: int, sample: dict, levels: Sequence[np.ndarray]) -> None:
        """A freshly encoded item: its feature levels (each (C_l, h_l, w_l)) and its sample's
        metadata and masks."""
        self._put(index, levels, sample, encode_masks(sample["masks"]))

    def copy(self, index: int, old: CachedEmbeddingDataset) -> None:
        """Item ``index`` as the old cache ``old`` holds it (an unreadable one stays unreadable)."""
        arrays = old.open_arrays()
        idx = arrays[2]
        if idx["ok"][index]:
            meta = {k: idx[k][index] for k in ("input_size", "original_size", "image_id")}
            self._put(index, [level[index] for level in arrays[0]], meta, list(old.mask_counts(index)))

    def finish(self) -> dict:
        """Write every file under its final name (os.replace); returns the manifest's shape fields."""
        self.rle_file.close()
        if self.levels is None:
            raise ValueError(f"embedding cache {self.folder}: no sample of the dataset could be read")
        shapes = []
        for level in self.levels:
            level.flush()
            shapes.append(list(level.shape))
        self.levels = None
        raw = self.folder / "masks.tmp.bin"
        total = int(sum(self.rle_lengths))
        blob = np.lib.format.open_memmap(
            self.folder / temporary(MASKS), mode="w+", dtype=np.uint8, shape=(total,)
        )
        if total:
            blob[:] = np.memmap(raw, dtype=np.uint8, mode="r", shape=(total,))
        blob.flush()
        del blob
        raw.unlink()
        with (self.folder / temporary(INDEX)).open("wb") as f:
            np.savez(
                f,
                ok=self.ok,
                input_size=self.input_size,
                original_size=self.original_size,
                image_id=self.image_id,
                mask_start=np.concatenate([[0], np.cumsum(self.masks_per_item)]).astype(np.int64),
                rle_start=np.concatenate([[0], np.cumsum(self.rle_lengths, dtype=np.int64)]).astype(np.int64),
            )
        for name in (*map(level_file, range(len(shapes))), MASKS, INDEX):
            os.replace(self.folder / temporary(name), self.folder / name)
        for stale in self.folder.glob("embeddings.*.npy"):  # an earlier build's finer levels
            if stale.name not in map(level_file, range(len(shapes))):
                stale.unlink()
        return {
            "embedding_shapes": shapes,
            "num_masks": len(self.rle_lengths),
            "num_skipped": int((~self.ok).sum()),
        }


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _encoded(
    dataset: Dataset,
    indices: Sequence[int],
    encoder: nn.Module,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    forward_context: Callable[[], contextlib.AbstractContextManager],
    feature_levels: Callable[[Any], Sequence[torch.Tensor]],
    desc: str,
) -> Iterator[tuple[int, dict | None, list[np.ndarray] | None]]:
    """(index, sample, its feature levels, each (C_l, h_l, w_l)) of every item of ``indices`` in
    their order; an unreadable item gives (index, None, None)."""
    loader = DataLoader(
        _IndexedSamples(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    for items in tqdm(loader, desc=desc, unit="batch"):
        good = [(i, s) for i, s in items if s is not None]
        embeddings: dict[int, list[np.ndarray]] = {}
        if good:
            images = torch.stack([s["image"] for _, s in good]).to(device)
            with forward_context():
                levels = [level.float().cpu().numpy() for level in feature_levels(encoder(images))]
            embeddings = {i: [level[b] for level in levels] for b, (i, _) in enumerate(good)}
        for index, sample in items:
            yield index, sample, embeddings.get(index)


@torch.no_grad()
def build_embedding_cache(
    dataset: Dataset,
    encoder: nn.Module,
    folder: str | Path,
    *,
    key: str,
    components: dict,
    sources: dict[str, dict],
    dtype: str = "float16",
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    feature_levels: Callable[[Any], Sequence[torch.Tensor]] = lambda features: [features],
    reuse: CachedEmbeddingDataset | None = None,
    items: Sequence[int] | None = None,
) -> dict:
    """Run ``encoder`` (eval mode, no grad) over the items of ``dataset`` and write the cache folder.

    Args:
        dataset: map-style, items of the SAM sample contract from its eval transform.
        encoder: (B, 3, S, S) -> image features, which ``feature_levels`` turns into the tensors
            stored (B, C_l, h_l, w_l); the default stores the encoder's one (B, C, S/16, S/16).
        folder: the cache folder (created); its old manifest is deleted before anything is written.
        key, components, sources: from :func:`cache_key` and :func:`hash_source_files`, stored.
        dtype: "float16" (half the disk) or "float32".
        forward_context: wraps each encoder call (e.g. the trainer's autocast).
        feature_levels: the model's ``feature_levels`` (``Sam.feature_levels``, ``Sam2.feature_levels``).
        reuse, items: a partial rebuild: only ``items`` are encoded, every other item is copied from
            ``reuse`` (the old cache of the same dataset, same length and order).

    Returns:
        The manifest.
    """
    if dtype not in DTYPES:
        raise ValueError(f"embedding cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # from here on the folder is invalid until the end
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    count = len(dataset)
    todo = sorted(int(i) for i in items) if reuse is not None and items is not None else list(range(count))
    writer = _Writer(folder=folder, dtype=dtype, count=count)
    was_training = encoder.training
    encoder.eval()
    start = time.perf_counter()
    fresh = _encoded(
        dataset,
        todo,
        encoder,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        forward_context=forward_context,
        feature_levels=feature_levels,
        desc=f"embedding cache {folder}",
    )
    todo_set = set(todo)
    try:
        for index in range(count):
            if index not in todo_set:
                writer.copy(index, reuse)
                continue
            got, sample, levels = next(fresh)
            assert got == index, (got, index)
            if sample is not None:
                writer.add(index, sample, levels)
        shapes = writer.finish()
        _write_json_atomic(folder / SOURCES, {"key": key, "files": sources})
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
        "num_items": count,
        "num_encoded": len(todo),
        "build_seconds": round(time.perf_counter() - start, 3),
        **shapes,
    }
    _write_json_atomic(folder / MANIFEST, manifest)
    log.info(
        "embedding cache %s: %d images (%d encoded, %d unreadable), %d masks, built in %.1f s",
        folder,
        count,
        len(todo),
        shapes["num_skipped"],
        shapes["num_masks"],
        manifest["build_seconds"],
    )
    return manifest


# ------------------------------------------------------------------------------------------------
# validating


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why it cannot be used) when it is missing or its data files are."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"no manifest {path} (never built, or an earlier build was interrupted)"
    try:
        manifest = json.loads(path.read_text())
        built = manifest.get("components", {}).get("format")
        if built != CACHE_FORMAT:
            return None, f"written in cache format {built}, this samtrain reads format {CACHE_FORMAT}"
        shapes = manifest.get("embedding_shapes") or []
        levels = [
            np.load(folder / level_file(i), mmap_mode="r", allow_pickle=False) for i in range(len(shapes))
        ]
        masks = np.load(folder / MASKS, mmap_mode="r", allow_pickle=False)
        with np.load(folder / INDEX, allow_pickle=False) as index:
            rle_total = int(index["rle_start"][-1])
            items = len(index["ok"])
    except (OSError, ValueError, KeyError, AttributeError, UnicodeDecodeError) as err:
        return None, f"a cache file is missing or unreadable: {err}"
    if (
        not levels
        or [list(level.shape) for level in levels] != shapes
        or masks.shape != (rle_total,)
        or items != manifest.get("num_items")
    ):
        return None, "the data files do not match the manifest"
    return manifest, None


def read_sources(folder: Path, manifest: dict | None) -> dict[str, dict]:
    """The source table stored with ``manifest`` ({} when there is none, or it is another build's)."""
    try:
        stored = json.loads((folder / SOURCES).read_text())
    except (OSError, ValueError):
        return {}
    if manifest is None or stored.get("key") != manifest.get("key"):
        return {}
    return stored.get("files", {})


def items_reading(dataset: Dataset, names: set[str]) -> list[int] | None:
    """The items whose ``sample_files`` include one of ``names``; None when some name is read by
    no single item (a shared file, e.g. an annotation file) or the dataset does not say."""
    sample_files = getattr(dataset, "sample_files", None)
    if not callable(sample_files):
        return None
    items, seen = [], set()
    for index in range(len(dataset)):
        files = sample_files(index)
        if files is None:
            return None
        hit = names.intersection(_file_name(f) for f in files)
        if hit:
            items.append(index)
            seen |= hit
    return items if seen == names else None


def rebuild_plan(
    dataset: Dataset, manifest: dict, components: dict, old_sources: dict, sources: dict
) -> tuple[list[str], list[int] | None]:
    """(what changed, the items to encode again): None rebuilds every item. Only the items reading
    changed per-item files are encoded again when nothing else changed (no file added or removed,
    no shared file changed)."""
    changes = component_changes(manifest.get("components", {}), components)
    if "files changed" not in changes:
        return changes or ["unknown"], None
    if not old_sources:
        return [c for c in changes if c != "files changed"] + ["files changed (no stored source table)"], None
    files = file_changes(old_sources, sources)
    reasons = [c for c in changes if c != "files changed"] + [describe_file_changes(files)]
    if len(changes) > 1 or files["added"] or files["removed"]:
        return reasons, None
    return reasons, items_reading(dataset, set(files["changed"]))


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
    else rebuilt with :func:`build_embedding_cache` (only the items whose own files changed, when
    nothing else did; see the module docstring); the log says what changed. Returns ``folder``."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"embedding cache: {type(dataset).__name__} is a stream; the cache needs a map-style dataset "
            "(for SA-1B, extract the shards and use Sa1bDataset)"
        )
    folder = Path(folder)
    manifest, problem = read_manifest(folder)
    old_sources = read_sources(folder, manifest)
    dataset_description(dataset)  # the contract first: source_files() may not exist
    sources = hash_source_files(dataset.source_files(), old_sources)
    key, components = cache_key(net, dataset, dtype=dtype, precision=precision, sources=sources)
    build = functools.partial(
        build_embedding_cache,
        dataset,
        net.image_encoder,
        folder,
        key=key,
        components=components,
        sources=sources,
        dtype=dtype,
        feature_levels=net.feature_levels,
        **build_kwargs,
    )
    if manifest is not None and manifest.get("key") == key:
        if old_sources != sources:  # only stats moved (touched, copied): keep them, hash less next time
            _write_json_atomic(folder / SOURCES, {"key": key, "files": sources})
        log.info("embedding cache %s: up to date, reused", folder)
        return folder
    if manifest is None:
        if folder.is_dir() and any(folder.iterdir()):
            log.warning("embedding cache %s: rebuilding, %s", folder, problem)
        else:
            log.info("embedding cache %s: building", folder)
        build()
        return folder
    reasons, items = rebuild_plan(dataset, manifest, components, old_sources, sources)
    if items is None:
        log.warning("embedding cache %s: rebuilding, changed: %s", folder, "; ".join(reasons))
        build()
    else:
        log.warning(
            "embedding cache %s: rebuilding %d of %d items, changed: %s",
            folder,
            len(items),
            len(dataset),
            "; ".join(reasons),
        )
        build(reuse=CachedEmbeddingDataset(folder), items=items)
    return folder


# ------------------------------------------------------------------------------------------------
# reading


class CachedEmbeddingDataset(Dataset):
    """Items of the SAM sample contract read from a cache folder, with ``"image_embedding"`` float32
    (C, S/16, S/16) in place of ``"image"`` (and, from a multi-level encoder, ``"high_res_features"``:
    its finer levels, a list of float32 (C_l, h_l, w_l), as ``features_from_levels`` takes them after
    the top one): ``masks`` bool (K, S, S), ``input_size`` (2,),
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
        built = self.manifest.get("components", {}).get("format")
        if built != CACHE_FORMAT:
            raise ValueError(
                f"embedding cache {self.folder} is in format {built}, this samtrain reads format "
                f"{CACHE_FORMAT}: rebuild it (ensure_embedding_cache, or a training run, does)"
            )
        self.image_size = int(self.manifest["components"]["image_size"])
        self._arrays: tuple | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.manifest["num_items"])

    def open_arrays(self) -> tuple[list[np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """(the feature levels, the RLE blob, the index), memory-mapped once per process."""
        if self._arrays is None or self._pid != os.getpid():
            levels = [
                np.load(self.folder / level_file(i), mmap_mode="r", allow_pickle=False)
                for i in range(len(self.manifest["embedding_shapes"]))
            ]
            masks = np.load(self.folder / MASKS, mmap_mode="r", allow_pickle=False)
            with np.load(self.folder / INDEX, allow_pickle=False) as f:
                index = {k: f[k] for k in f.files}
            self._arrays, self._pid = (levels, masks, index), os.getpid()
        return self._arrays

    def __getstate__(self) -> dict:
        # Workers reopen the files: memory maps never travel, nor the source dataset (not read here).
        return {**self.__dict__, "_arrays": None, "_pid": None, "source": None}

    def feature_levels(self, index: int) -> list[torch.Tensor]:
        """Item ``index``'s feature levels, float32 (C_l, h_l, w_l), copied out of the memory maps;
        the first is its (C, S/16, S/16) embedding."""
        return [torch.from_numpy(np.array(level[index], dtype=np.float32)) for level in self.open_arrays()[0]]

    def mask_counts(self, index: int) -> Iterator[bytes]:
        _, blob, idx = self.open_arrays()
        starts = idx["rle_start"]
        for m in range(idx["mask_start"][index], idx["mask_start"][index + 1]):
            yield blob[starts[m] : starts[m + 1]].tobytes()

    def __getitem__(self, index: int) -> dict:
        idx = self.open_arrays()[2]
        if not idx["ok"][index]:
            raise SampleError(self.folder, f"item {index} was unreadable when the cache was built")
        embedding, *high_res = self.feature_levels(index)
        finer = {"high_res_features": high_res} if high_res else {}
        return {
            "image_embedding": embedding,
            **finer,
            "masks": decode_masks(list(self.mask_counts(index)), self.image_size),
            "input_size": torch.from_numpy(idx["input_size"][index].copy()),
            "original_size": torch.from_numpy(idx["original_size"][index].copy()),
            "image_id": int(idx["image_id"][index]),
        }
