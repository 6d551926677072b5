"""Every option of every config group composes and instantiates."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch.optim.lr_scheduler import LambdaLR

from samtrain.commands.pretrain_mae import save_mae_encoder
from samtrain.data import SamDataModule
from samtrain.interactive.simulate import PromptRecipe
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam
from samtrain.models.mae import build_mae
from tests.conftest import CONF, compose_config
from tests.data_builders import data_overrides


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config(tiny_cfg):
    cfg = tiny_cfg()
    assert cfg.model.net.variant == "vit_t"
    assert isinstance(hydra.utils.instantiate(cfg.model), SamModule)
    assert isinstance(hydra.utils.instantiate(cfg.data), SamDataModule)


@pytest.mark.parametrize("option", [o for o in options("model") if o != "sam"] + ["sam"])
def test_model_options(tiny_cfg, option):
    cfg = tiny_cfg(f"model={option}", "model.net.image_size=64")
    module = hydra.utils.instantiate(cfg.model)
    assert isinstance(module, SamModule)
    assert module.net.image_size == 64


@pytest.mark.parametrize("option", options("model/scheduler"))
def test_scheduler_options(tiny_cfg, option):
    """Each schedule is a partial that SamModule calls with the optimizer and the run's steps."""
    module = hydra.utils.instantiate(tiny_cfg(f"model/scheduler={option}").model)
    module._trainer = SimpleNamespace(estimated_stepping_batches=200)
    config = module.configure_optimizers()
    schedule = config["lr_scheduler"]["scheduler"]
    assert isinstance(schedule, LambdaLR) and config["lr_scheduler"]["interval"] == "step"
    assert schedule.optimizer is config["optimizer"]
    factor = schedule.lr_lambdas[0]
    assert factor(0) == pytest.approx(1 / 20)  # sam_vit_t's 20 warmup steps
    expected = {"step": 0.01, "cosine": 0.0, "constant": 1.0, "sam2": 0.1}[option]
    assert factor(199) == pytest.approx(expected, abs=1e-3)


def test_encoder_init_mae_option_requires_the_weights(tiny_cfg):
    cfg = tiny_cfg("model/encoder_init=mae")
    assert OmegaConf.is_missing(cfg.model.net, "encoder_init")
    with pytest.raises(MissingMandatoryValue, match=r"model\.net\.encoder_init"):
        hydra.utils.instantiate(cfg.model)


@pytest.mark.parametrize("option", options("prompts"))
def test_prompt_options(tiny_cfg, option):
    cfg = tiny_cfg(f"prompts={option}")
    recipe = hydra.utils.instantiate(cfg.prompts)
    assert isinstance(recipe, PromptRecipe)
    assert isinstance(hydra.utils.instantiate(cfg.model).prompts, PromptRecipe)


@pytest.mark.parametrize("option", options("data"))
def test_data_options(tiny_cfg, option, tmp_path):
    # Options that need paths get a tiny dataset of their format (coco: the sample data).
    overrides = [f"data={option}", *data_overrides(option, tmp_path / "dataset")]
    datamodule = hydra.utils.instantiate(tiny_cfg(*overrides).data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[-1] == 64


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(tiny_cfg, option):
    cfg = tiny_cfg(f"trainer={option}")
    if cfg.trainer.accelerator == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
        return  # a GPU trainer cannot be built on this machine; the config composed
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(tiny_cfg, option):
    cfg = tiny_cfg(f"logger={option}")
    loggers = [hydra.utils.instantiate(v) for v in cfg.logger.values()]
    assert loggers and all(isinstance(lg, pl.loggers.Logger) for lg in loggers)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options(tiny_cfg, option):
    cfg = tiny_cfg(f"callbacks={option}")
    callbacks = [hydra.utils.instantiate(v) for v in (cfg.callbacks or {}).values()]
    assert all(isinstance(cb, pl.Callback) for cb in callbacks)


@pytest.mark.parametrize("option", options("debug"))
def test_debug_options(tiny_cfg, option):
    assert tiny_cfg(f"debug={option}").trainer


def tiny_mae_encoder(path: Path) -> Path:
    """MAE weights for the tiny encoder at 64 px, as pretrain_mae.py writes them."""
    net = build_mae("vit_t", image_size=64, decoder_depth=1, decoder_dim=32, decoder_num_heads=4)
    return save_mae_encoder(net, path)


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(tiny_cfg, option, tmp_path):
    sam2 = tiny_cfg(f"experiment={option}").model.net.variant.startswith("sam2")
    tiny_variant = "sam2.1_hiera_n" if sam2 else "vit_t"
    overrides = [f"experiment={option}", "model.net.image_size=64", f"model.net.variant={tiny_variant}"]
    if OmegaConf.is_missing(tiny_cfg(*overrides).model.net, "encoder_init"):  # the paper's presets
        overrides.append(f"model.net.encoder_init={tiny_mae_encoder(tmp_path / 'mae_encoder.safetensors')}")
    cfg = tiny_cfg(*overrides)
    module = hydra.utils.instantiate(cfg.model)
    assert isinstance(module, SamModule)
    assert cfg.task_name == option
    for part in module.freeze:
        assert not any(p.requires_grad for p in getattr(module.net, part).parameters())


def test_fsdp_wraps_each_encoder_block_of_either_family(tiny_cfg):
    from pytorch_lightning.strategies import FSDPStrategy

    strategy = hydra.utils.instantiate(tiny_cfg("trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    classes = strategy.kwargs["auto_wrap_policy"]._module_classes
    assert {f"{c.__module__}.{c.__qualname__}" for c in classes} == {
        "timm.models.vision_transformer_sam.Block",
        "timm.models.hieradet_sam2.MultiScaleBlock",
    }
    for variant in ("vit_t", "sam2.1_hiera_n"):
        blocks = build_sam(variant, image_size=64).image_encoder.blocks
        assert all(type(block) in classes for block in blocks), variant


# The SAM paper (arXiv 2304.02643), appendix A, "Training algorithm", written out: what both runs
# share, then ViT-H's and ViT-B's own numbers.
PAPER = {
    "optimizer": "torch.optim.AdamW",
    "betas": [0.9, 0.999],
    "lr": 8e-4,
    "warmup_iterations": 250,
    "decay_factor": 0.1,
    "weight_decay": 0.1,
    "masks_per_gpu": 64,
    "max_mask_fraction": 0.9,
    "image_size": 1024,
    "focal_dice_iou": (20.0, 1.0, 1.0),
    "point_prob": 0.5,
    "click_passes": 8,
    "mask_only_passes": 2,
}
PAPER_RUNS = {
    "sam_paper_vit_h": {
        "variant": "vit_h",
        "iterations": 90_000,
        "decays_at": (60_000, 86_666),
        "batch_images": 256,
        "layer_decay": 0.8,
        "drop_path": 0.4,
    },
    # The paper gives ViT-B's length, not its milestones: ViT-H's places in the run (2/3, 86666/90000).
    "sam_paper_vit_b": {
        "variant": "vit_b",
        "iterations": 180_000,
        "decays_at": (120_000, 173_332),
        "batch_images": 128,
        "layer_decay": 0.6,
        "drop_path": 0.6,
    },
}


@pytest.fixture
def composed(tmp_path):
    """The full config for overrides, without the tiny-run overrides (it keeps the paper's numbers)."""
    yield lambda *overrides: compose_config(tmp_path, *overrides)
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset", sorted(PAPER_RUNS))
def test_sam_paper_presets_hold_appendix_a(composed, preset):
    run = PAPER_RUNS[preset]
    cfg = composed(f"experiment={preset}")
    model, data, transform = cfg.model, cfg.data, cfg.data.train_dataset.transform
    assert model.net.variant == run["variant"] and model.net.image_size == PAPER["image_size"]
    assert OmegaConf.is_missing(model.net, "encoder_init") and model.net.checkpoint is None  # from MAE
    assert model.optimizer._target_ == PAPER["optimizer"] and list(model.optimizer.betas) == PAPER["betas"]
    assert model.lr == PAPER["lr"] and model.weight_decay == PAPER["weight_decay"]
    assert model.layer_decay == run["layer_decay"] and model.net.drop_path_rate == run["drop_path"]
    assert (model.loss.focal, model.loss.dice, model.loss.iou) == PAPER["focal_dice_iou"]
    assert cfg.prompts.point_prob == PAPER["point_prob"]
    assert (cfg.prompts.num_click_passes, cfg.prompts.num_mask_only_passes) == (
        PAPER["click_passes"],
        PAPER["mask_only_passes"],
    )
    assert cfg.trainer.max_steps == run["iterations"] and cfg.trainer.max_epochs == -1
    assert (
        data.global_batch_size == run["batch_images"] and data.max_masks_per_batch == PAPER["masks_per_gpu"]
    )
    assert transform.train and transform.max_mask_fraction == PAPER["max_mask_fraction"]
    assert transform.scale_range is None and transform.hflip_prob == 0 and transform.color_jitter == 0
    # The schedule exactly as the run steps it: warmup, then x0.1 at each of the paper's iterations.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = hydra.utils.instantiate(model.scheduler)(optimizer, total_steps=run["iterations"]).lr_lambdas[0]
    warmup, (first, second) = PAPER["warmup_iterations"], run["decays_at"]
    gamma = PAPER["decay_factor"]
    assert factor(0) == pytest.approx(1 / warmup) and factor(warmup - 1) == 1.0 == factor(first - 1)
    assert factor(first) == pytest.approx(gamma) == factor(second - 1)
    assert factor(second) == pytest.approx(gamma**2) == factor(run["iterations"] - 1)


def test_sam_paper_preset_caps_masks_per_device(tiny_cfg, tmp_path):
    overrides = data_overrides("sa1b", tmp_path / "sa1b")
    cfg = tiny_cfg(
        "experiment=sam_paper_vit_h", *overrides, "data.global_batch_size=4", "data.max_masks_per_batch=3"
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[0] == 4 and batch["masks"].shape[0] == 3
