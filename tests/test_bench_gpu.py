"""bench/gpu.sh runs end to end with the tiny config on the CPU (so the GPU script cannot rot)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("segment_anything")


def test_gpu_script_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = {**os.environ, "SAMTRAIN_GPU_BENCH_TINY": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "bench/gpu.sh", f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "failed" not in text and "timed out" not in text, text
    assert text.count("### ") == 4
    assert "| full training step |" in text or "full training step" in text
    assert "planner / measured" in text  # measured beside planned, per mode
    assert "| compile speed-up |" in text and "objects / s" in text
