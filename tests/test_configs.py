"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl

from samtrain.data import SamDataModule
from samtrain.interactive.simulate import PromptRecipe
from samtrain.lightning.sam_module import SamModule
from tests.conftest import CONF
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


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(tiny_cfg, option):
    cfg = tiny_cfg(f"experiment={option}", "model.net.image_size=64", "model.net.variant=vit_t")
    module = hydra.utils.instantiate(cfg.model)
    assert isinstance(module, SamModule)
    assert cfg.task_name == option
    for part in module.freeze:
        assert not any(p.requires_grad for p in getattr(module.net, part).parameters())


def test_fsdp_wraps_each_encoder_block(tiny_cfg):
    from pytorch_lightning.strategies import FSDPStrategy
    from timm.models.vision_transformer_sam import Block

    strategy = hydra.utils.instantiate(tiny_cfg("trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy._module_classes == {Block}
