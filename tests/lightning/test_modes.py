"""Memory and speed modes give the plain path's losses and gradients: activation checkpointing of the
encoder and of the decoder passes, torch.compile, bf16 autocast (Lightning's bf16-mixed on CPU)."""

from __future__ import annotations

import os
import shutil

import hydra
import pytest
import torch

from samtrain.commands.train import train


def ellipse_batch(images: int = 2, masks_per_image: int = 2, size: int = 64) -> dict:
    """A fixed batch: random images (B, 3, S, S) and elliptic masks (N, S, S) of varied size."""
    g = torch.Generator().manual_seed(0)
    n = images * masks_per_image
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (0.2 + 0.6 * torch.rand(n, 2, 1, 1, generator=g)) * size
    radii = (0.1 + 0.2 * torch.rand(n, 2, 1, 1, generator=g)) * size
    masks = ((xx - centre[:, 0]) / radii[:, 0]) ** 2 + ((yy - centre[:, 1]) / radii[:, 1]) ** 2 <= 1
    return {
        "image": torch.randn(images, 3, size, size, generator=g),
        "masks": masks,
        "mask_image_index": torch.arange(images).repeat_interleave(masks_per_image),
        "input_size": torch.full((images, 2), size),
    }


def build_module(cfg, state: dict | None = None):
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    if state is not None:
        module.load_state_dict(state)
    return module


def loss_and_grads(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and the gradient of every trainable parameter."""
    module.zero_grad(set_to_none=True)
    loss, _ = module.interactive_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.fixture
def plain(tiny_cfg):
    """The plain path's config, batch, weights, loss and gradients."""
    cfg = tiny_cfg()
    batch = ellipse_batch()
    module = build_module(cfg)
    loss, grads = loss_and_grads(module, batch)
    return cfg, batch, module.state_dict(), loss, grads


def assert_same_step(reference: tuple, loss: torch.Tensor, grads: dict, *, rtol: float, atol: float) -> None:
    ref_loss, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=atol, msg=name)


class CallCounter:
    """Counts the forward calls of a module, a recomputation too (a pre-hook: a non-reentrant
    recomputation stops early, before the forward returns)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self.hook)

    def hook(self, *_) -> None:
        self.calls += 1


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.encoder_checkpointing=true"],
        ["model.decoder_checkpointing=true"],
        ["model.encoder_checkpointing=true", "model.decoder_checkpointing=true"],
    ],
    ids=["encoder", "decoder", "both"],
)
def test_activation_checkpointing_matches_plain(tiny_cfg, plain, overrides):
    _, batch, state, ref_loss, ref_grads = plain
    module = build_module(tiny_cfg(*overrides), state)
    block = CallCounter(module.net.image_encoder.blocks[0])
    transformer = CallCounter(module.net.mask_decoder.transformer)
    loss, grads = loss_and_grads(module, batch)
    assert_same_step((ref_loss, ref_grads), loss, grads, rtol=1e-5, atol=1e-7)
    # Checkpointing engaged: the backward pass ran the checkpointed forward again.
    passes = 1 + module.prompts.num_click_passes + module.prompts.num_mask_only_passes
    assert block.calls == (2 if module.net.image_encoder.grad_checkpointing else 1)
    assert transformer.calls == (2 if module.decoder_checkpointing else 1) * passes


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.freeze=[image_encoder]"], ["model.decoder_checkpointing=true"]],
    ids=["all", "frozen_encoder", "with_checkpointing"],
)
def test_per_pass_backward_matches_plain(tiny_cfg, overrides):
    """The same loss and gradients, the encoder's included, from one backward per pass."""
    batch = ellipse_batch()
    reference = build_module(tiny_cfg(*overrides))
    expected = loss_and_grads(reference, batch)
    module = build_module(
        tiny_cfg(*overrides, "model.decoder_backward_per_pass=true"), reference.state_dict()
    )
    module.zero_grad(set_to_none=True)
    surrogate, logs = module.interactive_loss(batch)
    assert not any(p.grad is not None for p in module.parameters())  # nothing accumulated yet
    surrogate.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert_same_step(expected, logs["loss"], grads, rtol=1e-5, atol=1e-7)


def test_checkpointing_off_without_grad(tiny_cfg, plain):
    """Validation and inference (no grad) run each decoder pass once."""
    _, batch, state, _, _ = plain
    module = build_module(tiny_cfg("model.decoder_checkpointing=true"), state)
    transformer = CallCounter(module.net.mask_decoder.transformer)
    with torch.no_grad():
        module.interactive_loss(batch)
    assert transformer.calls == 1 + module.prompts.num_click_passes + module.prompts.num_mask_only_passes


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs torch >= 2.0")
def test_compile_matches_plain_and_keeps_keys(tiny_cfg, plain):
    """aot_eager traces forward and backward through dynamo and AOTAutograd like inductor does,
    without inductor's C++ build (tens of seconds per graph on a CPU machine)."""
    _, batch, state, ref_loss, ref_grads = plain
    module = build_module(tiny_cfg("model.compile={backend: aot_eager}"), state)
    module.configure_model()
    module.configure_model()  # Lightning calls it for every fit/validate: a second call does nothing
    assert module.net.compiled
    loss, grads = loss_and_grads(module, batch)
    assert_same_step((ref_loss, ref_grads), loss, grads, rtol=1e-4, atol=1e-6)
    assert module.state_dict().keys() == state.keys()  # no _orig_mod. in the checkpoint keys


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_bf16_autocast_close_to_fp32(tiny_cfg):
    """What Lightning's bf16-mixed does on CPU: the step under bf16 autocast, fp32 weights.

    Without click passes: a click is drawn from the error region of thresholded predictions, and
    bf16 flips pixels near the threshold, so later passes would see other clicks (cosine ~0.99)."""
    cfg = tiny_cfg("prompts.num_click_passes=0")
    batch = ellipse_batch()
    module = build_module(cfg)
    ref_loss, ref_grads = loss_and_grads(module, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(module, batch)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=5e-2, atol=0)
    assert grads.keys() == ref_grads.keys()
    assert all(g.dtype == torch.float32 for g in grads.values())
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        names = [n for n in ref_grads if n.startswith(f"net.{part}.")]
        flat, ref_flat = (torch.cat([g[n].flatten() for n in names]) for g in (grads, ref_grads))
        assert cosine(flat, ref_flat) > 0.99, (
            f"{part}: gradient cosine similarity {cosine(flat, ref_flat):.4f}"
        )


def test_point_encoding_stays_float32_under_bf16_autocast():
    from samtrain.models.sam.prompt_encoder import PositionEmbeddingRandom

    pe = PositionEmbeddingRandom(64)
    coords = torch.tensor([[[1000.0, 17.0], [3.0, 999.0]]])
    exact = pe.forward_with_coords(coords, (1024, 1024))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pe.forward_with_coords(coords, (1024, 1024))
    assert mixed.dtype == torch.float32 and torch.equal(mixed, exact)


def test_bf16_mixed_fast_dev_run(tiny_cfg):
    train(tiny_cfg("debug=fdr", "trainer.precision=bf16-mixed"))


def test_fused_adamw_fast_dev_run(tiny_cfg):
    """The fused optimizer switch runs with the fp32 trainer's gradient clipping and the guards."""
    cfg = tiny_cfg("debug=fdr", "model.optimizer.fused=true")
    assert hydra.utils.instantiate(cfg.model.optimizer).keywords["fused"] is True
    train(cfg)


def test_fast_dev_run_with_activation_checkpointing(tiny_cfg):
    train(tiny_cfg("debug=fdr", "model.encoder_checkpointing=true", "model.decoder_checkpointing=true"))


@pytest.mark.skipif(
    not os.environ.get("SAMTRAIN_TEST_INDUCTOR") or shutil.which("cc") is None,
    reason="inductor builds C++ for minutes on a CPU (208 s here); set SAMTRAIN_TEST_INDUCTOR=1",
)
@pytest.mark.slow
def test_compile_inductor_matches_plain(tiny_cfg, plain):
    """The default backend (inductor: generated C++ on CPU); its fused kernels round differently."""
    _, batch, state, ref_loss, ref_grads = plain
    module = build_module(tiny_cfg("model.compile=true"), state)
    module.configure_model()
    loss, grads = loss_and_grads(module, batch)
    assert_same_step((ref_loss, ref_grads), loss, grads, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_per_pass_backward_is_refused_under_fsdp(tiny_cfg, strategy):
    from types import SimpleNamespace

    import pytorch_lightning.strategies

    module = build_module(tiny_cfg("model.decoder_backward_per_pass=true"))
    module._trainer = SimpleNamespace(strategy=getattr(pytorch_lightning.strategies, strategy)())
    with pytest.raises(ValueError, match=f"does not work with a sharded strategy \\({strategy}"):
        module.setup("fit")


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_weights_are_refused(tiny_cfg, precision):
    from types import SimpleNamespace

    from pytorch_lightning.strategies import SingleDeviceStrategy

    module = build_module(tiny_cfg())
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision=precision)
    with pytest.raises(ValueError, match=f"trainer.precision={precision}: samtrain trains float32 weights"):
        module.setup("fit")
