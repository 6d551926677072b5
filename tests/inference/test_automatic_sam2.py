"""AutomaticMaskGenerator on a Sam2 against the official SAM2AutomaticMaskGenerator on identical
weights (the nano trunk at 128 px), with the sharpened decoder and high mask threshold of
test_automatic so that the IoU and stability filters and NMS have something to decide. (On this
model, crops of the image give no mask that survives crop NMS, so crops are not compared here.)"""

from __future__ import annotations

import pytest
import torch

from samtrain.inference.automatic import AutomaticMaskGenerator
from samtrain.models import build_sam
from tests.inference.test_automatic import BASE, MASK_THRESHOLD, assert_same_records, image  # noqa: F401
from tests.models.sam2.oracle import build_official_sam2, randomise

SETTINGS = {"nms": dict(BASE)}  # the filters and NMS; test_automatic covers the settings' logic


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    official = randomise(build_official_sam2("sam2.1_hiera_n", 128), seed=0)
    with torch.no_grad():
        for mlp in official.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(20.0)
            mlp.layers[-1].bias.mul_(20.0)
    path = tmp_path_factory.mktemp("ckpt") / "official.pt"
    torch.save({"model": official.state_dict()}, path)
    ours = build_sam("sam2.1_hiera_n", image_size=128, checkpoint=path).eval()
    ours.mask_threshold = MASK_THRESHOLD
    return official, ours


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_matches_the_official_sam2_generator(models, image, setting):  # noqa: F811
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    official, ours = models
    kwargs = SETTINGS[setting]
    generator = SAM2AutomaticMaskGenerator(official, mask_threshold=MASK_THRESHOLD, **kwargs)
    generator.predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # the oracle hard-codes 1024 px
    theirs = generator.generate(image)
    mine = AutomaticMaskGenerator(ours, **kwargs).generate(image)
    assert len(theirs) >= 1
    assert_same_records(theirs, mine)
