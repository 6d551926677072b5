"""SA-1B: one JPEG and one JSON per image, from an extracted folder or streamed from .tar shards.

Each ``<name>.json`` holds ``{"image": {"image_id", "width", "height", "file_name"},
"annotations": [{"segmentation": {"size": [h, w], "counts": "<COCO RLE>"}, "area", "bbox",
...}, ...]}`` beside ``<name>.jpg``. Masks stay run-length encoded until the transform decodes
them onto its output grid (see :class:`samtrain.data.rle.RleMasks`).

- :class:`Sa1bDataset`: map-style, over an extracted folder (searched recursively).
- :class:`Sa1bTarStream`: an ``IterableDataset`` reading the original shards as a stream
  (``tarfile`` mode ``r|*``, nothing extracted), split over distributed ranks and loader workers
  so that each sample is seen exactly once per epoch.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from samtrain import distributed
from samtrain.data.base import SamDataset, decoded
from samtrain.data.errors import SampleError
from samtrain.data.image_io import decode_rgb_image, read_bytes
from samtrain.data.rle import RleMasks, rle_run_lengths
from samtrain.data.split import select_split, stable_hash

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg")


# -- one sample ------------------------------------------------------------------------------------


def _parse_annotation(data: bytes, name: str) -> tuple[dict, list]:
    """The ``image`` entry and ``annotations`` list of an SA-1B JSON; SampleError when malformed."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(name, f"annotation JSON does not parse: {err}") from err
    image = doc.get("image") if isinstance(doc, dict) else None
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(image, dict) or not isinstance(annotations, list):
        raise SampleError(name, "annotation JSON lacks an 'image' object or an 'annotations' list")
    for key in ("image_id", "height", "width"):
        if isinstance(image.get(key), bool) or not isinstance(image.get(key), int):
            raise SampleError(name, f"annotation JSON: image.{key} is missing or not an integer")
    return image, annotations


def _masks(annotations: list, height: int, width: int, name: str) -> RleMasks:
    """The annotations' RLEs as RleMasks; SampleError naming the first bad or empty one."""
    runs = []
    for k, ann in enumerate(annotations):
        segmentation = ann.get("segmentation") if isinstance(ann, dict) else None
        ann_id = ann.get("id", k) if isinstance(ann, dict) else k
        try:
            runs.append(rle_run_lengths(segmentation, height, width))
        except (ValueError, TypeError) as err:
            raise SampleError(name, f"annotation {ann_id}: invalid RLE: {err}") from err
        if not runs[-1][1::2].any():
            raise SampleError(name, f"annotation {ann_id}: mask has zero area")
    return RleMasks(runs, height, width)


def build_sample(
    image_bytes: bytes, json_bytes: bytes, image_name: str, json_name: str, *, min_mask_area: int = 1
) -> dict:
    """An SA-1B sample from its two files' bytes: image uint8 (H, W, 3), masks RleMasks (K, H, W),
    image_id int. SampleError naming the file at fault when something is wrong."""
    info, annotations = _parse_annotation(json_bytes, json_name)
    image = decode_rgb_image(image_bytes, image_name)
    height, width = info["height"], info["width"]
    if image.shape[:2] != (height, width):
        raise SampleError(
            image_name, f"image is {image.shape[1]}x{image.shape[0]} but {json_name} says {width}x{height}"
        )
    masks = _masks(annotations, height, width, json_name)
    masks = masks.subset(np.flatnonzero(masks.areas() >= min_mask_area))
    return {"image": image, "masks": masks, "image_id": int(info["image_id"])}


# -- an extracted folder ---------------------------------------------------------------------------


class Sa1bDataset(SamDataset):
    """SA-1B from an extracted folder: every ``*.jpg`` under ``root`` with its ``.json`` beside it.

    Args:
        root: the folder (searched recursively; e.g. the parent of ``sa_000000/``).
        transform: callable on the raw sample, e.g. ``SamTransform``.
        min_mask_area: drop masks with fewer pixels than this (original resolution).
        split, val_fraction, split_seed: optional deterministic train/val split by file name.
    """

    SAMPLE_ARGS = ("root", "min_mask_area", "split", "val_fraction", "split_seed")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        root: str | Path,
        transform: Callable[..., dict] | None = None,
        min_mask_area: int = 1,
        split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.min_mask_area = int(min_mask_area)
        self.split, self.val_fraction, self.split_seed = split, float(val_fraction), int(split_seed)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SA-1B folder {self.root} does not exist or is not a directory")
        files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"SA-1B folder {self.root} holds no .jpg images")
        files = select_split(files, str, split, val_fraction, split_seed)
        self.files = np.array(files)  # one array, not many str objects: cheap to share with workers

    def __len__(self) -> int:
        return len(self.files)

    def sample_name(self, index: int) -> str:
        return str(self.root / str(self.files[index]))

    def source_files(self) -> list[Path]:
        """Every image and its annotation JSON."""
        return [f for i in range(len(self)) for f in self.sample_files(i)]

    def sample_files(self, index: int) -> list[Path]:
        image_path = self.root / str(self.files[index])
        return [image_path, image_path.with_suffix(".json")]

    def load_encoded_sample(self, index: int) -> dict:
        image_path = self.root / str(self.files[index])
        json_path = image_path.with_suffix(".json")
        json_bytes = read_bytes(json_path, what="annotation")
        return build_sample(
            read_bytes(image_path),
            json_bytes,
            str(image_path),
            str(json_path),
            min_mask_area=self.min_mask_area,
        )

    def load_sample(self, index: int) -> dict:
        return decoded(self.load_encoded_sample(index))


# -- .tar shards as a stream -----------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, extension): ``./sa_1.jpg`` -> (``sa_1``, ``jpg``)."""
    name = name[2:] if name.startswith("./") else name
    stem, dot, ext = name.rpartition(".")
    return (stem, ext.lower()) if dot else (name, "")


class TarGroup(NamedTuple):
    """One sample of a tar stream: its index in the shard, key, files (extension -> bytes; None
    when not read), or the reason the tar is damaged from here on (then key is '' and files None)."""

    index: int
    key: str
    files: dict[str, bytes] | None
    damage: str | None = None


def iter_tar_groups(path: str, keep: Callable[[int], bool] = lambda g: True) -> Iterator[TarGroup]:
    """Read a tar as a stream and group adjacent members by sample key (as SA-1B shards and
    WebDataset store them, in any order within a sample).

    Yields one TarGroup per sample; the files of samples with ``not keep(index)`` are skipped
    unread (files None). When the tar is damaged, a last group with ``damage`` set ends it.
    """
    g, key, files = -1, None, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield TarGroup(g, key, files)
                    g, key = g + 1, member_key
                    files = {} if keep(g) else None
                if files is not None:
                    files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        yield TarGroup(g + 1, "", None, f"damaged tar ({type(err).__name__}: {err})")
        return
    if key is not None:
        yield TarGroup(g, key, files)


def count_tar_samples(path: str) -> int:
    """Samples in a tar (groups of adjacent members with one key), from the headers only."""
    count, key = 0, None
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                if member.isfile() and _split_name(member.name)[0] != key:
                    count, key = count + 1, _split_name(member.name)[0]
    except (tarfile.TarError, OSError, EOFError):
        count += 1  # the stream reports the damage as one more (skipped) sample
    return count


def resolve_shards(shards: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a folder (its ``*.tar``), a glob pattern, one file, or a list of these."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    paths: list[str] = []
    for item in items:
        item = str(item)
        if Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"SA-1B shard folder {item} holds no .tar files")
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"SA-1B shard pattern {item} matches no file")
        elif Path(item).is_file():
            found = [item]
        else:
            raise FileNotFoundError(f"SA-1B shard {item} does not exist")
        paths.extend(found)
    if not paths:
        raise ValueError("Sa1bTarStream got no shards")
    for path in paths:
        if not tarfile.is_tarfile(path):
            raise ValueError(f"SA-1B shard {path} is not a tar file")
    return paths


def consumer_plan(
    shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[str], int, int]:
    """What consumer (rank, worker) reads: (its shards, stride, offset); it takes the samples whose
    running index g over those shards has ``g % stride == offset``.

    Ranks get whole shards when there are at least as many shards as ranks, else every rank
    reads all shards and takes every world_size-th sample. Within a rank, likewise for workers.
    Every sample goes to exactly one consumer.
    """
    if len(shards) >= world_size:
        rank_shards, stride, offset = list(shards[rank::world_size]), 1, 0
    else:
        rank_shards, stride, offset = list(shards), world_size, rank
    if stride == 1 and len(rank_shards) >= num_workers:
        return rank_shards[worker::num_workers], 1, 0
    return rank_shards, stride * num_workers, offset + stride * worker


def _consumer_count(counts: dict[str, int], shards: list[str], stride: int, offset: int) -> int:
    total = sum(counts[s] for s in shards)
    return max(0, -(-(total - offset) // stride))


class Sa1bTarStream(IterableDataset):
    """SA-1B streamed from the original ``.tar`` shards, without extracting them.

    Sharding: each (distributed rank, loader worker) reads its part (see :func:`consumer_plan`),
    so every sample is yielded exactly once per epoch. Rank and world size come from
    ``torch.distributed`` when it is initialised (or the ``rank`` / ``world_size`` arguments);
    worker id and count from ``get_worker_info()``.

    Equal length under DDP: ranks that yield different numbers of batches deadlock. With
    ``even=True`` (the default when ``world_size > 1``) the sample count of every consumer is
    computed from the tar headers (a quick scan per epoch) and every consumer yields exactly the
    smallest one: at most ``stride - 1`` samples per epoch are left out when ranks split samples,
    and the difference in shard sizes when they split shards (shard order changes every epoch, so
    other samples are left out each time). A consumer whose shard turns out damaged fills its
    quota with None (skipped and counted) instead of ending early.

    Order: ``set_epoch(epoch)`` reshuffles the shard order (seeded by ``seed`` and the epoch).
    Each sample's augmentation uses ``np.random.default_rng((seed, epoch, hash(sample key)))``.
    With persistent loader workers (whose copies ``set_epoch`` does not reach) each further
    ``iter()`` of a copy counts as the next epoch.

    Bad samples (undecodable image, malformed JSON, invalid RLE, ...) are logged with the shard,
    the tar member and the reason, and yielded as None: ``collate_sam_batch`` drops and counts them.

    ``state_dict()`` / ``load_state_dict()`` hold (epoch, samples yielded) per worker, so
    torchdata's StatefulDataLoader resumes mid-epoch.

    Args:
        shards: a folder of ``.tar`` files, a glob pattern, a file, or a list of these.
        transform: callable ``transform(sample, rng=...)``, e.g. ``SamTransform`` (None: raw samples
            with decoded masks).
        seed: seed of the shard order and of the augmentation.
        min_mask_area: drop masks with fewer pixels than this (original resolution).
        rank, world_size: override torch.distributed's values (tests, custom launchers).
        even: equalise per-consumer sample counts (None: when world_size > 1).
        shuffle_shards: change the shard order every epoch.
    """

    # The sample contract of samtrain.data.base: shard, order and seed choices change what is yielded.
    SAMPLE_ARGS = ("shards", "seed", "min_mask_area", "rank", "world_size", "even", "shuffle_shards")
    NON_SAMPLE_ARGS = ("transform",)

    def __init__(
        self,
        *,
        shards: str | Path | Sequence[str | Path],
        transform: Callable[..., dict] | None = None,
        seed: int = 0,
        min_mask_area: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        even: bool | None = None,
        shuffle_shards: bool = True,
    ) -> None:
        super().__init__()
        self.shards = resolve_shards(shards)
        self.transform = transform
        self.seed = int(seed)
        self.min_mask_area = int(min_mask_area)
        self.rank, self.world_size = rank, world_size
        self.even = even
        self.shuffle_shards = bool(shuffle_shards)
        self.epoch = 0
        self._iterations_since_set = 0
        self._resume: dict | None = None
        self._yielded = 0
        self._current_epoch = 0
        self._counts: dict[str, int] | None = None

    def source_files(self) -> list[Path]:
        """The ``.tar`` shards."""
        return [Path(s) for s in self.shards]

    # -- epochs and state ----------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._iterations_since_set = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self._current_epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._resume = {"epoch": int(state["epoch"]), "yielded": int(state["yielded"])}

    # -- who reads what ------------------------------------------------------------------------

    def _distributed(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            return int(self.rank or 0), int(self.world_size or 1)
        return distributed.rank(), distributed.world_size()

    def shard_order(self, epoch: int) -> list[str]:
        """The shards in the order of ``epoch`` (the same in every rank and worker)."""
        if not self.shuffle_shards:
            return list(self.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def _quota(self, order: list[str], world_size: int, num_workers: int) -> int:
        """The smallest sample count over all consumers of this epoch."""
        if self._counts is None:
            self._counts = {s: count_tar_samples(s) for s in self.shards}
        return min(
            _consumer_count(self._counts, *consumer_plan(order, r, world_size, w, num_workers))
            for r in range(world_size)
            for w in range(num_workers)
        )

    # -- the stream ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict | None]:
        rank, world_size = self._distributed()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = self.epoch + self._iterations_since_set, 0
        self._iterations_since_set += 1
        if self._resume is not None:
            epoch, skip, self._resume = self._resume["epoch"], self._resume["yielded"], None
        order = self.shard_order(epoch)
        even = self.even if self.even is not None else world_size > 1
        quota = self._quota(order, world_size, num_workers) if even else None
        shards, stride, offset = consumer_plan(order, rank, world_size, worker, num_workers)
        self._current_epoch, self._yielded = epoch, skip
        for position, (shard, group) in enumerate(self._groups(shards, stride, offset)):
            if quota is not None and position >= quota:
                return
            if position < skip:  # resuming: already yielded before the checkpoint, not decoded again
                continue
            self._yielded = position + 1
            yield None if group is None else self._load(shard, group, epoch)
        for position in range(max(self._yielded, skip), quota or 0):  # a damaged shard: fill the quota
            self._yielded = position + 1
            yield None

    def _groups(self, shards: list[str], stride: int, offset: int) -> Iterator[tuple[str, TarGroup | None]]:
        """This consumer's samples as (shard, group), or (shard, None) where a damaged tar ends."""
        start = 0  # running sample index over this consumer's shards: the same in every consumer
        for shard in shards:
            seen = 0
            for group in iter_tar_groups(shard, lambda g, first=start: (first + g) % stride == offset):
                seen = group.index + 1
                if group.damage is not None:
                    log.warning("skipping the rest of %s: %s", shard, group.damage)
                    yield shard, None
                elif group.files is not None:
                    yield shard, group
            start += seen

    def _read(self, shard: str, group: TarGroup) -> dict:
        """The raw sample of a group (masks RleMasks); SampleError naming the shard and member."""
        name = f"{shard}:{group.key}"
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in group.files), None)
        if image_ext is None or "json" not in group.files:
            missing = ".jpg" if image_ext is None else ".json"
            raise SampleError(name, f"sample has no {missing} member in the tar")
        return build_sample(
            group.files[image_ext],
            group.files["json"],
            f"{name}.{image_ext}",
            f"{name}.json",
            min_mask_area=self.min_mask_area,
        )

    def _load(self, shard: str, group: TarGroup, epoch: int) -> dict | None:
        """The transformed sample of a group, or None (logged) when it cannot be read."""
        try:
            sample = self._read(shard, group)
        except SampleError as err:
            log.warning("skipping sample %s", err)
            return None
        if self.transform is None:
            return decoded(sample)
        rng = np.random.default_rng([self.seed, epoch, stable_hash(f"{Path(shard).name}/{group.key}")])
        return self.transform(sample, rng=rng)

    def iter_raw(self) -> Iterator[tuple[str, dict | SampleError]]:
        """Every sample of every shard in file order, untransformed, for checking a dataset:
        ``(name, sample with RleMasks masks)`` or ``(name, SampleError)``."""
        for shard in self.shards:
            for group in iter_tar_groups(shard):
                if group.damage is not None:
                    yield shard, SampleError(shard, group.damage)
                    break
                try:
                    yield f"{shard}:{group.key}", self._read(shard, group)
                except SampleError as err:
                    yield f"{shard}:{group.key}", err
