"""An offline wandb run: metrics history, config, pictures and the checkpoint artifact, all inside
the run directory (no network, no account)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from PIL import Image

from samtrain.commands.train import train

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32 * 1024  # the LevelDB log format that wandb's transaction log (run-*.wandb) uses
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of an offline run's ``run-<id>.wandb`` file (what ``wandb sync`` uploads).

    The file: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each
    a 7-byte header (crc32, length, type) and data; a record is one FULL chunk or FIRST, MIDDLE...,
    LAST; block tails are zero padding (always when shorter than a chunk header; also after a flush).
    """
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a wandb transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block (a flush mid-block); records go on after it
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_run_records(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run once its writer is done: ``finish()`` can return before the
    wandb-core service has written the log's tail (seen under load), so wait for the closing
    "exit" record, re-reading a half-written tail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(read_wandb_records(path))
        except DecodeError:  # a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep wandb's own folders (artifact staging, cache, settings) inside tmp_path, and make sure
    the run is finished whatever happens."""
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    wandb.finish()


def test_offline_wandb_run(tiny_cfg, tmp_path, wandb_env):
    train(tiny_cfg("logger=wandb"))
    wandb.finish()  # flushes the transaction log (the CLI's process exit does the same)

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {tmp_path / 'wandb'}, found {runs}"
    run = runs[0]
    records = finished_run_records(next(run.glob("run-*.wandb")))
    assert records[-1].WhichOneof("record_type") == "exit", "the offline run never finished writing"

    history: dict[str, list] = {}  # metric -> its values; media: key -> {field: value} of the last log
    media: dict[str, dict] = {}
    config: dict[str, object] = {}
    artifacts = []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or item.nested_key[0]
                value = json.loads(item.value_json)
                if len(item.nested_key) > 1:
                    media.setdefault(key, {})[item.nested_key[1]] = value
                else:
                    history.setdefault(key, []).append(value)
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)

    # Metrics history: the training loss per logged step, the validation metrics per validation.
    assert len(history["train/loss"]) == 2
    assert len(history["val/resized_mIoU@1"]) >= 2  # before training, after epoch 0 (and after training)
    assert "val/resized_box_mIoU" in history and "trainer/global_step" in history
    # The resolved Hydra config.
    assert config["model"]["net"]["variant"] == "vit_t"
    assert config["model"]["net"]["image_size"] == 64
    assert config["trainer"]["max_epochs"] == 1 and "paths" in config
    # Pictures: the gallery (with masks), its grid, the curves; as PNGs inside the run folder.
    assert {"val/gallery", "val/gallery_grid", "curves"} <= set(media), sorted(media)
    gallery = media["val/gallery"]
    assert len(gallery["filenames"]) == 4  # 2 images x 2 objects in the tiny run
    assert [set(m) for m in gallery["all_masks"]] == [{"ground_truth", "prediction"}] * 4
    files = run / "files"
    for name in [
        *gallery["filenames"],
        *media["val/gallery_grid"]["filenames"],
        *media["curves"]["filenames"],
    ]:
        assert Image.open(files / name).width > 0
    for masks in gallery["all_masks"]:
        assert all((files / m["path"]).is_file() for m in masks.values())
    assert Image.open(files / gallery["filenames"][0]).size == (256, 256)
    # The checkpoint as a "model" artifact, kept for `wandb sync`.
    models = [a for a in artifacts if a.type == "model"]
    assert models and {c.path for a in models for c in a.manifest.contents} >= {"last.ckpt"}
    assert any("latest" in a.aliases for a in models)
    # Everything else a run writes is there too.
    assert len(list((tmp_path / "gallery").glob("epoch000-step*.png"))) == 1
    assert (tmp_path / "curves.png").is_file()  # from the callback's own records (no CSV logger)


def test_a_resumed_run_continues_the_same_wandb_run(tiny_cfg, tmp_path, wandb_env):
    quick = ("logger=wandb", "validate_before=false", "export=false", "trainer.limit_val_batches=0")
    train(tiny_cfg(*quick, "trainer.max_steps=1"))
    wandb.finish()
    last = tmp_path / "checkpoints" / "last.ckpt"
    train(tiny_cfg(*quick, "trainer.max_steps=2", "trainer.max_epochs=2", f"ckpt_path={last}"))
    wandb.finish()

    run_id = (tmp_path / "wandb" / "samtrain-run-id").read_text().strip()
    attempts = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts)
    steps = []
    for attempt in attempts:
        for record in finished_run_records(next(attempt.glob("run-*.wandb"))):
            if record.WhichOneof("record_type") == "run":
                assert record.run.run_id == run_id
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or item.nested_key[0]: json.loads(item.value_json)
                    for item in record.history.item
                    if item.key or len(item.nested_key) == 1
                }
                if "train/loss" in items:
                    steps.append(items["trainer/global_step"])
    assert steps == [0, 1]  # `wandb sync` uploads both attempts into run `run_id`, one step each
