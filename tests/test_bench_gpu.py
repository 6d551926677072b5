"""bench/gpu.sh runs end to end with the tiny config on the CPU (so the GPU script cannot rot).

Its first section is ``bench.official`` at a tiny size: only counted quantities are asserted (FLOPs,
kernel time found by the profiler, the loss); the timings depend on the machine's load and belong
in BENCHMARKS.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("segment_anything")
pytestmark = pytest.mark.slow


def row_values(text: str, row: str) -> list[float]:
    """The numbers in the cells of the Markdown table row that starts with ``row``."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {row}"))
    return [float(cell) for cell in re.findall(r"\| ([0-9.]+)x? (?=\|)", line)]


def test_gpu_script_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = {**os.environ, "SAMTRAIN_GPU_BENCH_TINY": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "bench/gpu.sh", f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "failed" not in text and "timed out" not in text, text
    official, memory_small, memory_large, compiled = text.split("### ")[1:]
    for row in ("encoder forward", "decoder fwd+bwd", "full training step", "full step: masks x passes / s"):
        assert len(row_values(official, row)) == 3  # official, samtrain, speed-up: reported, not compared
    assert {"encoder", "sampler", "optimizer"} <= {m for m in re.findall(r"^\| (\w+) \|", official, re.M)}
    assert all(v > 0 for v in row_values(official, "FLOPs (FlopCounterMode, G)"))
    assert all(v > 0 for v in row_values(official, "time in matmul, attention and convolution kernels"))
    # Same weights, draws and prompt tokens: the two model paths compute the same first loss.
    losses = re.search(r"official ([0-9.]+), samtrain ([0-9.]+)", official)
    assert float(losses[1]) == pytest.approx(float(losses[2]), rel=1e-4)
    for section in (memory_small, memory_large):
        assert "planner / measured" in section  # measured beside planned, per mode
    assert "| compile speed-up |" in compiled and "objects / s" in compiled
