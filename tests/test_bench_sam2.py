"""bench.official_sam2 runs end to end with the nano SAM 2.1 at 64 px: the table has its rows and
the two model paths give the same first loss (timings are reported, never asserted)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("sam2")
from bench.official_sam2 import (
    OfficialSam2Decoder,
    build_pair,
    main,
    official_features,
    without_padding,
)
from samtrain.interactive.simulate import LossWeights, Prompts
from samtrain.lightning.sam_module import SamModule
from samtrain.models.sam.prompt_encoder import PADDING

SIZE = 64


def test_main_prints_the_table_and_equal_first_losses(capsys):
    threads = torch.get_num_threads()
    results = main(["--variant", "sam2.1_hiera_n", "--image-size", str(SIZE), "--images", "2", "--masks", "3",
                    "--repeats", "1", "--warmup", "0", "--threads", "1"])  # fmt: skip
    text = capsys.readouterr().out
    assert torch.get_num_threads() == threads and "1 thread(s)" in text  # set for the run, then restored
    for row in ("encoder forward (s)", "full training step (s)"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
        assert len(re.findall(r"\| [0-9.]+x? (?=\|)", line)) == 3  # official, samtrain, speed-up
    losses = re.search(r"\| first step's loss \| ([0-9.]+) \| ([0-9.]+) \|", text)
    assert float(losses[1]) == pytest.approx(float(losses[2]), rel=1e-4)
    assert results.losses["official"] == pytest.approx(results.losses["samtrain"], rel=1e-4)


def padded_prompts(kind: str, n: int) -> Prompts:
    """SAM 2's prompt layouts with a corrective click: [point, pad, click] or [corners, pad, click]."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, PADDING, 0]) if kind == "point" else torch.tensor([2, 3, PADDING, 1])
    coords = torch.rand(n, len(labels), 2, generator=g) * SIZE
    mask_input = torch.randn(n, 1, SIZE // 4, SIZE // 4, generator=g)
    return Prompts(coords=coords, labels=labels.expand(n, -1).clone(), mask_input=mask_input)


@pytest.fixture(scope="module")
def pair():
    return build_pair("sam2.1_hiera_n", SIZE)


@pytest.mark.parametrize("kind", ["point", "box"])
def test_the_official_decoder_equals_samtrain_decode_masks(pair, kind):
    official, ours = pair
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    image_indices = torch.tensor([1, 0, 1])  # not sorted: the official decoder restores the order
    prompts = padded_prompts(kind, 3)
    module = SamModule(net=ours, optimizer=torch.optim.AdamW, loss=LossWeights(object_score=1.0))
    with torch.no_grad():
        expected = module.decoder(ours.prepare_image(ours.image_encoder(images)), image_indices)(prompts)
        got = OfficialSam2Decoder(official, official_features(official, images), image_indices)(prompts)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_mixed_prompt_layouts_are_refused():
    prompts = padded_prompts("point", 2)
    prompts.labels[1, 1] = 1  # one mask without the padding token
    with pytest.raises(ValueError, match="one padding token"):
        without_padding(prompts)
