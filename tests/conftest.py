"""Shared fixtures: the real Hydra config, composed with overrides that keep runs tiny."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from samtrain import distributed

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A tiny, fast run: vit_t at 64 px, two masks per image, three clicks.
TINY = (
    "model.net.image_size=64",
    "model.val_max_clicks=3",
    "prompts.num_click_passes=2",
    "prompts.num_mask_only_passes=1",
    "data.batch_size=2",
    "data.train_dataset.transform.max_masks=2",
    "data.val_dataset.transform.max_masks=2",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# make test runs the suite in parallel workers (pytest-xdist): each takes its share of the cores
# (on Linux the cores this process may use, which cgroups and affinity can limit).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
torch.set_num_threads(max(1, min(2, CORES // WORKERS)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files holding a test marked slow first, each file's tests together and in their order,
    so that parallel workers (one file at a time each) finish together instead of one running a
    long file alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def compose_config(output_dir: Path, *overrides: str, config_name: str = "train") -> DictConfig:
    """The project's config with the Hydra runtime set, as `python train.py ...` would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name, overrides=[f"hydra.run.dir={output_dir}", *overrides], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """A function: extra overrides -> the composed tiny training config in tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(tmp_path, *TINY, *overrides)

    yield make
    GlobalHydra.instance().clear()


@contextlib.contextmanager
def as_rank(rank: int, world_size: int):
    """Makes ``samtrain.distributed`` report this rank and world size (no process group needed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "rank", lambda: rank)
        patch.setattr(distributed, "world_size", lambda: world_size)
        yield
