"""One pass of simulate_interaction's SAM 2 path against the official SAM 2 heads: on the raw outputs
of sam2's own prompt encoder and mask decoder, samtrain's "no object" masks, candidates, fed-back
output and loss equal what ``SAM2Base._forward_sam_heads`` and sam2's training loss produce."""

from __future__ import annotations

import pytest
import torch

from samtrain.interactive.simulate import (
    LossWeights,
    chosen_output,
    output_candidates,
    pass_loss,
    suppress_absent_objects,
)
from tests.interactive.test_sam2_losses import WEIGHTS, official_loss_module
from tests.models.sam2.oracle import sam2_hydra

SIZE = 128


@pytest.fixture(scope="module")
def official_model():
    pytest.importorskip("sam2")
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    with sam2_hydra():  # other tests may have cleared the Hydra state sam2 set up at import
        return build_sam2(
            "configs/sam2.1/sam2.1_hiera_t.yaml",
            ckpt_path=None,
            device="cpu",
            mode="train",  # a training pass: no dynamic_multimask_via_stability on the single output
            hydra_overrides_extra=[f"++model.image_size={SIZE}"],
        )


def first_frame_features(model, images: torch.Tensor):
    """The features ``_track_step`` gives the SAM heads on an initial conditioning frame."""
    _, feats, _, sizes = model._prepare_backbone_features(model.forward_image(images))
    high_res = [
        x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1], strict=True)
    ]
    top = (feats[-1] + model.no_mem_embed).permute(1, 2, 0).view(-1, model.hidden_dim, *sizes[-1])
    return top, high_res


def all_outputs(model, top, high_res, coords, labels):
    """Every output of sam2's decoder (N, 4, h, w), (N, 4), object scores (N, 1): samtrain's decode interface."""
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    masks, iou, _, scores = model.sam_mask_decoder.predict_masks(
        image_embeddings=top,
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=high_res,
    )
    return masks, iou, scores


@pytest.fixture(scope="module")
def features(official_model):
    with torch.no_grad():
        images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        return first_frame_features(official_model, images)


@pytest.mark.parametrize("score_bias", [8.0, -8.0])  # every object present / every object absent
@pytest.mark.parametrize("multimask", [True, False])
def test_one_pass_equals_the_official_heads_and_loss(official_model, features, score_bias, multimask):
    model = official_model
    top, high_res = features
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    targets = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    targets[0, 20:70, 30:90] = True  # image 1: an empty target
    # one point (multimask) or one point and a click (single output); the official encoder pads
    coords = torch.tensor([[[50.0, 45.0], [80.0, 60.0]], [[64.0, 64.0], [10.0, 10.0]]])
    labels = torch.tensor([[1, 0], [1, 1]], dtype=torch.int32)
    if multimask:
        coords, labels = coords[:, :1], labels[:, :1]
    with torch.no_grad():
        saved = last.bias.clone()
        last.bias.add_(score_bias)
        expected = model._forward_sam_heads(
            backbone_features=top,
            point_inputs={"point_coords": coords, "point_labels": labels},
            high_res_features=high_res,
            multimask_output=multimask,
        )
        masks, iou, scores = all_outputs(model, top, high_res, coords, labels)
        last.bias.copy_(saved)
    _, high_res_multimasks, ious, low_res_chosen, _, _, official_scores = expected
    assert ((scores > 0) == (score_bias > 0)).all()  # the case is what it says

    # samtrain's prompts carry their own padding point: [point, pad] or [point, click, pad]
    ours_labels = torch.cat([labels.long(), torch.full((2, 1), -1)], dim=1)
    logits = suppress_absent_objects(masks, scores)
    candidates = output_candidates(ours_labels, 4)
    seen = slice(1, 4) if multimask else slice(0, 1)
    assert candidates[:, seen].all() and candidates.sum(1).tolist() == [len(range(4)[seen])] * 2
    upsampled = torch.nn.functional.interpolate(
        logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(upsampled[:, seen], high_res_multimasks, rtol=0, atol=1e-5)
    torch.testing.assert_close(iou[:, seen], ious)
    torch.testing.assert_close(chosen_output(logits, iou, candidates), low_res_chosen, rtol=0, atol=1e-5)

    weights = LossWeights(full_resolution=True, iou_error="l1", object_score=1.0, pass_reduction="sum")
    ours = pass_loss(logits, iou, targets, candidates, weights=weights, num_masks=2, object_scores=scores)
    official = official_loss_module().MultiStepMultiMasksAndIous(
        weight_dict=dict(WEIGHTS), supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True
    )(
        [
            {
                "multistep_pred_multimasks_high_res": [high_res_multimasks],
                "multistep_pred_ious": [ious],
                "multistep_object_score_logits": [official_scores],
            }
        ],
        targets[None].float(),
    )
    torch.testing.assert_close(ours.loss, official["core_loss"], rtol=1e-5, atol=1e-6)
