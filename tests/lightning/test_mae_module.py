"""MaeModule (optimisation, reconstructions), a short real run, and pretrain_mae's pretrain(cfg)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch.utils.data import DataLoader

import samtrain.lightning.mae_module as mae_module
from samtrain.commands.pretrain_mae import ENCODER_FILE, pretrain
from samtrain.data.image_folder import MaeDataModule
from samtrain.lightning.callbacks import SkippedSamplesBudget
from samtrain.lightning.mae_module import MaeModule, mae_param_groups
from samtrain.lightning.optim import cosine_schedule
from samtrain.models import build_sam
from samtrain.models.mae import build_mae, patchify
from samtrain.models.mae_transfer import init_encoder_from_mae
from tests.conftest import compose_config

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "train"


def tiny_net(image_size: int = 64, **kwargs):
    kwargs = {"decoder_depth": 1, "decoder_dim": 64, **kwargs}
    return build_mae("vit_t", image_size=image_size, decoder_num_heads=4, **kwargs)


def image_batch(images: list[torch.Tensor]) -> dict:
    """The MAE batch contract (``collate_image_batch``) for a list of image tensors."""
    return {"image": torch.stack(images), "num_skipped": 0}


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_param_groups_exclude_norms_biases_positions_tokens():
    net = tiny_net()
    decay, no_decay = mae_param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(net.named_parameters())
    for name in ("encoder.cls_token", "mask_token", "encoder.blocks.0.norm1.weight", "decoder_pred.bias"):
        assert id(named[name]) in no_decay_ids, name
    assert id(named["encoder.blocks.0.attn.qkv.weight"]) in {id(p) for p in decay["params"]}
    # the fixed sin-cos position embeddings do not train at all
    assert id(named["encoder.pos_embed"]) not in no_decay_ids | {id(p) for p in decay["params"]}


def test_lr_scales_with_effective_batch_and_warms_up_then_cosine(tmp_path):
    loader = DataLoader(torch.randn(32, 3, 32, 32), batch_size=4, drop_last=True, collate_fn=image_batch)
    module = MaeModule(net=tiny_net(32), scheduler=partial(cosine_schedule, warmup_steps=2))
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    t = trainer(tmp_path, max_steps=20, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[Record()])
    t.fit(module, train_dataloaders=loader)
    peak = 1.5e-4 * 4 * 2 / 256
    opt = t.optimizers[0]
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert all(g["initial_lr"] == pytest.approx(peak) for g in opt.param_groups)
    per_step = lrs[::2]  # one optimiser step per two batches
    assert per_step[0] == pytest.approx(peak / 2) and per_step[1] == pytest.approx(peak)
    assert per_step[2] == pytest.approx(peak) and per_step[-1] < per_step[3] < per_step[2]


def test_tiny_mae_loss_falls_on_sample_images(tmp_path):
    pl.seed_everything(0)
    dm = MaeDataModule(root=SAMPLE, image_size=64, batch_size=8, val_fraction=0.1, seed=0)
    module = MaeModule(net=tiny_net(64), lr=2e-3, scheduler=partial(cosine_schedule, warmup_steps=5))
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(float(outputs["loss"]))

    t = trainer(
        tmp_path, max_steps=60, limit_val_batches=1, check_val_every_n_epoch=100, callbacks=[Record()]
    )
    t.fit(module, datamodule=dm)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert len(losses) == 60
    assert last < 0.8 * first, (first, last)


def test_validation_saves_reconstruction_grid(tmp_path):
    dm = MaeDataModule(root=SAMPLE, image_size=32, batch_size=4, val_batch_size=3, seed=0)
    module = MaeModule(net=tiny_net(32), num_vis=2)
    t = trainer(tmp_path, max_steps=1, limit_train_batches=1, limit_val_batches=1)
    t.fit(module, datamodule=dm)
    path = tmp_path / "mae_reconstructions" / "epoch000.png"
    assert path.is_file() and "val/loss" in t.callback_metrics
    image = np.asarray(Image.open(path))
    assert image.dtype == np.uint8 and image.shape == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2, 3)
    images = next(iter(dm.val_dataloader()))["image"]
    out = module.net(images, generator=module._val_generator(0))
    masked, recon = module.net.reconstruct(images, out.pred, out.mask)
    assert torch.equal((patchify(masked).abs().sum(-1) == 0).float(), out.mask)  # removed patches blank
    visible = out.mask == 0
    assert torch.allclose(patchify(recon)[visible], patchify(images)[visible])  # visible pasted back
    loss_a = module.net(images, generator=module._val_generator(0)).loss
    loss_b = module.net(images, generator=module._val_generator(0)).loss
    assert torch.equal(loss_a, loss_b)  # the validation masks are fixed


def test_pretrain_fast_dev_run_writes_encoder_for_sam(tmp_path, capsys):
    try:
        cfg = compose_config(
            tmp_path, "debug=fdr", "model.net.image_size=64", "data.batch_size=4", config_name="mae"
        )
        assert cfg.model._target_ == "samtrain.lightning.mae_module.MaeModule"
        assert cfg.callbacks.model_checkpoint.monitor == "val/loss"
        metrics = pretrain(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert "train/loss" in metrics and "val/loss" in metrics
    path = tmp_path / ENCODER_FILE
    assert path.is_file() and str(path) in capsys.readouterr().out
    assert (tmp_path / "mae_reconstructions" / "epoch000.png").is_file()
    sam = build_sam("vit_t", image_size=64)
    report = init_encoder_from_mae(sam, path)
    assert len(report.mapped) == 4 * 12 + 2 and report.resampled == ["pos_embed"]
    # the Lightning checkpoint (weights_only=True) carries the same encoder
    from_ckpt = build_sam("vit_t", image_size=64)
    init_encoder_from_mae(from_ckpt, tmp_path / "checkpoints" / "last.ckpt")
    assert torch.equal(
        from_ckpt.image_encoder.blocks[3].mlp.fc2.weight, sam.image_encoder.blocks[3].mlp.fc2.weight
    )


def test_experiment_config_composes(tmp_path):
    try:
        cfg = compose_config(tmp_path, "mae_experiment=mae_pretrain", config_name="mae")
    finally:
        GlobalHydra.instance().clear()
    assert cfg.model.net.variant == "vit_b" and cfg.model.net.image_size == 224
    assert cfg.model.net.decoder_depth == 8 and cfg.model.net.decoder_dim == 512
    assert cfg.data.image_size == 224 and cfg.model.base_lr == 1.5e-4


def test_reconstruction_grid_goes_to_wandb(tmp_path):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    class FakeWandb(WandbLogger):
        def __init__(self):  # no run: only what log_grid touches
            self.logged = []

        @property
        def experiment(self):
            return SimpleNamespace(log=self.logged.append)

    fake = FakeWandb()
    module = MaeModule(net=tiny_net(32))
    module._trainer = SimpleNamespace(loggers=[fake], global_step=3)
    path = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    module.log_grid(path)
    assert len(fake.logged) == 1 and isinstance(fake.logged[0]["val/reconstructions"], wandb.Image)


def test_fit_skips_and_counts_an_unreadable_image(tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            root / f"{i}.png"
        )
    (root / "3.png").write_bytes(b"not a png")
    dm = MaeDataModule(root=root, val_root=SAMPLE.parent / "val", image_size=32, batch_size=4, seed=0)
    budget = SkippedSamplesBudget(max_skipped=1)
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=1, callbacks=[budget])
    t.fit(MaeModule(net=tiny_net(32)), datamodule=dm)
    assert t.global_step == 2 and budget.skipped_train == 1


def test_a_batch_without_readable_images_is_skipped(monkeypatch):
    module = MaeModule(net=tiny_net(32))
    module._trainer = SimpleNamespace(strategy=None)
    logged = []
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: logged.append(args))
    assert module.training_step({"num_skipped": 4}, 0) is None
    module.validation_step({"num_skipped": 4}, 0)
    assert not logged and module._vis is None


def test_an_empty_batch_under_ddp_still_reduces_zero_gradients(monkeypatch):
    """A DDP rank without data must still join the gradient all-reduce, adding nothing to it."""
    monkeypatch.setattr(mae_module, "world_size", lambda: 2)
    module = MaeModule(net=tiny_net(32))
    module._trainer = SimpleNamespace(strategy=None)
    loss = module.training_step({"num_skipped": 4}, 0)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert loss.item() == 0.0 and grads and all(g is not None and not g.any() for g in grads)
