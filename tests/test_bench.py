"""The samtrain-vs-official benchmark runs end to end at a tiny size (so the script cannot rot).

Only counted quantities are asserted (FLOPs, bytes, kernel calls, the loss): the timings the
benchmark reports depend on the machine's load and belong in bench/ and BENCHMARKS.md."""

from __future__ import annotations

import pytest

pytest.importorskip("segment_anything")

from bench import official


def test_official_benchmark_tiny(capsys):
    results = official.main(
        [
            "--variant", "vit_t", "--image-size", "64", "--images", "1", "--masks", "2",
            "--repeats", "1", "--warmup", "0", "--matmul-sizes", "128", "--no-isolate",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    for row in (
        "encoder forward",
        "decoder fwd+bwd",
        "full training step",
        "masks x passes / s",
        "optimizer",
        "time in matmul, attention and convolution kernels",
    ):
        assert row in out
    for timings in (results.encoder_s, results.decoder_s, results.step_s):
        assert set(timings) == {"official", "samtrain"}  # reported, not compared
    for side in ("official", "samtrain"):
        assert results.memory[side]["flops"] > 0 and results.memory[side]["peak_bytes"] > 0
        assert results.memory[side]["matmul_calls"] > 0  # the profiler found the matmul kernels
        assert {"encoder", "sampler", "total"} <= set(results.breakdown[side])
    # Same weights, draws and prompt tokens: the two model paths compute the same first loss.
    assert results.losses["official"] == pytest.approx(results.losses["samtrain"], rel=1e-4)
