"""SamModule with SAM 2's recipe (model/loss=sam2, prompts=sam2, model/optim=sam2): object scores
asked from the model, a clear error for a SAM 1 model, summed passes under per-pass backward."""

from __future__ import annotations

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from torch import nn

from samtrain.models.sam.model import Sam
from tests.lightning.test_sam_module import first_batch

SAM2_RECIPE = (
    "model/loss=sam2",
    "prompts=sam2",
    "prompts.num_click_passes=3",
    "prompts.num_mask_only_passes=0",
)


class ScoredSam(Sam):
    """The SAM 2 decode interface on a tiny SAM: ``return_object_scores=True`` adds object-score
    logits (N, 1) from a trainable head on the IoU token's predictions."""

    def decode_masks(self, image_embeddings, *, return_object_scores: bool = False, **kwargs):
        logits, iou = super().decode_masks(image_embeddings, **kwargs)
        if not return_object_scores:
            return logits, iou
        return logits, iou, self.mask_decoder.object_score_head(iou)


def scored(net: Sam) -> ScoredSam:
    net.__class__ = ScoredSam
    net.mask_decoder.object_score_head = nn.Linear(4, 1)  # where SAM 2 has its head
    return net


def test_sam1_model_asked_for_object_scores_is_a_clear_error(tiny_cfg):
    with pytest.raises(
        InstantiationException, match=r"object-score head \(SAM 2\).*model.loss.object_score=0"
    ):
        hydra.utils.instantiate(tiny_cfg(*SAM2_RECIPE).model)


def test_the_module_asks_for_object_scores_and_trains_the_head(tiny_cfg):
    cfg = tiny_cfg(*SAM2_RECIPE)
    net = scored(hydra.utils.instantiate(cfg.model.net))
    module = hydra.utils.instantiate(cfg.model, net=net)
    calls = []
    decode = net.decode_masks

    def recording(image, **kwargs):
        calls.append(kwargs)
        return decode(image, **kwargs)

    net.decode_masks = recording
    loss, logs = module.interactive_loss(first_batch(cfg))
    assert len(calls) == 4 and all(c["return_object_scores"] for c in calls)
    assert logs["object_score"] > 0 and "iou_l1" in logs
    loss.backward()
    assert net.mask_decoder.object_score_head.weight.grad.abs().sum() > 0


def test_per_pass_backward_with_summed_passes_gives_the_same_gradients(tiny_cfg):
    cfg = tiny_cfg(*SAM2_RECIPE)
    batch = first_batch(cfg)
    torch.manual_seed(0)
    whole = hydra.utils.instantiate(cfg.model, net=scored(hydra.utils.instantiate(cfg.model.net)))
    per_pass = hydra.utils.instantiate(
        cfg.model, net=scored(hydra.utils.instantiate(cfg.model.net)), decoder_backward_per_pass=True
    )
    per_pass.load_state_dict(whole.state_dict())
    assert per_pass.pass_weight == 1.0  # summed passes: each pass's loss enters with weight 1
    for module in (whole, per_pass):
        loss, _ = module.interactive_loss(batch)
        loss.backward()
    for (name, a), (_, b) in zip(whole.named_parameters(), per_pass.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sam2_optim_groups_compose(tiny_cfg):
    cfg = tiny_cfg("model/optim=sam2", "model/scheduler=sam2")
    assert cfg.model.layer_decay_module == "image_encoder.trunk"
    assert dict(cfg.model.layer_decay_overrides) == {"*pos_embed*": 1.0}
    assert cfg.model.encoder_lr == 3.0e-6 and cfg.model.scheduler.min_ratio == 0.1
    module = hydra.utils.instantiate(tiny_cfg("model.encoder_lr=1.0e-5", "model.scheduler=null").model)
    optimiser = module.configure_optimizers()
    encoder = {id(p) for p in module.net.image_encoder.parameters()}
    for group in optimiser.param_groups:
        in_encoder = {id(p) in encoder for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == (1.0e-5 if in_encoder.pop() else module.hparams.lr)


def test_sam2_optim_on_a_sam1_model_names_the_missing_trunk(tiny_cfg):
    module = hydra.utils.instantiate(tiny_cfg("model/optim=sam2", "model.scheduler=null").model)
    with pytest.raises(ValueError, match=r"layer_decay_module 'image_encoder\.trunk'"):
        module.configure_optimizers()


def test_cached_embeddings_take_a_sam2_with_its_encoder_frozen():
    from samtrain.lightning.callbacks.embedding_cache import check_frozen_encoder
    from samtrain.models import build_sam

    net = build_sam("sam2.1_hiera_n", image_size=64)
    with pytest.raises(ValueError, match="frozen image encoder"):
        check_frozen_encoder(net)
    check_frozen_encoder(net.requires_grad_(False))


def test_the_module_refuses_a_frame_its_model_does_not_take():
    from samtrain.lightning.sam_module import SamModule
    from samtrain.models import build_sam

    with pytest.raises(ValueError, match="takes its input in the 'square' frame"):
        SamModule(net=build_sam("sam2.1_hiera_n", image_size=64), optimizer=torch.optim.AdamW, frame="sam")
    with pytest.raises(ValueError, match="takes its input in the 'sam' frame"):
        SamModule(net=build_sam("vit_t", image_size=64), optimizer=torch.optim.AdamW, frame="square")
