"""LoRA on the encoder's attention: identity at init, trains only the adapters, merges exactly,
and exports to the official layout (plain samtrain Sam and segment_anything load it strictly)."""

from __future__ import annotations

import copy

import hydra
import pytest
import torch

from samtrain.models import build_sam, export_sam_checkpoint, load_sam_checkpoint
from samtrain.models.lora import LoRALinear, add_lora, has_lora, merge_lora, merge_lora_state
from tests.lightning.test_modes import build_module, ellipse_batch, loss_and_grads

SIZE = 64
LORA = {"rank": 4, "alpha": 8.0, "targets": ["qkv", "proj"]}
LORA_OVERRIDE = "model.net.lora={rank: 4, alpha: 8, targets: [qkv, proj]}"


@torch.no_grad()
def outputs(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (2, 256, 4, 4) and a decoder pass (logits, iou) on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    embeddings = model.image_encoder(torch.randn(2, 3, SIZE, SIZE, generator=g))
    coords = torch.rand(3, 2, 2, generator=g) * SIZE
    labels = torch.tensor([[1, -1], [2, 3], [0, 1]])
    logits, iou = model.decode_masks(
        embeddings, points=(coords, labels), image_indices=torch.tensor([0, 1, 1])
    )
    return embeddings, logits, iou


def assert_outputs_close(a, b, atol: float) -> None:
    for x, y in zip(outputs(a), outputs(b), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.fixture
def trained_lora(tiny_cfg):
    """A SamModule with LoRA after two AdamW steps (the adapters' B no longer zero)."""
    module = build_module(tiny_cfg(LORA_OVERRIDE))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = ellipse_batch()
    for _ in range(2):
        loss_and_grads(module, batch)
        optimizer.step()
    assert module.net.image_encoder.blocks[0].attn.qkv.lora_B.abs().sum() > 0
    return module.eval()


def test_fresh_lora_is_identity():
    torch.manual_seed(0)
    base = build_sam("vit_t", image_size=SIZE).eval()
    lora = copy.deepcopy(base)
    wrapped = add_lora(lora.image_encoder, **LORA)
    assert len(wrapped) == 2 * len(base.image_encoder.blocks)
    assert isinstance(lora.image_encoder.blocks[0].attn.qkv, LoRALinear)
    for x, y in zip(outputs(base), outputs(lora), strict=True):
        assert torch.equal(x, y)


def test_lora_keeps_official_keys_and_freezes_the_encoder():
    model = build_sam("vit_t", image_size=SIZE, lora=LORA)
    plain_keys = set(build_sam("vit_t", image_size=SIZE).state_dict())
    keys = set(model.state_dict())
    assert plain_keys <= keys
    assert all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lora_scale") for k in keys - plain_keys)
    trainable = [n for n, p in model.image_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.requires_grad for p in model.mask_decoder.parameters())


def test_only_lora_and_unfrozen_parts_get_gradients(tiny_cfg):
    module = build_module(tiny_cfg(LORA_OVERRIDE, "model.freeze=[prompt_encoder]"))
    _, grads = loss_and_grads(module, ellipse_batch())
    encoder = {n for n in grads if n.startswith("net.image_encoder.")}
    expected = {n for n, _ in module.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert encoder == expected
    assert not any(n.startswith("net.prompt_encoder.") for n in grads)
    assert {n for n, _ in module.net.mask_decoder.named_parameters()} == {
        n.removeprefix("net.mask_decoder.") for n in grads if n.startswith("net.mask_decoder.")
    }
    # At B = 0 only B's gradient is non-zero (A's is B^T times something).
    assert all(grads[n].abs().sum() > 0 for n in expected if n.endswith("lora_B"))


def test_optimizer_holds_no_frozen_weight(tiny_cfg):
    module = build_module(tiny_cfg(LORA_OVERRIDE, "model.scheduler=null"))
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.parameters() if p.requires_grad}


def test_lora_with_encoder_checkpointing_same_gradients(tiny_cfg):
    """Non-reentrant checkpointing reaches the adapters behind the frozen patch embedding."""
    plain = build_module(tiny_cfg(LORA_OVERRIDE))
    checkpointed = build_module(
        tiny_cfg(LORA_OVERRIDE, "model.encoder_checkpointing=true"), plain.state_dict()
    )
    batch = ellipse_batch()
    ref_loss, ref_grads = loss_and_grads(plain, batch)
    loss, grads = loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_freezing_the_encoder_with_lora_is_refused(tiny_cfg):
    with pytest.raises(hydra.errors.InstantiationException, match="LoRA"):
        hydra.utils.instantiate(tiny_cfg(LORA_OVERRIDE, "model.freeze=[image_encoder]").model)


def test_merge_gives_the_lora_outputs(trained_lora):
    model = trained_lora.net
    merged = copy.deepcopy(model)
    assert merge_lora(merged) == 2 * len(model.image_encoder.blocks)
    assert not has_lora(merged)
    assert type(merged.image_encoder.blocks[0].attn.qkv) is torch.nn.Linear
    assert set(merged.state_dict()) == set(build_sam("vit_t", image_size=SIZE).state_dict())
    assert_outputs_close(model, merged, atol=1e-5)


def test_export_merges_and_loads_strictly_into_a_plain_sam(trained_lora, tmp_path):
    model = trained_lora.net
    path = export_sam_checkpoint(model, tmp_path / "official.pth")
    assert has_lora(model)  # export leaves the model as it is
    state = torch.load(path, weights_only=True)
    assert not any("lora" in k for k in state)
    plain = build_sam("vit_t", image_size=SIZE, checkpoint=path).eval()  # strict
    assert_outputs_close(model, plain, atol=1e-5)


def test_export_loads_into_official_segment_anything(trained_lora, tmp_path):
    oracle = pytest.importorskip("tests.oracle")
    path = export_sam_checkpoint(trained_lora.net, tmp_path / "official.pth")
    official = oracle.build_official_sam("vit_t", SIZE)
    official.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            official.image_encoder(x), trained_lora.net.image_encoder(x), atol=1e-4, rtol=0
        )


def test_lightning_checkpoint_of_a_lora_run_loads_into_a_plain_sam(trained_lora, tmp_path):
    """A .ckpt holds net.* keys with the adapters; loading into a model without LoRA merges them."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": trained_lora.state_dict(), "global_step": 2}, path)
    plain = build_sam("vit_t", image_size=SIZE)
    report = load_sam_checkpoint(plain, path)  # strict
    assert not report.unexpected and not report.missing
    assert_outputs_close(trained_lora.net, plain.eval(), atol=1e-5)


def test_lora_run_exports_merged_weights(tiny_cfg, tmp_path):
    """A whole run (train.py's path): official.pth and last.ckpt both load into a plain Sam."""
    from samtrain.commands.train import train

    train(tiny_cfg(LORA_OVERRIDE, "validate_before=false"))
    official = build_sam("vit_t", image_size=SIZE, checkpoint=tmp_path / "official.pth").eval()
    from_ckpt = build_sam("vit_t", image_size=SIZE, checkpoint=tmp_path / "checkpoints" / "last.ckpt").eval()
    assert_outputs_close(official, from_ckpt, atol=1e-6)


def test_merge_lora_state_reports_incomplete_layers():
    state = {"blocks.0.attn.qkv.weight": torch.zeros(6, 2), "blocks.0.attn.qkv.lora_A": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="incomplete"):
        merge_lora_state(state)


def test_bad_configuration_errors():
    encoder = build_sam("vit_t", image_size=SIZE).image_encoder
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(encoder, targets=["query"])
    with pytest.raises(ValueError, match="rank"):
        add_lora(encoder, rank=0)
